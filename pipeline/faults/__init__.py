"""What goes wrong while a run runs, one module each: a second writer on the run directory (``lease``), a stuck
rank or a hung collective (``watchdog``), nodes that cannot reach each other (``reach``), a slow rank
(``stragglers``), and a diverging loss (``divergence``)."""
