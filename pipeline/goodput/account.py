"""From ledger records to where the time went: per attempt and per run, kept training and each badput.

An attempt's span runs from the previous attempt's last record (its own process start for the first) to
its own last record, so the spans of a run's attempts tile its wall-clock exactly; within a span:

- ``gap``: from the previous attempt's last record to this process's start (the launcher's restart, a
  requeue's wait in the queue, a person's pause before a manual resume), less ``hang_detection``: when the
  previous attempt ended in a hang, the seconds without progress the watchdog waited before naming it;
- ``startup.*``: imports (process start to ``launch.train.run``), process group (config, rendezvous, the
  writer lease), build (the model, DDP, the trainer's parts), restore (reading the checkpoint), input
  pipeline (the first loader's start: data index and graph, until its first batch), compile (every
  ``compile`` phase of the attempt);
- ``data_wait``, ``validation``, ``checkpoint`` (the stall the loop saw: the save's disk work and
  collectives), from the phase seconds (``pipeline.phases``);
- the step phases' time split into ``kept`` and two kinds of wasted steps: ``lost`` (steps since the
  checkpoint the next attempt resumed from: their work was redone) and ``rolled_back`` (steps a divergence
  rolled back), each booked at the attempt's mean step time;
- ``other``: the rest of the span (logging, the lost tail after the last record, anything unmarked).

A checkpoint's background writing overlaps training: it is reported (``background_s``) but not in the span.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.phases import STEP_PHASES as _STEP_PHASES
from pipeline.phases import Phase

# a training step's work: every phase of a step but its data wait (booked apart)
STEP_PHASES = tuple(str(p) for p in _STEP_PHASES if p != Phase.DATA)
STARTUP = (
    "startup.imports",
    "startup.process_group",
    "startup.build",
    "startup.restore",
    "startup.input_pipeline",
    "startup.compile",
)
BADPUT = (*STARTUP, "data_wait", "validation", "checkpoint", "lost", "rolled_back", "hang_detection", "gap", "other")
CATEGORIES = ("kept", *BADPUT)

STUCK = re.compile(r"no progress on any rank for (\d+(?:\.\d+)?) s")  # pipeline.faults.watchdog's hang line


@dataclass
class AttemptAccount:
    attempt: str
    began: float  # the span's start: the previous attempt's last record, or this process's start
    ended_at: float  # this attempt's last record
    ended: str  # why it ended: done, preempted, error: X, hang, killed (no end record)
    first_step: int  # the step it resumed at
    last_step: int  # the last step it recorded
    seconds: dict[str, float] = field(default_factory=dict)  # CATEGORIES
    background_s: float = 0.0
    lost_steps: int = 0
    rolled_back_steps: int = 0
    restarts: dict[str, Any] = field(default_factory=dict)

    @property
    def span(self) -> float:
        return self.ended_at - self.began

    @property
    def startup(self) -> float:
        return sum(self.seconds.get(k, 0.0) for k in STARTUP)

    def as_json(self) -> dict[str, Any]:
        return {**vars(self), "span": self.span, "startup": self.startup}


@dataclass
class RunAccount:
    attempts: list[AttemptAccount]

    @property
    def wall(self) -> float:
        return sum(a.span for a in self.attempts)

    @property
    def totals(self) -> dict[str, float]:
        return {k: sum(a.seconds.get(k, 0.0) for a in self.attempts) for k in CATEGORIES}

    @property
    def goodput(self) -> float:
        return self.totals["kept"] / self.wall if self.wall > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "wall_s": self.wall,
            "goodput": self.goodput,
            "seconds": self.totals,
            "attempts": [a.as_json() for a in self.attempts],
        }


def group(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Records by attempt, in the order the attempts started (a record without its start is dropped)."""
    attempts: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record["kind"] == "start":
            attempts[record["attempt"]] = [record]
        elif record.get("attempt") in attempts:
            attempts[record["attempt"]].append(record)
    return list(attempts.values())


def hang_detect_s(line: str) -> float | None:
    """The seconds without progress a hang line (``pipeline.faults.watchdog``) names, or None."""
    found = STUCK.search(line or "")
    return float(found.group(1)) if found else None


def account(records: list[dict[str, Any]]) -> RunAccount:
    """The whole run's account (see the module docstring)."""
    attempts: list[AttemptAccount] = []
    previous_end: float | None = None
    for rows in group(records):
        start, last = rows[0], rows[-1]
        one = _attempt(rows, began=start.get("process_start", start["t"]) if previous_end is None else previous_end)
        if previous_end is not None:
            gap = max(0.0, start.get("process_start", start["t"]) - previous_end)
            hang = min(gap, start.get("hang", {}).get("detect_s") or 0.0)
            one.seconds["gap"], one.seconds["hang_detection"] = gap - hang, hang
            if attempts and attempts[-1].ended.startswith("killed") and hang:
                attempts[-1].ended = "hang"
            if attempts:
                _book_lost(attempts[-1], one.first_step)
        attempts.append(one)
        previous_end = last["t"]
    for one in attempts:
        one.seconds["other"] = one.span - sum(v for k, v in one.seconds.items() if k != "other")
    return RunAccount(attempts)


def _attempt(rows: list[dict[str, Any]], began: float) -> AttemptAccount:
    start, last = rows[0], rows[-1]
    kinds = {r["kind"]: r for r in rows}  # the last of each kind
    resumed = kinds.get("resumed", {})
    phases = next((r["phases"] for r in reversed(rows) if "phases" in r), {})
    at_first = kinds.get("first-step", {}).get("phases", phases)  # phase seconds when the first step began
    restore = min(resumed.get("restore_s", 0.0), at_first.get("start", 0.0))
    seconds = {
        "startup.imports": max(0.0, start["entry"] - start["process_start"]) if "entry" in start else 0.0,
        "startup.process_group": max(0.0, start["marks_at"] - start["entry"]) if "marks_at" in start else 0.0,
        "startup.build": at_first.get("start", 0.0) - restore,
        "startup.restore": restore,
        "startup.input_pipeline": at_first.get("loader", 0.0),
        "startup.compile": phases.get("compile", 0.0),
        "data_wait": phases.get("data", 0.0) + phases.get("loader", 0.0) - at_first.get("loader", 0.0),
        "validation": phases.get("validation", 0.0) + phases.get("validation-sync", 0.0),
        "checkpoint": phases.get("checkpoint", 0.0) + phases.get("checkpoint-sync", 0.0),
        "kept": sum(phases.get(p, 0.0) for p in STEP_PHASES),  # less lost and rolled-back steps, below
        "lost": 0.0,
        "rolled_back": 0.0,
        "hang_detection": 0.0,
        "gap": 0.0,
    }
    first_step = resumed.get("step", start.get("step", 0))
    end = kinds.get("end")
    one = AttemptAccount(
        attempt=start["attempt"],
        began=began,
        ended_at=last["t"],
        ended=end["reason"] if end else "killed (no end record)",
        first_step=first_step,
        last_step=max([first_step] + [r["step"] for r in rows if "step" in r and r["kind"] != "start"]),
        seconds=seconds,
        background_s=last.get("background_s", 0.0),
        restarts=start.get("restarts", {}),
    )
    rolled = sum(max(0, r["at_step"] - r["restored_step"]) for r in rows if r["kind"] == "rollback")
    one.rolled_back_steps = rolled
    _move(one, "rolled_back", rolled)
    return one


def _mean_step_s(one: AttemptAccount) -> float:
    steps = one.last_step - one.first_step
    done = one.seconds["kept"] + one.seconds["lost"] + one.seconds["rolled_back"]
    return done / steps if steps > 0 else 0.0


def _move(one: AttemptAccount, to: str, steps: int) -> None:
    """Book ``steps`` of the attempt's step time (at its mean step time) from kept to ``to``."""
    seconds = min(one.seconds["kept"], steps * _mean_step_s(one))
    one.seconds["kept"] -= seconds
    one.seconds[to] += seconds


def _book_lost(previous: AttemptAccount, resumed_step: int) -> None:
    """The previous attempt's steps after the checkpoint the next one resumed from were done again."""
    lost = max(0, previous.last_step - max(resumed_step, previous.first_step))
    previous.lost_steps = lost
    _move(previous, "lost", lost)
