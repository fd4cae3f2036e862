"""Young's and Daly's checkpoint interval: about sqrt(2 x save cost x MTBF) between saves.

Shorter, and saves' stalls eat the run; longer, and each failure throws away more steps. With the save
stall C and the mean time between failures M, the expected waste per unit time is C/T + T/(2M), least at
T = sqrt(2 C M) (Young 1974; Daly 2006 refines it for C not small against M).

``--checkpoint.every-minutes auto`` (:class:`AutoInterval`) takes C as the mean stall of this run's saves so far
(every attempt's, from the ledger, and this one's) and M as ``--checkpoint.mtbf-hours`` or, when that is 0, this
run's own: its wall-clock over its failed attempts in the ledger (:func:`history`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.goodput.account import account, group

log = logging.getLogger("alexnet")

FLOOR_MIN = 1.0  # never save more often than every minute, whatever the figures say
FIRST_SAVE_MIN = 30.0  # before any save's stall is measured: the fixed default's interval
DEFAULT_MTBF_H = 24.0  # a run whose ledger holds no failure yet: one a day, a cautious guess for one node
MTBF_FLOOR_H = 0.25  # a crash loop failing every few seconds is no failure rate to plan checkpoints by
ANNOUNCE_CHANGE = 0.2  # log the interval again when it moves by more than this share
NOT_FAILURES = ("done", "preempted")  # how an attempt may end without a failure


def young_daly_minutes(save_s: float, mtbf_s: float) -> float:
    """The interval in minutes for a save stall of ``save_s`` seconds and an MTBF of ``mtbf_s`` seconds."""
    return max(FLOOR_MIN, math.sqrt(2.0 * max(save_s, 0.0) * mtbf_s) / 60.0)


@dataclass
class History:
    """What a run's ledger says before this attempt: its first start, its failed attempts, its saves' stalls."""

    began: float | None = None  # the first attempt's process start (wall time); None: no earlier attempt
    failures: int = 0
    saves: int = 0
    stall_s: float = 0.0  # the saves' stalls, summed


def history(records: list[dict[str, Any]], this_pid: int | None = None) -> History:
    """From the ledger's records, less this process's own attempt (its ``start`` has ``pid`` ``this_pid``)."""
    attempts = [rows for rows in group(records) if this_pid is None or rows[0].get("pid") != this_pid]
    if not attempts:
        return History()
    run = account([r for rows in attempts for r in rows])
    last = [next((r for r in reversed(rows) if "saves" in r), {}) for rows in attempts]
    return History(
        began=run.attempts[0].began,
        failures=sum(not a.ended.startswith(NOT_FAILURES) for a in run.attempts),
        saves=sum(r.get("saves", 0) for r in last),
        stall_s=sum(r.get("save_stall_s", 0.0) for r in last),
    )


class AutoInterval:
    """The interval ``--checkpoint.every-minutes auto`` saves at, as the run's figures come in; logs one line
    when first asked and whenever the interval moves by more than ``ANNOUNCE_CHANGE``."""

    def __init__(self, mtbf_hours: float, past: History, *, wall: Callable[[], float] = time.time):
        self.mtbf_hours = mtbf_hours  # given; 0: from the ledger
        self.past = past
        self.wall = wall
        self.saves, self.stall_s = past.saves, past.stall_s
        self.announced: float | None = None

    def saved(self, stall_s: float) -> None:
        """A save of this attempt stalled the loop ``stall_s`` seconds."""
        self.saves += 1
        self.stall_s += stall_s

    def mtbf(self) -> tuple[float, str]:
        """The MTBF in seconds and where it came from."""
        if self.mtbf_hours > 0:
            return self.mtbf_hours * 3600, f"{self.mtbf_hours:g} h MTBF (--checkpoint.mtbf-hours)"
        if not self.past.failures or self.past.began is None:
            return DEFAULT_MTBF_H * 3600, f"{DEFAULT_MTBF_H:g} h MTBF (the default: no failure in this run's ledger)"
        hours = (self.wall() - self.past.began) / 3600
        measured = max(MTBF_FLOOR_H, hours / self.past.failures)
        return measured * 3600, (
            f"{measured:.2f} h MTBF (this run's ledger: {hours:.2f} h over {self.past.failures} failed attempts"
            f"{f', at least {MTBF_FLOOR_H:g} h' if measured == MTBF_FLOOR_H else ''})"
        )

    def minutes(self) -> float:
        """The interval now, in minutes."""
        mtbf_s, mtbf_said = self.mtbf()
        if not self.saves:
            minutes = FIRST_SAVE_MIN
            said = f"no save stall measured yet: the first save at {FIRST_SAVE_MIN:g} min; then Young/Daly, {mtbf_said}"
        else:
            stall = self.stall_s / self.saves
            minutes = young_daly_minutes(stall, mtbf_s)
            said = (
                f"Young/Daly sqrt(2 x {stall:.2f} s save stall (mean of {self.saves} saves) x {mtbf_said})"
                f"{f', at least {FLOOR_MIN:g} min' if minutes == FLOOR_MIN else ''}"
            )
        if self.announced is None or abs(minutes - self.announced) > ANNOUNCE_CHANGE * self.announced:
            self.announced = minutes
            log.info("checkpoint interval (--checkpoint.every-minutes auto): %.1f min = %s", minutes, said)
        return minutes
