"""Young's and Daly's checkpoint interval: about sqrt(2 x save cost x MTBF) between saves.

Shorter, and saves' stalls eat the run; longer, and each failure throws away more steps. With the save
stall C and the mean time between failures M, the expected waste per unit time is C/T + T/(2M), least at
T = sqrt(2 C M) (Young 1974; Daly 2006 refines it for C not small against M).
"""

from __future__ import annotations

import math

FLOOR_MIN = 1.0  # never save more often than every minute, whatever the figures say


def young_daly_minutes(save_s: float, mtbf_s: float) -> float:
    """The interval in minutes for a save stall of ``save_s`` seconds and an MTBF of ``mtbf_s`` seconds."""
    return max(FLOOR_MIN, math.sqrt(2.0 * max(save_s, 0.0) * mtbf_s) / 60.0)
