"""The project's one error type for what a user can fix, and the CLI wrapper that prints it.

Every entry point (``python -m preprocess``, ``launch.train``, ``pipeline.tools.evaluate``, ...) runs its
body through :func:`run_cli`: a :class:`UserError` becomes one ``error: ...`` line on stderr and
exit status 2, never a traceback. ``pipeline`` and ``launch`` import this module too; it has no
heavy imports.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """An error the user can fix (a path, a flag, the data): printed on one line, exit status 2."""


def run_cli(body: Callable[[], int | None], *, on_interrupt: str | None = None) -> int:
    """Run a command's body; its return value (None = 0) is the exit status.

    ``on_interrupt``: what to print on Ctrl-C (exit 130, no traceback); None lets it propagate.
    """
    try:
        return body() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if on_interrupt is None:
            raise
        print(on_interrupt, file=sys.stderr)
        return 130
