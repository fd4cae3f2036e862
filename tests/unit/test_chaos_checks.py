"""The chaos campaign's own logic, without nodes (tests/support/chaos.py): the seeded draw and the checks that
say nothing was lost. The campaign itself runs in tests/integration/test_chaos.py."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support import chaos

KEYS = [f"k{i:02d}" for i in range(16)]  # 2 epochs of 2 steps, 4 ranks x 2 samples
STEPS = {0: {1, 2}, 1: {3, 4}}  # each epoch's global steps


def _write(record: Path, lines_by_rank: dict[int, list[tuple[int, int]]]) -> None:
    """Each rank's lines (epoch, global step); a step's keys are the rank's two of that step's eight."""
    record.mkdir(parents=True, exist_ok=True)
    for rank, lines in lines_by_rank.items():
        with (record / f"rank-{rank}.jsonl").open("w") as f:
            for epoch, step in lines:
                in_epoch = (step - 1) % 2
                keys = KEYS[in_epoch * 8 + 2 * rank : in_epoch * 8 + 2 * rank + 2]
                f.write(json.dumps({"epoch": epoch, "step": step, "keys": keys}) + "\n")


def test_the_same_seed_draws_the_same_faults_and_another_seed_others() -> None:
    kinds, n = list(chaos.DEFAULT_KINDS), len(chaos.DEFAULT_KINDS)
    first = [(f.kind, f.step, f.target) for f in chaos.draw(7, kinds, n, 18)]
    assert first == [(f.kind, f.step, f.target) for f in chaos.draw(7, kinds, n, 18)]
    assert first != [(f.kind, f.step, f.target) for f in chaos.draw(8, kinds, n, 18)]
    assert sorted(k for k, _, _ in first) == sorted(kinds)  # each kind once before any repeats
    steps = [s for _, s, _ in first]
    assert steps == sorted(steps) and len(set(steps)) == n and 2 <= min(steps) and max(steps) <= 15


def test_a_replay_after_a_resume_counts_once(tmp_path: Path) -> None:
    # rank lines: steps 1, 2, 3, then a kill; the resume from the checkpoint at step 2 trains 3 and 4 again
    run = [(0, 1), (0, 2), (1, 3), (0, 2), (1, 3), (1, 4)]
    _write(tmp_path, {r: run for r in range(4)})
    assert [s for _, s, _ in chaos.consumed(tmp_path)[0]] == [1, 2, 3, 4]
    assert chaos.accounting(tmp_path, KEYS, STEPS) == []


def test_a_lost_batch_and_a_repeated_one_are_named(tmp_path: Path) -> None:
    # rank 1 jumps from step 2 to 4 (a resume past a batch it never trained on)
    whole = [(0, 1), (0, 2), (1, 3), (1, 4)]
    _write(tmp_path, {0: whole, 1: [(0, 1), (0, 2), (1, 4)], 2: whole, 3: whole})
    problems = chaos.accounting(tmp_path, KEYS, STEPS)
    assert problems == [
        "rank 1 never trained on the batches of steps [3]",
        "epoch 1: 2 samples never seen ['k02', 'k03'], 0 seen twice",
    ], problems
    twice = tmp_path / "twice"
    _write(twice, {r: [(0, 1), (0, 2), (1, 3), (1, 4)] for r in range(4)})
    with (twice / "rank-3.jsonl").open("a") as f:  # rank 3 trains on rank 0's samples at step 4
        f.write(json.dumps({"epoch": 1, "step": 5, "keys": KEYS[8:10]}) + "\n")
    assert any("epoch 1: 0 samples never seen [], 2 seen twice" in p for p in chaos.accounting(twice, KEYS, STEPS))


def test_a_rank_is_handed_no_batch_past_the_campaigns_gate(tmp_path: Path, monkeypatch) -> None:
    """A chaos rank waits before the batch of a step past ``control/gate`` (so the run cannot race past a fault
    the campaign has not injected yet) and goes on when the campaign moves it."""
    from tests.support import chaos_rank

    class Inner(list):
        steps_in_epoch = 4

    handed: list[int] = []
    waited: list[int] = []

    def campaign_moves_the_gate(seconds: float) -> None:  # the rank's wait: the campaign moves the gate by one
        waited.append(len(handed))
        (tmp_path / "gate").write_text(str(int((tmp_path / "gate").read_text()) + 1))

    monkeypatch.setattr(chaos_rank.time, "sleep", campaign_moves_the_gate)
    (tmp_path / "gate").write_text("2")
    loader = chaos_rank.Chaotic(
        Inner([(i, None) for i in range(4)]),
        first_step=0,
        epoch=0,
        keys=lambda k: [],
        rank=1,
        control=tmp_path,
        record=None,
    )
    for images, _ in loader:
        handed.append(images)
    assert handed == [0, 1, 2, 3] and waited == [2, 3]
