"""The straggler verdict on hand-made figures: who is named, when, how often, data or compute, and the
TensorBoard scalars (the end-to-end runs are in test_watchdog.py)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest
import torch

from pipeline.faults.stragglers import FIELDS, StragglerWatch

HOSTS = ["h0", "h1", "h2"]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines() -> Iterator[list[str]]:
    handler, logger = Lines(), logging.getLogger("alexnet")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def _gathered(rows: list[tuple[float, ...]]) -> list[float]:
    """Per rank (step s, data s, waiting s[, alone s]) per step, flattened as the control all-reduce gathers
    them; the seconds alone (data and optimizer step) only matter under tp=2: the data seconds unless given."""
    return [value for row in rows for value in (row if len(row) == 4 else (*row, row[1]))]


# Every rank's step takes 0.45 s (the collectives make them equal); the collectives alone cost 0.05 s (the
# least any rank waits). Rank 1 waits only that: its own work is 0.45 s, the others' 0.45 - 0.30 = 0.15 s.
SLOW_ON_COMPUTE = _gathered([(0.45, 0.03, 0.35), (0.45, 0.0225, 0.05), (0.45, 0.03, 0.35)])
# Rank 1 spends 0.36 s of its 0.45 s waiting for its batches.
SLOW_ON_DATA = _gathered([(0.45, 0.03, 0.35), (0.45, 0.36, 0.05), (0.45, 0.03, 0.35)])
EVEN = _gathered([(0.45, 0.03, 0.05)] * 3)


def _watch(rank: int = 0, threshold: float = 1.5, window: int = 3) -> StragglerWatch:
    return StragglerWatch(rank, 3, HOSTS, threshold, window)


def test_fill_puts_this_ranks_figures_per_step_in_its_slots() -> None:
    watch = StragglerWatch(1, 3, HOSTS, 1.5, 3)
    out = torch.zeros(watch.slots())
    assert len(out) == 12
    seconds = {
        "data": 0.4,
        "forward": 0.2,
        "backward": 0.3,
        "gradient-sync": 0.1,
        "step": 0.1,
        "step-sync": 0.2,
        "control": 0.1,
    }
    watch.fill(out, {**seconds, "validation": 50.0, "checkpoint": 9.0}, steps=2)  # not step phases
    assert out[:4].tolist() == [0, 0, 0, 0] and out[8:].tolist() == [0, 0, 0, 0]
    # step, data, waiting (gradient-sync, the guard's all-reduce, control), alone (data, step), per step
    assert out[4:8].tolist() == pytest.approx([0.7, 0.2, 0.2, 0.25])
    untouched = torch.zeros(watch.slots())
    watch.fill(untouched, seconds, steps=0)  # no step since the last control step
    assert not untouched.any()


def test_a_rank_slow_on_compute_is_named_once_after_the_window(lines: list[str]) -> None:
    watch = _watch(window=3)
    for _ in range(2):
        watch.observe(SLOW_ON_COMPUTE)
    assert lines == []  # 2 slow control steps: not yet
    scalars = watch.observe(SLOW_ON_COMPUTE)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("straggler: rank 1 (host h1) works 0.450 s per step vs a median of 0.150 s "), line
    assert "(3.0x) at 3 control steps in a row" in line, line
    assert re.search(r"it waits 5% of that on data \(others 20%\): slow on compute \(", line), line
    for _ in range(5):
        watch.observe(SLOW_ON_COMPUTE)
    assert len(lines) == 1  # named once while it stays slow
    assert scalars == pytest.approx(
        {
            "perf/rank_work_s_max": 0.45,
            "perf/rank_work_s_median": 0.15,
            "perf/rank_data_wait_fraction_max": 0.2,
            "perf/rank_data_wait_fraction_median": 0.2,
            "perf/slowest_rank": 1.0,
        }
    )


def test_a_rank_slow_on_data_is_named_so(lines: list[str]) -> None:
    watch = _watch(window=1)
    scalars = watch.observe(SLOW_ON_DATA)
    assert len(lines) == 1 and lines[0].startswith("straggler: rank 1 (host h1) works 0.450 s"), lines
    assert re.search(r"it waits 80% of that on data \(others 20%\): slow on data \(", lines[0]), lines[0]
    assert scalars["perf/rank_data_wait_fraction_max"] == pytest.approx(0.8)
    assert scalars["perf/rank_data_wait_fraction_median"] == pytest.approx(0.2)
    assert scalars["perf/slowest_rank"] == 1.0


def test_the_count_restarts_when_a_rank_catches_up_and_it_is_named_again_after_recovering(
    lines: list[str],
) -> None:
    watch = _watch(window=2)
    for figures in (SLOW_ON_COMPUTE, EVEN, SLOW_ON_COMPUTE, EVEN):  # never 2 in a row
        watch.observe(figures)
    assert lines == []
    for figures in (SLOW_ON_COMPUTE, SLOW_ON_COMPUTE, EVEN, SLOW_ON_DATA, SLOW_ON_DATA):
        watch.observe(figures)
    assert len(lines) == 2 and "slow on compute" in lines[0] and "slow on data" in lines[1], lines


def test_even_ranks_and_the_threshold(lines: list[str]) -> None:
    scalars = _watch(window=1).observe(EVEN)
    assert lines == [] and scalars["perf/rank_work_s_max"] == pytest.approx(0.45)
    assert scalars["perf/rank_work_s_median"] == pytest.approx(0.45)
    # Rank 1's own work is 3.0x the others': a threshold of 3 is not exceeded, one just below it is.
    _watch(threshold=3.0, window=1).observe(SLOW_ON_COMPUTE)
    assert lines == []
    _watch(threshold=2.9, window=1).observe(SLOW_ON_COMPUTE)
    assert len(lines) == 1


def test_only_rank_0_logs_but_every_rank_keeps_count(lines: list[str]) -> None:
    watch = _watch(rank=2, window=2)
    for _ in range(3):
        scalars = watch.observe(SLOW_ON_COMPUTE)
    assert lines == [] and watch.named == {1} and scalars["perf/slowest_rank"] == 1.0


def test_nothing_to_judge_without_figures_from_every_rank(lines: list[str]) -> None:
    assert StragglerWatch(0, 1, ["h0"], 1.5, 1).observe([0.4, 0.1, 0.0, 0.1]) == {}  # one rank
    missing = list(SLOW_ON_COMPUTE)
    missing[8] = 0.0  # rank 2 made no step since the last control step
    assert _watch(window=1).observe(missing) == {} and lines == []


# Four ranks, figures exact in binary, threshold 2. Every step takes 1.0 s; the collectives alone cost 0.125 s
# (the least any rank waits: rank 2's). Own work: 0.25, 0.625, 1.0, 0.375 (the others' median 0.375, from unequal values
# placed so that a wrong "other ranks" slice changes it). Rank 2 is slow on data when its data time's excess over
# the others' median (0.375 s x their median data fraction m) is more than half its excess work (0.625 s): its own
# data fraction must pass 0.5 + 0.375 x (m - 0.5), which is 0.5 only when m is. So the others' fractions are chosen
# with m = 0.75 (bound 0.59375) and m = 0.25 (bound 0.40625): "own share above one half" gets the first and the
# third cases wrong, and a median that counts rank 2 itself moves the bound.
WORK = (0.25, 0.625, 1.0, 0.375)
WAITS = (0.875, 0.5, 0.125, 0.75)


def _four(fractions: tuple[float, float, float, float]) -> list[float]:
    return _gathered([(1.0, f * w, wait) for f, w, wait in zip(fractions, WORK, WAITS)])


@pytest.mark.parametrize(
    "fractions, cause",
    [
        ((0.75, 0.875, 0.5625, 0.5), "compute"),  # more than half on data, yet less than the others' share explains
        ((0.75, 0.875, 0.59375, 0.5), "compute"),  # exactly on the bound: not more than half
        ((0.75, 0.875, 0.65625, 0.5), "data"),
        ((0.25, 0.125, 0.4375, 0.5), "data"),  # less than half on data, yet far more than the others
        ((0.25, 0.125, 0.375, 0.5), "compute"),
    ],
)
def test_data_or_compute_is_decided_against_the_other_ranks_median(
    lines: list[str], fractions: tuple[float, float, float, float], cause: str
) -> None:
    watch = StragglerWatch(0, 4, ["h0", "h1"], 2.0, 1)  # host names of two ranks only: "?" for the others
    scalars = watch.observe(_four(fractions))
    share, others = 100 * fractions[2], 100 * sorted(fractions[:2] + fractions[3:])[1]
    assert lines == [
        f"straggler: rank 2 (host ?) works 1.000 s per step vs a median of 0.375 s on the other ranks (2.7x) "
        f"at 1 control steps in a row; it waits {share:.0f}% of that on data (others {others:.0f}%): slow on {cause} "
        + ("(its input pipeline or storage is slow)" if cause == "data" else "(its device, host or process is slow)")
    ]
    middle = sorted(fractions)[1:3]
    assert scalars == pytest.approx(
        {
            "perf/rank_work_s_max": 1.0,
            "perf/rank_work_s_median": 0.5,
            "perf/rank_data_wait_fraction_max": max(fractions),
            "perf/rank_data_wait_fraction_median": sum(middle) / 2,
            "perf/slowest_rank": 2.0,
        }
    )


def test_two_ranks_and_the_exact_threshold(lines: list[str]) -> None:
    figures = _gathered([(0.5, 0.0, 0.25), (0.5, 0.0, 0.0)])  # own work 0.25 and 0.5: exactly 2x
    StragglerWatch(0, 2, HOSTS, 2.0, 1).observe(figures)
    assert lines == []  # not more than 2x
    StragglerWatch(0, 2, HOSTS, 1.5, 1).observe(figures)
    assert len(lines) == 1 and lines[0].startswith("straggler: rank 1 (host h1) works 0.500 s"), lines


def test_a_rank_that_only_waits_and_one_that_counts_more_data_than_work(lines: list[str]) -> None:
    """Rank 0 waited its whole step (own work 0): no division by zero, and rank 1 is not named against a
    median of 0. A rank whose data time exceeds its own work has a data fraction of 1, not more."""
    scalars = StragglerWatch(0, 2, HOSTS, 1.5, 1).observe(_gathered([(0.5, 0.0, 0.5), (0.5, 0.1, 0.0)]))
    assert lines == [] and scalars["perf/rank_work_s_median"] == pytest.approx(0.25), scalars
    assert scalars["perf/rank_data_wait_fraction_max"] == pytest.approx(0.2), scalars
    scalars = StragglerWatch(0, 2, HOSTS, 1.5, 1).observe(_gathered([(0.5, 0.5, 0.3), (0.5, 0.1, 0.0)]))
    assert scalars["perf/rank_data_wait_fraction_max"] == 1.0, scalars


class PairClock:
    """Fake device clocks of two tp pairs (ranks 0+1, 2+3), one step each: every tower collective is a
    rendezvous, so a rank's forward and backward last until its partner's compute is done too."""

    def __init__(self, compute: list[float], data: float = 0.05, step: float = 0.02) -> None:
        self.compute, self.data, self.step = compute, data, step  # compute: forward + backward, per rank alone

    def seconds(self, rank: int) -> dict[str, float]:
        pair = (rank - rank % 2, rank - rank % 2 + 1)
        inside = max(self.compute[r] for r in pair)  # waits in the tower collectives count as forward/backward
        slowest_pair = max(max(self.compute[r] for r in (0, 1)), max(self.compute[r] for r in (2, 3)))
        speed = self.compute[rank] / min(self.compute)  # a slow GPU is slow at everything it runs alone too
        return {
            "data": self.data,
            "forward": inside / 3,
            "backward": 2 * inside / 3,
            "gradient-sync": slowest_pair - inside,  # the dp all-reduce waits for the slowest pair
            "step": self.step * speed,
            "step-sync": 0.001,
            "control": 0.001,
        }


def _pair_figures(clock: PairClock, tp_size: int) -> list[float]:
    out = torch.zeros(4 * FIELDS, dtype=torch.float64)
    for r in range(4):
        StragglerWatch(r, 4, HOSTS, 1.5, 1, tp_size=tp_size).fill(out, clock.seconds(r), steps=1)
    return out.tolist()


@pytest.mark.parametrize("slow_rank", [0, 1, 3])
def test_under_tp2_the_healthy_partner_of_a_slow_gpu_is_not_named(lines: list[str], slow_rank: int) -> None:
    """Rank ``slow_rank``'s GPU computes 3x slower; its partner waits for it inside the tower collectives
    (booked as its own forward and backward), so both pass the threshold: only the slow one is named."""
    compute = [0.2] * 4
    compute[slow_rank] = 0.6
    figures = _pair_figures(PairClock(compute), tp_size=2)
    watch = StragglerWatch(0, 4, HOSTS, 1.5, 1, tp_size=2)
    watch.observe(figures)
    assert watch.named == {slow_rank}, (watch.named, lines)
    assert len(lines) == 1 and lines[0].startswith(f"straggler: rank {slow_rank} "), lines
    # Without the pair rule (what tp=1 reasoning gives) the partner is named too.
    naive = StragglerWatch(0, 4, HOSTS, 1.5, 1)
    naive.observe(figures)
    assert naive.named == {slow_rank, slow_rank ^ 1}


def test_under_tp2_a_pair_with_nothing_to_tell_them_apart_is_named_whole(lines: list[str]) -> None:
    clock = PairClock([0.6, 0.6, 0.2, 0.2])  # both GPUs of pair 0 slow alike: their time alone is equal
    watch = StragglerWatch(0, 4, HOSTS, 1.5, 1, tp_size=2)
    watch.observe(_pair_figures(clock, tp_size=2))
    assert watch.named == {0, 1}


def test_the_divergence_all_reduce_waits_in_a_wait_phase_of_its_own(monkeypatch) -> None:
    """The guard's per-step all-reduce waits for the slowest rank: inside "step-sync" (a wait phase), not in
    "step", which would count that wait as this rank's own work; the optimizer runs in "step" again."""
    import torch.distributed as dist

    from pipeline.faults.config import DivergenceConfig
    from pipeline.faults.divergence import DivergenceGuard
    from pipeline.faults.stragglers import WAIT_PHASES
    from pipeline.phases import STEP_PHASES, PhaseMarks
    from pipeline.train_step import FirstCompile, TrainStep

    marks = PhaseMarks()
    at_reduce: list[str] = []
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: at_reduce.append(marks.current.phase))
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    at_step: list[str] = []
    optimizer.register_step_pre_hook(lambda *a: at_step.append(marks.current.phase))
    guard = DivergenceGuard(DivergenceConfig(), torch.device("cpu"), rank=0, world_size=2, dp_size=2)
    step = TrainStep(
        model, model, optimizer, guard, marks, device=torch.device("cpu"), amp=False, compiles=FirstCompile(False)
    )
    step(torch.randn(2, 4), torch.tensor([0, 1]), lr=0.1, step=0)
    assert at_reduce == ["step-sync"] and at_step == ["step"]
    assert "step-sync" in WAIT_PHASES and "step-sync" in STEP_PHASES
