"""One attempt's entries in the goodput ledger, fed by the phase marks (global rank 0 only).

Records (JSON lines, ``pipeline.goodput.ledger``), each with ``kind``, ``attempt`` and the wall time ``t``:

- ``start``: the process's start, ``run``'s entry, the phase marks' creation, torchrun's and Slurm's restart
  counts, and the hang the previous attempt ended in (``hang``: its folder and the seconds without progress
  the watchdog waited), written before anything else this attempt does;
- ``resumed``: at the first mark after start-up (the step it resumes at, the checkpoint, the restore's seconds);
- ``first-step``: the phase seconds when the first training step begins (start-up ends there);
- ``tick``: the phase seconds so far, at a control step at most every ``tick_s`` (``ALEXNET_GOODPUT_TICK_S``),
  with the checkpoints' background seconds, this attempt's saves and the loop's stall in them (``saves``,
  ``save_stall_s``); a killed attempt's account ends at its last tick;
- ``rollback``: a divergence rolled the state back from ``at_step`` to ``restored_step``;
- ``end``: why the attempt ended (done, preempted, ``error: X``), with the final phase seconds.

``pipeline.goodput.account`` turns them into the account; lost work is booked there, when the next
attempt's ``resumed`` says which checkpoint it went back to.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from basics import procfs
from pipeline.goodput.account import CATEGORIES, account, group, hang_detect_s
from pipeline.goodput.ledger import Ledger, read_records
from pipeline.phases import Mark, Phase, PhaseMarks
from pipeline.run_dir import RunDir

log = logging.getLogger("alexnet")

TICK_S = 10.0  # at most one tick this often: ~9 000 short lines a day (tests set ALEXNET_GOODPUT_TICK_S=0)
TICK_ENV = "ALEXNET_GOODPUT_TICK_S"


def process_start() -> float | None:
    """This process's start as a wall time, or None without ``/proc``: now less its age (``/proc/uptime``
    less its start ticks; both to a hundredth of a second, where the boot time in ``/proc/stat`` is whole seconds)."""
    ticks = procfs.start_ticks(os.getpid())
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if ticks is None:
        return None
    return time.time() - (uptime - int(ticks) / os.sysconf("SC_CLK_TCK"))


def last_hang(run_dir: RunDir, since: float) -> dict[str, Any] | None:
    """The newest hang verdict written after ``since`` (``pipeline.faults.watchdog``), or None."""
    import json

    found = []
    for verdict in run_dir.hangs.glob("*/hang.json"):
        try:
            at, line = verdict.stat().st_mtime, json.loads(verdict.read_text()).get("line", "")
        except (OSError, ValueError):
            continue
        if at >= since:
            found.append((at, verdict.parent.name, line))
    if not found:
        return None
    at, folder, line = max(found)
    return {"folder": folder, "detect_s": hang_detect_s(line), "at": at}


class Recorder:
    """Appends this attempt's records (see the module docstring); :meth:`attach` the trainer before ``fit``."""

    def __init__(
        self,
        run_dir: str | Path,
        marks: PhaseMarks,
        *,
        entry: float,
        marks_at: float,
        writer: Any = None,
        tick_s: float | None = None,
    ):
        self.run_dir = RunDir(run_dir)
        self.marks = marks
        self.writer = writer  # TensorBoard goodput/* scalars (pipeline.metrics.MetricWriter), or None
        self.tick_s = float(os.environ.get(TICK_ENV, TICK_S)) if tick_s is None else tick_s
        self.attempt = f"{os.getpid()}-{time.time_ns()}"
        self.trainer: Any = None
        previous = read_records(self.run_dir.goodput_ledger)
        # earlier attempts' records without their periodic ticks but the last: the account per tick stays short
        self.before = [r for rows in group(previous) for r in rows if r["kind"] != "tick" or r is rows[-1]]
        started = process_start() or entry
        earlier = [r for r in self.before if r["kind"] == "start"]
        hang = last_hang(self.run_dir, earlier[-1]["process_start"]) if earlier else None
        self.mine: list[dict[str, Any]] = []
        self._rollbacks = 0
        self._last_tick = time.monotonic()
        self._stage = "start"  # then "resumed", "stepping", "logged"
        self.ledger = Ledger(self.run_dir.goodput_ledger)
        restarts = {
            "torchrun": os.environ.get("TORCHELASTIC_RESTART_COUNT"),
            "slurm": os.environ.get("SLURM_RESTART_COUNT"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
        }
        start = {"process_start": started, "entry": entry, "marks_at": marks_at, "pid": os.getpid()}
        start |= {"host": socket.gethostname(), "restarts": {k: v for k, v in restarts.items() if v is not None}}
        self._append("start", start | ({"hang": hang} if hang else {}), durable=True)
        self._unsubscribe = marks.subscribe(self._seen)

    def attach(self, trainer: Any) -> None:
        """The trainer whose checkpointer (restore and background seconds) and rollbacks the records name."""
        self.trainer = trainer
        self.writer = self.writer or getattr(trainer, "writer", None)
        self._rollbacks = len(trainer.guard.rollbacks)

    def _append(self, kind: str, fields: dict[str, Any], durable: bool = False) -> dict[str, Any]:
        record = {"kind": kind, "attempt": self.attempt, "t": time.time(), **fields}
        self.ledger.append(record, durable=durable)
        if kind == "tick" and self.mine and self.mine[-1]["kind"] == "tick":
            self.mine[-1] = record  # only the newest tick counts: the account per tick stays short
        else:
            self.mine.append(record)
        return record

    # -- the marks' listener (the training thread: quick, except at a due tick)

    def _seen(self, mark: Mark) -> None:
        if self._stage == "start" and mark.phase != Phase.START:
            self._stage = "resumed"
            self._append("resumed", {"step": mark.step, **self._restored()})
        if self._stage == "resumed" and mark.phase in (Phase.FORWARD, Phase.COMPILE):
            self._stage = "stepping"
            self._append("first-step", {"step": mark.step, "phases": self.marks.seconds()})
        elif mark.phase == Phase.CONTROL and self._stage != "start":
            if self._stage == "stepping":
                self._stage = "logged"
                self.tick(mark.step)
                log.info("%s", self.startup_line())
            elif time.monotonic() - self._last_tick >= self.tick_s:
                self.tick(mark.step)

    def _restored(self) -> dict[str, Any]:
        checkpointer = getattr(self.trainer, "checkpointer", None)
        last = getattr(self.trainer, "last_checkpoint", None)
        return {"restore_s": getattr(checkpointer, "restore_s", 0.0), "checkpoint": last.name if last else None}

    def _extras(self) -> dict[str, Any]:
        checkpointer = getattr(self.trainer, "checkpointer", None)
        return {
            "background_s": getattr(checkpointer, "background_s", 0.0),
            "saves": getattr(checkpointer, "saves", 0),  # for --checkpoint.every-minutes auto and the projection
            "save_stall_s": getattr(checkpointer, "save_stall_s", 0.0),
        }

    def tick(self, step: int) -> None:
        self._last_tick = time.monotonic()
        guard = getattr(self.trainer, "guard", None)
        for rollback in guard.rollbacks[self._rollbacks :] if guard is not None else []:
            self._append("rollback", {"at_step": rollback["at_step"], "restored_step": rollback["restored_step"]})
        self._rollbacks = len(guard.rollbacks) if guard is not None else 0
        self._append("tick", {"step": step, "phases": self.marks.seconds(), **self._extras()})
        self._scalars(step)

    def _scalars(self, step: int) -> None:
        if self.writer is None:
            return
        run = account(self.before + self.mine)
        totals = run.totals
        values = {"goodput/goodput": run.goodput, "goodput/wall_s": run.wall}
        values |= {f"goodput/{k.replace('.', '_')}_s": totals[k] for k in CATEGORIES}
        self.writer.scalars(values, step)

    def startup_line(self) -> str:
        """One line: how long this attempt took to its first step, and on what."""
        one = account(self.before + self.mine).attempts[-1]
        parts = ", ".join(
            f"{k.split('.', 1)[1].replace('_', ' ')} {one.seconds[k]:.1f} s"
            for k in one.seconds
            if k.startswith("startup.")
        )
        return f"start-up {one.startup:.1f} s to the first step ({parts}; goodput ledger {self.run_dir.goodput_ledger})"

    def end(self, reason: str) -> None:
        """The attempt's last record (not reached when killed: its account ends at its last tick)."""
        self._unsubscribe()
        try:
            fields = {"step": self.marks.current.step, "reason": reason, "phases": self.marks.seconds()}
            self._append("end", fields | self._extras(), durable=True)
            self.ledger.close()
        except Exception as e:  # noqa: BLE001 - the ledger must not hide the error that ended the attempt
            log.warning("goodput ledger: the attempt's end was not recorded (%s)", e)


def end_reason(outcome: Any, error: BaseException | None) -> str:
    if error is not None:
        return f"error: {type(error).__name__}"
    if outcome is None:
        return "error: unknown"
    return "preempted" if outcome.preempted else "done"
