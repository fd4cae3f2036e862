"""A run's goodput projected at larger node counts, for a stated per-node failure rate.

A job of N nodes fails N times as often as one node (job MTBF M = node MTBF / N: failures are independent and
any one stops the job, as in Meta's "Revisiting Reliability in Large-Scale ML Research Clusters"). At each size
the checkpoint interval is Young/Daly's T = sqrt(2 C M) for the run's measured mean save stall C, and the
share of the wall-clock each cost takes is, to first order:

- checkpoint saves: C / T (one stall every interval);
- lost work: T / (2 M) (a failure comes on average half an interval after the last save);
- each part of a restart (start-up, hang detection, the gap until the next attempt): its seconds / M, at the
  run's measured mean per restart (attempts after the first; without one, the first attempt's start-up and
  neither hang detection nor gap).

The rest of the run's badput (data waits, validation, the first start-up, the unmarked rest) is taken to keep
its measured share: the run's *steady* goodput, its kept time over the wall-clock less the costs above.
Projected goodput = steady x (1 - the shares above), 0 where they reach 1 (the first-order model then no
longer holds: the job rarely gets an interval's work done between failures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.goodput.account import RunAccount
from pipeline.goodput.interval import young_daly_minutes

RESTART_PARTS = ("start-up", "hang detection", "gap")
SHARES = ("checkpoint", "lost work", *RESTART_PARTS)


@dataclass
class Measured:
    """What the projection takes from a run's ledger."""

    save_stall_s: float  # mean stall of a save
    saves: int
    restart_s: dict[str, float]  # RESTART_PARTS: mean seconds per restart
    restarts: int  # the attempts after the first the means come from (0: the first attempt's start-up)
    steady: float  # kept over the wall-clock less checkpoint stalls, lost work and restarts


def measure(run: RunAccount, saves: int, stall_s: float) -> Measured:
    """``saves`` and their summed ``stall_s`` as the ledger records them (``interval.history``)."""
    restarts = run.attempts[1:]
    pool = restarts or run.attempts[:1]
    restart_s = {
        "start-up": sum(a.startup for a in pool) / len(pool),
        "hang detection": sum(a.seconds["hang_detection"] for a in restarts) / len(pool),
        "gap": sum(a.seconds["gap"] for a in restarts) / len(pool),
    }
    totals = run.totals
    failure_costs = totals["checkpoint"] + totals["lost"] + totals["hang_detection"] + totals["gap"]
    failure_costs += sum(a.startup for a in restarts)
    rest = run.wall - failure_costs
    return Measured(
        save_stall_s=stall_s / saves if saves else 0.0,
        saves=saves,
        restart_s=restart_s,
        restarts=len(restarts),
        steady=totals["kept"] / rest if rest > 0 else 0.0,
    )


@dataclass
class Projection:
    nodes: int
    mtbf_s: float  # the job's
    interval_s: float
    shares: dict[str, float]  # SHARES: of the wall-clock
    goodput: float

    def as_json(self) -> dict[str, Any]:
        return vars(self)


def project(measured: Measured, nodes: int, node_mtbf_h: float) -> Projection:
    mtbf = node_mtbf_h * 3600 / nodes
    interval = young_daly_minutes(measured.save_stall_s, mtbf) * 60
    shares = {"checkpoint": measured.save_stall_s / interval, "lost work": interval / (2 * mtbf)}
    shares |= {part: measured.restart_s[part] / mtbf for part in RESTART_PARTS}
    goodput = measured.steady * max(0.0, 1.0 - sum(shares.values()))
    return Projection(nodes, mtbf, interval, shares, goodput)


def fastest(projections: list[Projection]) -> tuple[str, float, float]:
    """The cost whose share grows most from the smallest size to the largest: (name, share at the smallest,
    share at the largest)."""
    small, large = min(projections, key=lambda p: p.nodes), max(projections, key=lambda p: p.nodes)
    name = max(SHARES, key=lambda k: large.shares[k] - small.shares[k])
    return name, small.shares[name], large.shares[name]
