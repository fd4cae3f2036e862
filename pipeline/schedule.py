"""The paper's learning-rate schedule: divide by 10 when validation error stops improving.

The paper adjusted the rate by hand ("the heuristic which we followed was to divide the learning
rate by 10 when the validation error rate stopped improving with the current learning rate ...
reduced three times prior to termination"). Three ways to get that here:

- ``manual``: an operator runs ``python -m launch.lr_drop RUN_DIR`` while the job runs; the
  request is a file in the run directory that rank 0 notices, and the decision reaches every rank
  through a collective, so all ranks drop at the same step boundary. Honoured under every policy.
- ``plateau``: the paper's rule written down: after a validation, if top-1 error has not improved
  on the best so far by more than ``threshold`` for ``patience`` validations in a row, drop.
- ``milestones``: fixed epochs (torchvision's reference recipe uses every 30 epochs).

At most ``max_drops`` drops (the paper: three). The history of drops (step, epoch, reason, new
rate) is part of the checkpoint and logged to TensorBoard. An optional linear warm-up (off in the
paper's recipe) scales the rate during the first ``warmup_epochs``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from basics.errors import UserError
from basics.files import write_json_atomic
from pipeline.options import Check, Section, at_least, finite, one_of, option
from pipeline.run_dir import LR_DROP_REQUEST

POLICIES = ("plateau", "milestones", "manual")


@dataclass
class ScheduleConfig(Section):
    policy: str = option("plateau", one_of(*POLICIES))
    """plateau (the paper's rule), milestones (fixed epochs) or manual (operator requests only)"""
    factor: float = option(0.1, Check(lambda x: 0 < x < 1, "in (0, 1)"))
    """multiply the learning rate by this at each drop (the paper: divide by 10)"""
    max_drops: int = option(3, at_least(0))
    """stop dropping after this many (the paper: three times over ~90 epochs)"""
    patience: int = option(5, at_least(1))
    """plateau: validations without improvement before a drop"""
    threshold: float = option(0.001, Check(lambda x: 0 <= x < 1, "in [0, 1)"))
    """plateau: top-1 error must fall by more than this (absolute, 0..1) to count as improvement"""
    milestones: list[int] = option(
        factory=lambda: [30, 60, 80], check=Check(lambda x: min(x, default=0) >= 0, "epochs >= 0")
    )
    """milestones: drop at the start of these epochs"""
    warmup_epochs: float = option(0.0, finite(0))
    """linear warm-up from 0 over this many epochs (0 = none, as the paper)"""


class LRSchedule:
    """Learning rate as a function of progress and of the drops taken so far."""

    def __init__(self, cfg: ScheduleConfig, base_lr: float):
        self.cfg = cfg
        self.base_lr = base_lr
        self.drops: list[dict[str, Any]] = []
        self.best_error: float | None = None
        self.bad_validations = 0

    def lr(self, epoch_progress: float) -> float:
        """Rate at a point measured in (fractional) epochs since the start of training."""
        rate = self.base_lr * self.cfg.factor ** len(self.drops)
        if self.cfg.warmup_epochs > 0 and epoch_progress < self.cfg.warmup_epochs:
            rate *= (epoch_progress + 1e-8) / self.cfg.warmup_epochs
        return rate

    def can_drop(self) -> bool:
        return len(self.drops) < self.cfg.max_drops

    def drop(self, *, step: int, epoch: int, reason: str) -> bool:
        """Take one drop now; False when the budget of drops is used up."""
        if not self.can_drop():
            return False
        self.drops.append(
            {
                "step": step,
                "epoch": epoch,
                "reason": reason,
                "lr": self.base_lr * self.cfg.factor ** (len(self.drops) + 1),
            }
        )
        self.bad_validations = 0
        return True

    def on_epoch_start(self, *, epoch: int, step: int) -> bool:
        """Milestone drops; an epoch passed over by a resume is not dropped for twice."""
        if self.cfg.policy != "milestones":
            return False
        done = {d["epoch"] for d in self.drops if d["reason"] == "milestone"}
        if epoch in self.cfg.milestones and epoch not in done:
            return self.drop(step=step, epoch=epoch, reason="milestone")
        return False

    def on_validation(self, *, top1_error: float, epoch: int, step: int) -> bool:
        """The plateau rule; returns whether the rate dropped."""
        if self.best_error is None or top1_error < self.best_error - self.cfg.threshold:
            self.best_error = top1_error if self.best_error is None else min(self.best_error, top1_error)
            self.bad_validations = 0
            return False
        self.best_error = min(self.best_error, top1_error)
        self.bad_validations += 1
        if self.cfg.policy == "plateau" and self.bad_validations >= self.cfg.patience:
            return self.drop(step=step, epoch=epoch, reason="plateau")
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "drops": list(self.drops),
            "best_error": self.best_error,
            "bad_validations": self.bad_validations,
            "base_lr": self.base_lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drops = list(state["drops"])
        self.best_error = state["best_error"]
        self.bad_validations = int(state["bad_validations"])


def request_manual_drop(run_dir: str | Path, note: str = "") -> Path:
    """Ask a running job to drop its rate at its next control step (what ``launch.lr_drop`` does).

    Each request is its own file, so two requests are two files and the job reports both.
    """
    return write_request(run_dir, LR_DROP_REQUEST, {"note": note})


def write_request(run_dir: str | Path, name: str, payload: dict[str, Any]) -> Path:
    """An operator's request to a running job: ``RUN_DIR/<name>.<time>-<pid>``, written atomically, which
    global rank 0 finds at a control step (:class:`RequestFiles`). ``launch.lr_drop`` and ``launch.profile``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory; pass the job's --run-dir")
    path = run_dir / f"{name}.{time.time_ns()}-{os.getpid()}"
    try:
        write_json_atomic(path, {"requested_at": time.time(), **payload})
    except OSError as e:
        raise UserError(f"{path}: cannot write the request ({e.strerror or e}); check permissions") from None
    return path


class RequestFiles:
    """Operators' requests of one kind (``name``) in a run directory, as rank 0 sees them at a control step."""

    def __init__(self, run_dir: str | Path, name: str):
        self.run_dir = Path(run_dir)
        self.name = name

    def pending(self) -> list[Path]:
        """Request files, oldest first; anything odd (a directory of that name, unreadable dir) is skipped."""
        try:
            found = [p for p in self.run_dir.glob(self.name + ".*") if p.is_file() and not p.is_symlink()]
        except OSError:
            return []
        return sorted(found, key=lambda p: p.name)

    @staticmethod
    def read(path: Path) -> dict[str, Any]:
        """A request's content ({} when unreadable: the request still counts, with its defaults)."""
        try:
            content = json.loads(path.read_text()[:4096])
        except (OSError, ValueError):
            return {}
        return content if isinstance(content, dict) else {}

    def settle_as(self, path: Path, new_name: str) -> None:
        """Rename a handled request after what became of it (so it is not handled twice)."""
        try:
            os.replace(path, self.run_dir / new_name)
        except OSError:
            pass  # gone or unwritable: the decision is made and reported either way


class ManualRequests(RequestFiles):
    """Operators' LR-drop requests in a run directory, as rank 0 sees them at a control step."""

    def __init__(self, run_dir: str | Path):
        super().__init__(run_dir, LR_DROP_REQUEST)

    def settle(self, requests: list[Path], *, step: int, applied: bool, max_drops: int) -> str:
        """Rename each request after what became of it; returns a line worth reporting ('' if none)."""
        notes = [self.read(p).get("note", "") or p.name for p in requests]
        outcomes = ["applied"] + ["merged"] * (len(requests) - 1) if applied else ["rejected"] * len(requests)
        for n, (path, outcome) in enumerate(zip(requests, outcomes)):
            self.settle_as(path, f"lr_drop.{outcome}-step{step}" + (f"-{n}" if n else ""))
        if not applied:
            return (
                f"LR-drop request at step {step} rejected: all {max_drops} drops are used up "
                f"(--schedule.max-drops); notes: {'; '.join(notes)}"
            )
        if len(requests) > 1:
            return (
                f"{len(requests)} LR-drop requests were pending at step {step}: applied one drop, the other "
                f"{len(requests) - 1} merged into it (request again for another drop); notes: {'; '.join(notes)}"
            )
        return ""
