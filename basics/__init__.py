"""What every part of the project shares and nothing else: the one-line user error (:mod:`basics.errors`),
files that appear whole or not at all (:mod:`basics.files`), and reading a process's ``/proc`` entry
(:mod:`basics.procfs`). Imports only the standard library, so ``preprocess`` (which never imports torch
or ``pipeline``) and ``pipeline``/``launch`` can all stand on it."""
