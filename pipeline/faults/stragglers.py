"""Stragglers: which rank the others wait for, and whether it waits on its data or on its compute.

In synchronous data parallelism every rank's step takes as long as the slowest rank's: the fast ranks
spend the difference waiting for the gradient all-reduce (the trainer's "gradient-sync" phase, from
the moment its own backward computed the last gradient to the end of ``backward``) and in the control
all-reduce. So each rank reports its seconds per step in data, in those waits and in all; the least
time any rank spent waiting is what the collectives cost by themselves, and a rank's *own work* per
step is its step time less its excess over that least. A rank whose own work exceeds
``threshold`` x the other ranks' median at ``window`` control steps in a row is named once (again
only after it has recovered). The figures travel in the trainer's control all-reduce (a MAX over
per-rank slots, which gathers them), so they cost no collective of their own. On a GPU the seconds are
device time (``pipeline.phases``: CUDA events at the phase marks): host clocks would book a rank's
queued kernels as waiting in control, make every rank's own work equal and never name a slow GPU.

Under tp=2 the towers of a pair exchange activations inside forward and backward (the tower collectives),
so a slow GPU's healthy partner waits there, in what counts as its own work: both would pass the
threshold. Within a pair that is slow together, the rank whose time outside any collective (its data
and its optimizer step, :data:`ALONE_PHASES`) is the shorter is the one waiting, and is not named; where
those are equal both are (nothing tells them apart).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

import torch

from pipeline.phases import STEP_PHASES

log = logging.getLogger("alexnet")

# Seconds per step each rank reports: the STEP_PHASES only (validation, checkpoints, set-up excluded).
WAIT_PHASES = ("gradient-sync", "step-sync", "control")  # where a rank waits for the others
ALONE_PHASES = ("data", "step")  # what a rank does with no collective inside: no waiting for a partner there
FIELDS = 4  # step seconds, data seconds, waiting seconds, seconds alone (ALONE_PHASES), per step


@dataclass
class StragglerWatch:
    rank: int
    world_size: int
    hosts: list[str]
    threshold: float
    window: int
    tp_size: int = 1  # 2: ranks 2k and 2k + 1 are the towers of one pair (pipeline.mesh)
    slow_runs: list[int] = field(default_factory=list)  # consecutive slow control steps per rank
    named: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.slow_runs = [0] * self.world_size

    def slots(self) -> int:
        return FIELDS * self.world_size

    def fill(self, out: torch.Tensor, seconds: dict[str, float], steps: int) -> None:
        """This rank's figures into its slots of ``out`` (zeros elsewhere), per step."""
        if steps <= 0:
            return
        per = [
            sum(seconds.get(p, 0.0) for p in STEP_PHASES) / steps,
            seconds.get("data", 0.0) / steps,
            sum(seconds.get(p, 0.0) for p in WAIT_PHASES) / steps,
            sum(seconds.get(p, 0.0) for p in ALONE_PHASES) / steps,
        ]
        out[FIELDS * self.rank : FIELDS * (self.rank + 1)] = torch.tensor(per, dtype=out.dtype, device=out.device)

    def observe(self, gathered: list[float]) -> dict[str, float]:
        """Every rank's figures (after the all-reduce): names a persistent straggler; TensorBoard scalars."""
        rows = [gathered[FIELDS * r : FIELDS * (r + 1)] for r in range(self.world_size)]
        if self.world_size < 2 or any(row[0] <= 0 for row in rows):
            return {}
        least_wait = min(row[2] for row in rows)
        work = [row[0] - (row[2] - least_wait) for row in rows]
        data_fraction = [min(row[1] / w, 1.0) if w > 0 else 0.0 for row, w in zip(rows, work)]
        medians = [statistics.median(work[:r] + work[r + 1 :]) for r in range(self.world_size)]
        slow = [m > 0 and work[r] > self.threshold * m for r, m in enumerate(medians)]
        slow = self._excuse_waiting_partners(slow, [row[3] for row in rows])
        for r in range(self.world_size):
            others = medians[r]
            self.slow_runs[r] = self.slow_runs[r] + 1 if slow[r] else 0
            if not slow[r]:
                self.named.discard(r)
            elif self.slow_runs[r] >= self.window and r not in self.named:
                self.named.add(r)
                if self.rank == 0:
                    log.warning("%s", self._line(r, work, data_fraction, others))
        slowest = max(range(self.world_size), key=lambda r: work[r])
        return {
            "perf/rank_work_s_max": max(work),
            "perf/rank_work_s_median": statistics.median(work),
            "perf/rank_data_wait_fraction_max": max(data_fraction),
            "perf/rank_data_wait_fraction_median": statistics.median(data_fraction),
            "perf/slowest_rank": float(slowest),
        }

    def _excuse_waiting_partners(self, slow: list[bool], alone: list[float]) -> list[bool]:
        """Under tp=2, of a pair slow together, the partner that spends less time alone waits for the other
        inside the tower collectives: it is not slow itself."""
        if self.tp_size != 2:
            return slow
        out = list(slow)
        for a in range(0, self.world_size - 1, 2):
            b = a + 1
            if slow[a] and slow[b] and alone[a] != alone[b]:
                out[a if alone[a] < alone[b] else b] = False
        return out

    def _line(self, r: int, work: list[float], data_fraction: list[float], others: float) -> str:
        median_data = statistics.median(data_fraction[:r] + data_fraction[r + 1 :])
        on_data = work[r] * data_fraction[r] - others * median_data > 0.5 * (work[r] - others)
        cause = (
            "on data (its input pipeline or storage is slow)"
            if on_data
            else "on compute (its device, host or process is slow)"
        )
        host = self.hosts[r] if r < len(self.hosts) else "?"
        return (
            f"straggler: rank {r} (host {host}) works {work[r]:.3f} s per step vs a median of {others:.3f} s "
            f"on the other ranks ({work[r] / others:.1f}x) at {self.slow_runs[r]} control steps in a row; "
            f"it waits {100 * data_fraction[r]:.0f}% of that on data (others {100 * median_data:.0f}%): "
            f"slow {cause}"
        )
