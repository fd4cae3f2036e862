"""Profiler traces of a running job, on demand: ``python -m launch.profile RUN_DIR --steps N`` or
``--profile.steps A:B`` at start.

The loop calls :meth:`Profiler.step` once per step boundary and nothing else: outside a window that
is one comparison (the loop's speed does not change; figures in docs/BENCHMARKS.md). A request is a
file in the run directory (``profile.request.*``, written like ``launch.lr_drop``'s): global rank 0
finds it at a control step, the control all-reduce tells every rank, and rank 0 broadcasts what was
asked (steps, shapes, stacks) with the trace folder's name, so every rank records the same steps.

In a window every rank runs ``torch.profiler`` (CPU, and CUDA on a GPU) and the trainer's phase marks
(``pipeline.phases``: data, forward, backward, step, control ...), to which it subscribes, become
``record_function`` ranges named ``phase/<name>``: the same marks the watchdog and the straggler
statistics use, so the trace, the summary (``python -m pipeline.tools.profile``) and the straggler
line agree on what a phase is. At the window's end each rank writes ``RUN_DIR/profiles/<time>/rank-N.json``
(Chrome trace format: Perfetto and TensorBoard's trace viewer open it), atomically, with the window's
steps, wall time and the rank's layout in its metadata; rank 0 logs one line saying where.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from basics.files import atomic_output
from pipeline.config import ProfileConfig
from pipeline.phases import Mark, PhaseMarks
from pipeline.run_dir import PROFILE_REQUEST, RunDir
from pipeline.schedule import RequestFiles, write_request

log = logging.getLogger("alexnet")

PHASE_PREFIX = "phase/"  # the record_function ranges of the trainer's phase marks
METADATA_KEY = "alexnet"  # the trace's metadata entry: window steps, wall time, rank, layout
MAX_STEPS = 10000


def request_profile(run_dir: str | Path, steps: int, shapes: bool = False, stacks: bool = False) -> Path:
    """Ask a running job to profile its next ``steps`` steps (what ``launch.profile`` does)."""
    return write_request(run_dir, PROFILE_REQUEST, {"steps": steps, "shapes": shapes, "stacks": stacks})


@dataclass(frozen=True)
class Window:
    """Steps to record: from ``first`` steps done until ``last`` are done; where the traces go."""

    first: int
    last: int
    folder: str
    shapes: bool = False
    stacks: bool = False


class Profiler:
    """One rank's on-demand profiler; a no-op between windows."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: ProfileConfig,
        *,
        rank: int,
        is_main: bool,
        device: torch.device,
        marks: PhaseMarks,
        layout: dict[str, int],
    ):
        self.run_dir = Path(run_dir)
        self.rank, self.is_main, self.device, self.marks, self.layout = rank, is_main, device, marks, layout
        self.requests = RequestFiles(self.run_dir, PROFILE_REQUEST)
        self.window: Window | None = None  # the next or current window
        self._prof: Any = None  # the torch profiler while a window records
        self._range: Any = None  # the open phase range
        self._ranged: Mark | None = None  # the mark the open range began at
        self._unsubscribe: Callable[[], None] | None = None  # ends the subscription to the marks
        self._thread = threading.get_ident()  # phase marks entered elsewhere (an autograd hook thread) make no range
        self._started_at = 0.0
        self._started_step = 0
        span = cfg.window()
        if span is not None:  # one collective at start: the same folder name on every rank
            folder = _agree(_folder_name(span[0]) if is_main else None)
            self.window = Window(span[0], span[1], folder, cfg.shapes, cfg.stacks)

    # ---------------------------------------------------------------- the loop's one call

    def step(self, step: int) -> None:
        """A step boundary (``step`` steps done): opens or closes the window's recording."""
        if self.window is None:
            return
        if self._prof is None and self.window.first <= step < self.window.last:
            self._start(step)
        elif self._prof is not None:
            self._prof.step()
            if step >= self.window.last:
                self._finish(step)

    # ---------------------------------------------------------------- requests (control step)

    def begin(self, step: int, pending: list[Path]) -> None:
        """Every rank, at the control step where some rank (rank 0) saw ``pending`` requests: agree on a window
        of the requested steps from ``step`` on (a collective). Rank 0 settles the request files."""
        spec = None
        if self.is_main:
            asked = [self.requests.read(p) for p in pending]
            steps = max((_steps(a) for a in asked), default=0)
            busy = self._prof is not None or (self.window is not None and self.window.last > step)
            outcome = "rejected" if busy else "started"
            for n, path in enumerate(pending):
                self.requests.settle_as(path, f"profile.{outcome}-step{step}" + (f"-{n}" if n else ""))
            if busy:
                log.warning(
                    "profile request at step %d rejected: a profile of steps up to %d is under way; "
                    "request again after it",
                    step,
                    self.window.last if self.window else step,
                )
            else:
                spec = asdict(
                    Window(
                        step,
                        step + steps,
                        _folder_name(step),
                        any(bool(a.get("shapes")) for a in asked),
                        any(bool(a.get("stacks")) for a in asked),
                    )
                )
        spec = _agree(spec)
        if spec is not None:
            self.window = Window(**spec)

    # ---------------------------------------------------------------- recording

    def _start(self, step: int) -> None:
        from torch.profiler import ProfilerAction, ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        assert self.window is not None
        # A schedule that always records: only with one does torch mark each step (ProfilerStep#N) in the trace.
        self._prof = profile(
            activities=activities,
            schedule=lambda _: ProfilerAction.RECORD,
            record_shapes=self.window.shapes,
            with_stack=self.window.stacks,
        )
        self._prof.step_num = step
        self._prof.start()
        self._started_at, self._started_step = time.perf_counter(), step
        self._unsubscribe = self.marks.subscribe(self._on_mark)  # the phase in progress gets a range at once

    def _on_mark(self, mark: Mark) -> None:
        """The marks' listener while recording: at a new mark or phase, close the previous range, open this one's
        (a tick within the phase is the same range)."""
        if threading.get_ident() != self._thread:
            return
        last = self._ranged
        if last is not None and (last.seq, last.phase) == (mark.seq, mark.phase):
            return
        if self._range is not None:
            self._range.__exit__(None, None, None)
        self._range, self._ranged = torch.profiler.record_function(PHASE_PREFIX + mark.phase), mark
        self._range.__enter__()

    def _finish(self, step: int) -> None:
        """Stop recording and write this rank's trace (a partial window when the run ends inside it)."""
        prof, window = self._prof, self.window
        assert prof is not None and window is not None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range, self._ranged = None, None
        wall = time.perf_counter() - self._started_at
        meta = {
            "first_step": self._started_step,
            "last_step": step,
            "wall_s": wall,
            "rank": self.rank,
            "device": str(self.device),
            **self.layout,
        }
        prof.add_metadata_json(METADATA_KEY, json.dumps(meta))
        prof.stop()
        self._prof, self.window = None, None
        folder = RunDir(self.run_dir).profiles / window.folder
        path = folder / f"rank-{self.rank}.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_output(path) as tmp:
                prof.export_chrome_trace(str(tmp))
        except OSError as e:  # a profile must never end the run
            log.warning("profile: could not write %s (%s); training goes on", path, e)
            return
        if self.is_main:
            log.info(
                "profile of steps %d..%d (%.1f s): one trace per rank in %s (open in https://ui.perfetto.dev; "
                "summary: python -m pipeline.tools.profile %s)",
                self._started_step + 1,
                step,
                wall,
                folder,
                folder,
            )

    def close(self, step: int) -> None:
        """The run ends: a window in progress is written as it is."""
        if self._prof is not None:
            self._finish(step)


def _steps(asked: dict[str, Any]) -> int:
    try:
        steps = int(asked.get("steps", 0))
    except (TypeError, ValueError):
        steps = 0
    return min(max(steps, 1), MAX_STEPS)


def _folder_name(step: int) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-step{step}"


def _agree(value: Any) -> Any:
    """Global rank 0's ``value`` on every rank (a collective; every rank calls it at the same point)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
