"""Phases: where each rank is in its work, the seconds it spends there, and who is told.

**The rule: every rank enters the same marks in the same order.** A mark (:meth:`PhaseMarks.enter`)
counts: the progress watchdog (``pipeline.faults.watchdog``) names the rank that entered the fewest as
the one the others wait for, which is right only while every rank's count means the same point of the
same code path. So:

- a collective (an all-reduce, a broadcast, a checkpoint's plan exchange) is preceded by a mark that
  every rank enters, whatever it did before (a rank with no validation batches still enters
  "validation" once: :meth:`PhaseMarks.ticking`);
- what only some ranks do, or do a different number of times (a validation batch, rank 0's commit of a
  checkpoint while the others wait for it, the state of a background writer), is a *tick*
  (:meth:`PhaseMarks.tick`): progress, and possibly a new phase name, without a mark.

``tests/integration/test_phases.py`` runs two ranks through training, validation and a save and compares their marks.

A phase's name also says how long a rank may stay in it without progress (:class:`Allowance`): seconds
in a training step, minutes where single steps are legitimately slow (:data:`SLOW_PHASES`).

Seconds per phase come from a clock that every mark also moves (:class:`HostClock` on CPU,
:class:`CudaEventClock` on a GPU, see there), read through :meth:`PhaseMarks.window`: each reader (the
straggler figures, the progress line) gets its own "since the last look".

Whoever wants to know of each mark and tick (the watchdog's record, the profiler's trace ranges, later a
goodput ledger) registers one listener with :meth:`PhaseMarks.subscribe`; it is called in the thread that
entered the mark (the training thread; autograd's for "gradient-sync"), so it must be quick.

This module is the bottom of ``pipeline``: it imports nothing of the project but the standard library and
torch, and everything that times or watches a step imports it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:  # torch is imported where a CUDA clock is made: the tests of this module need none
    import torch

T = TypeVar("T")


class Phase(StrEnum):
    """Every phase a rank can be in (members are their names: ``Phase.DATA == "data"``)."""

    START = "start"  # from process start to the trainer's first mark: model build, resume
    LOADER = "loader"  # an input pipeline's start-up (shard verification), until its first batch
    DATA = "data"  # waiting for the next training batch
    COMPILE = "compile"  # the first training step and the first validation batch under --model.compile
    FORWARD = "forward"
    BACKWARD = "backward"
    GRADIENT_SYNC = "gradient-sync"  # conv1's gradient is done: only DDP's all-reduce is left of the backward
    STEP = "step"  # the divergence guard's own figures and the optimizer
    STEP_SYNC = "step-sync"  # the divergence guard's all-reduce (loss, gradient norm): waiting for the other ranks
    CONTROL = "control"  # the control all-reduce (stop, LR drop, save, divergence, straggler figures)
    VALIDATION = "validation"  # validation batches (ticks: ranks may get different numbers)
    VALIDATION_SYNC = "validation-sync"  # the all-reduce of the validation counts
    CHECKPOINT = "checkpoint"  # a save's disk work
    CHECKPOINT_SYNC = "checkpoint-sync"  # a save's collectives


PHASES = frozenset(Phase)
# Phases whose single steps may legitimately take long: start-up (model build, resume), an epoch's
# input pipeline set-up (shard verification), a checkpoint's disk work. A checkpoint's collectives
# (the finite check, DCP's plan and metadata exchange, the outcome's all-gather) are "checkpoint-sync"
# and get the step allowance: a hung collective there is no slower than one in a training step.
# "compile": the first training step and the first validation batch under --model.compile (every rank
# compiles at once on the node's shared CPUs; a slow compile is not a hang, and a restart compiles again).
SLOW_PHASES = frozenset({Phase.START, Phase.LOADER, Phase.CHECKPOINT, Phase.COMPILE})
# One training step's phases (the straggler figures and the data-wait fraction are shares of them).
STEP_PHASES = (
    Phase.DATA,
    Phase.FORWARD,
    Phase.BACKWARD,
    Phase.GRADIENT_SYNC,
    Phase.STEP,
    Phase.STEP_SYNC,
    Phase.CONTROL,
)


@dataclass(frozen=True)
class Allowance:
    """Seconds without progress after which a rank counts as stuck."""

    step_s: float  # every phase not in SLOW_PHASES (validation: per batch)
    slow_s: float  # SLOW_PHASES

    def for_phase(self, phase: str) -> float:
        return self.slow_s if phase in SLOW_PHASES else self.step_s


# ---------------------------------------------------------------------------------------- the marks


@dataclass(frozen=True, slots=True)
class Mark:
    """Where a rank is: replaced as a whole at each mark or tick, so another thread reads it consistently."""

    seq: int  # marks entered so far (ticks do not count): comparable across ranks by the rule above
    step: int  # training steps done at the last mark that named one
    phase: str  # a Phase
    progress_at: float  # wall time (time.time) of the last mark or tick


Listener = Callable[[Mark], None]


class PhaseMarks:
    """One rank's marks (see the module docstring); entered by the training thread (and autograd's)."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall  # tests pass a fake clock
        self.current = Mark(0, 0, Phase.START, wall())
        self._listeners: tuple[Listener, ...] = ()
        self._lock = threading.Lock()  # subscribe/unsubscribe only: a mark reads the tuple without it
        self.use_clock(HostClock())

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with the current mark now and with each new one (mark or tick) until the returned
        function is called. Subscribe before marks are entered or from the thread that enters them: a mark
        entered meanwhile by another thread may reach the listener before the current one does."""
        with self._lock:
            self._listeners = (*self._listeners, listener)
        listener(self.current)

        def unsubscribe() -> None:
            with self._lock:
                self._listeners = tuple(x for x in self._listeners if x is not listener)

        return unsubscribe

    def _publish(self, mark: Mark) -> None:
        self.current = mark
        for listener in self._listeners:
            listener(mark)

    def enter(self, phase: str, step: int | None = None) -> None:
        """A mark: ``phase`` starts now (every rank enters the same marks in the same order)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r} (pipeline.phases.Phase names them)")
        self._clock.mark(phase)
        last = self.current
        self._publish(Mark(last.seq + 1, last.step if step is None else step, phase, self._wall()))

    def tick(self, phase: str | None = None) -> None:
        """Progress inside a phase (a validation batch) without a new mark: ranks may tick unequally.
        ``phase``: the phase changes too, still without a mark: the first compiled batch is over, or a
        phase only this rank enters (rank 0's commit of a checkpoint while the others wait for it), so every
        rank's mark count stays comparable."""
        last = self.current
        if phase is not None and phase != last.phase:
            if phase not in PHASES:
                raise ValueError(f"unknown phase {phase!r} (pipeline.phases.Phase names them)")
            self._clock.mark(phase)
        self._publish(Mark(last.seq, last.step, phase or last.phase, self._wall()))

    def iterate(self, items: Iterable[T], phase: str, first: str | None = None) -> Iterator[T]:
        """``items`` with ``phase`` entered before each ``next`` (the wait for a batch is that phase);
        ``first``: the phase of the first ``next`` instead (an input pipeline's start-up)."""
        it = iter(items)
        while True:
            self.enter(first or phase)
            first = None
            try:
                item = next(it)
            except StopIteration:
                return
            yield item

    def ticking(self, items: Iterable[T], phase: str, first: str | None = None) -> Iterator[T]:
        """``items``; ``phase`` entered when the first arrives (or when there are none: every rank enters
        it once), each later arrival a tick (ranks may get different numbers of items); ``first``: the
        phase of the first item's work instead (a compile), ``phase`` from the second arrival on."""
        entered = False
        for item in items:
            if entered:
                self.tick(phase)
            else:
                self.enter(first or phase)
                entered = True
            yield item
        if not entered:
            self.enter(phase)

    # -- seconds per phase

    def use_clock(self, clock: PhaseClock) -> None:
        """Where phase seconds come from from now on (:func:`clock_for`: CUDA events on a GPU)."""
        self._clock = clock
        self._stragglers = PhaseWindow(self.seconds)

    def time_on(self, device: torch.device) -> None:
        """Phase seconds as ``device`` spends them from now on (the phase in progress goes on)."""
        self.use_clock(clock_for(device, self.current.phase))

    def seconds(self) -> dict[str, float]:
        """Seconds per phase since the clock started, the phase in progress counted up to now."""
        return self._clock.totals()

    def window(self) -> PhaseWindow:
        """A reader's own "seconds per phase since my last look" (the progress line's data-wait fraction)."""
        return PhaseWindow(self.seconds)

    def take_seconds(self) -> dict[str, float]:
        """Seconds per phase since the last call: the straggler figures' window, read at control steps."""
        return self._stragglers.take()


# ---------------------------------------------------------------------------------------- the clocks
#
# On a GPU, forward, backward and the optimizer step only queue kernels: host clocks book a rank's GPU
# time wherever the host next waits (the control step's ``tolist``), so every rank's "own work" comes out
# equal and a slow GPU is never named, and the data-wait fraction is inflated the same way. So each mark
# also calls ``mark(phase)`` on a clock:
#
# - HostClock: the phase's host time (on CPU the host does the work, so this is the work);
# - CudaEventClock: a CUDA event recorded on the current stream at each mark. The time between two events
#   is what the GPU spent between the two marks: the kernels queued in that phase, or the GPU idle while
#   the host had not yet queued them (a late batch is data-wait time on the device too). Events are only
#   read in ``totals``, which the trainer calls at control steps and logged steps (where it syncs anyway):
#   one ``synchronize`` there, none per step.

# Marks kept between reads at most: folded (one sync) beyond it, so a long gap between reads cannot grow memory.
MAX_PENDING = 4096


class PhaseClock(Protocol):
    kind: str

    def mark(self, phase: str) -> None:
        """``phase`` starts now (the previous one ends)."""

    def totals(self) -> dict[str, float]:
        """Seconds per phase since the clock started, the phase in progress counted up to now."""


class HostClock:
    """Host wall time per phase (``time.perf_counter`` unless a test passes its own clock)."""

    kind = "host"

    def __init__(self, clock: Callable[[], float] = time.perf_counter, phase: str = Phase.START) -> None:
        self._clock = clock
        self._phase, self._since = phase, clock()
        self._totals: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = self._clock()
        self._totals[self._phase] = self._totals.get(self._phase, 0.0) + now - self._since
        self._phase, self._since = phase, now

    def totals(self) -> dict[str, float]:
        self.mark(self._phase)
        return dict(self._totals)


class CudaEventClock:
    """Device time per phase from CUDA events (see the comment above :class:`PhaseClock`).

    ``event`` makes a timing event (``torch.cuda.Event(enable_timing=True)``; tests pass a fake with
    ``record``, ``synchronize`` and ``elapsed_time`` in milliseconds, as torch's).
    Marks may come from the autograd thread (the gradient-sync hook): ``record`` uses that thread's
    current stream, which autograd sets to the forward's, so the events stay in stream order.
    """

    kind = "cuda-events"

    def __init__(self, event: Callable[[], Any] | None = None, phase: str = Phase.START) -> None:
        if event is None:
            import torch

            def event() -> Any:
                return torch.cuda.Event(enable_timing=True)

        self._new_event = event
        self._free: list[Any] = []
        self._pending: list[tuple[str, Any]] = [(phase, self._recorded())]
        self._totals: dict[str, float] = {}

    def _recorded(self) -> Any:
        event = self._free.pop() if self._free else self._new_event()
        event.record()
        return event

    def mark(self, phase: str) -> None:
        self._pending.append((phase, self._recorded()))
        if len(self._pending) > MAX_PENDING:
            self.totals()

    def totals(self) -> dict[str, float]:
        current = self._pending[-1][0]
        now = self._recorded()
        now.synchronize()  # the one host sync: every earlier event on the stream is complete too
        marks = [*self._pending, (current, now)]
        for (phase, start), (_, end) in zip(marks, marks[1:]):
            self._totals[phase] = self._totals.get(phase, 0.0) + start.elapsed_time(end) / 1000.0
        self._free.extend(event for _, event in self._pending)
        self._pending = [(current, now)]
        return dict(self._totals)


def clock_for(device: torch.device, phase: str = Phase.START) -> PhaseClock:
    """CUDA events on a CUDA device (device time), host clocks elsewhere; ``phase``: the one in progress."""
    if device.type == "cuda":
        return CudaEventClock(phase=phase)
    return HostClock(phase=phase)


class PhaseWindow:
    """Seconds per phase since this window's last ``take`` (each reader holds its own)."""

    def __init__(self, source: Callable[[], dict[str, float]]) -> None:
        self._source = source
        self._seen: dict[str, float] = {}

    def take(self) -> dict[str, float]:
        totals = self._source()
        delta = {k: v - self._seen.get(k, 0.0) for k, v in totals.items() if v - self._seen.get(k, 0.0) > 0}
        self._seen = totals
        return delta


def data_wait_fraction(seconds: dict[str, float], step_phases: tuple[str, ...] = STEP_PHASES) -> float:
    """The share of the step phases' time spent waiting for data (0 when there was none)."""
    total = sum(seconds.get(p, 0.0) for p in step_phases)
    return seconds.get(Phase.DATA, 0.0) / total if total > 0 else 0.0
