"""The checkpoint's one-line errors (a user can fix each: another checkpoint, space, permissions, the LR)."""

from __future__ import annotations

from basics.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be saved or loaded; the message names it and what to do."""


class NonFiniteState(UserError):
    """Training diverged: weights or loss are NaN/inf; nothing non-finite is saved."""
