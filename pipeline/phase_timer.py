"""Seconds per training phase as the device spent them: host clocks on CPU, CUDA events on a GPU.

On a GPU, forward, backward and the optimizer step only queue kernels: host clocks book a rank's GPU
time wherever the host next waits (the control step's ``tolist``), so every rank's "own work" comes out
equal and a slow GPU is never named, and the data-wait fraction is inflated the same way. Here the
phase marks (``pipeline.faults.watchdog.PhaseMarks.enter``) also call ``mark(phase)`` on a clock:

- :class:`HostClock`: the phase's host time (on CPU the host does the work, so this is the work);
- :class:`CudaEventClock`: a CUDA event recorded on the current stream at each mark. The time between
  two events is what the GPU spent between the two marks: the kernels queued in that phase, or the GPU
  idle while the host had not yet queued them (a late batch is data-wait time on the device too).
  Events are only read in :meth:`totals`, which the trainer calls at control steps and logged steps
  (where it syncs anyway): one ``synchronize`` there, none per step.

Both give cumulative seconds per phase; :class:`PhaseWindow` turns them into "since the last look" for
each consumer (the straggler figures, the progress line and TensorBoard).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the watchdog imports this module; torch is imported where a CUDA clock is made
    import torch

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

    def __init__(self, clock: Callable[[], float] = time.perf_counter, phase: str = "start") -> None:
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
    """Device time per phase from CUDA events (see the module docstring).

    ``event`` makes a timing event (``torch.cuda.Event(enable_timing=True)``; tests pass a fake with
    ``record``, ``synchronize`` and ``elapsed_time`` in milliseconds, as torch's).
    Marks may come from the autograd thread (the gradient-sync hook): ``record`` uses that thread's
    current stream, which autograd sets to the forward's, so the events stay in stream order.
    """

    kind = "cuda-events"

    def __init__(self, event: Callable[[], Any] | None = None, phase: str = "start") -> None:
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


def for_device(device: torch.device, phase: str = "start") -> PhaseClock:
    """CUDA events on a CUDA device (device time), host clocks elsewhere; ``phase``: the one in progress."""
    if device.type == "cuda":
        return CudaEventClock(phase=phase)
    return HostClock(phase=phase)


class PhaseWindow:
    """Seconds per phase since this window's last ``take`` (each consumer holds its own)."""

    def __init__(self, source: Callable[[], dict[str, float]]) -> None:
        self._source = source
        self._seen: dict[str, float] = {}

    def take(self) -> dict[str, float]:
        totals = self._source()
        delta = {k: v - self._seen.get(k, 0.0) for k, v in totals.items() if v - self._seen.get(k, 0.0) > 0}
        self._seen = totals
        return delta


def data_wait_fraction(seconds: dict[str, float], step_phases: tuple[str, ...]) -> float:
    """The share of the step phases' time spent waiting for data (0 when there was none)."""
    total = sum(seconds.get(p, 0.0) for p in step_phases)
    return seconds.get("data", 0.0) / total if total > 0 else 0.0
