"""The phase marks (pipeline/phases.py): the rule that every rank enters the same marks in the same order, on
two real ranks through training, validation and saves; marks and ticks; seconds per phase; subscribers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.phases import Phase


@pytest.mark.multiprocess
def test_two_ranks_enter_the_same_marks_through_training_validation_and_saves(tmp_path: Path) -> None:
    """The rule the watchdog stands on, on the real trainer: two gloo ranks (dp 2) train two epochs with saves
    and validations in which rank 1 gets three batches and rank 0 one (tests/support/phase_sequences.py).
    Their marks are the same, in the same order, with the same steps; only their ticks differ."""
    from tests.support.phase_sequences import EPOCHS, record_marks
    from tests.support.tensor_parallel import spawn_two_ranks

    spawn_two_ranks(record_marks, (str(tmp_path),), timeout_s=240)
    ranks = [json.loads((tmp_path / f"marks-rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["step"] == ranks[1]["step"] == 4 * EPOCHS, ranks[0]["step"]
    a, b = (r["marks"] for r in ranks)
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        around = slice(max(at - 3, 0), at + 3)
        pytest.fail(f"the ranks' marks part at mark {at}: rank 0 {a[around]}, rank 1 {b[around]}")
    # The run went through every kind of mark: training steps, validation, saves (their disk work and collectives).
    assert {phase for _, phase, _ in a} == set(Phase) - {Phase.COMPILE}, {phase for _, phase, _ in a}
    assert [seq for seq, _, _ in a] == list(range(len(a)))  # every mark seen, none twice
    # ... and through what ranks do unequally: rank 1's extra validation batches, rank 0's commit of each save.
    val_ticks = [[t for t in r["ticks"] if t[1] == "validation"] for r in ranks]
    assert (len(val_ticks[0]), len(val_ticks[1])) == (0, 2 * EPOCHS), val_ticks
    assert any(phase == "checkpoint" for _, phase in ranks[0]["ticks"]), ranks[0]["ticks"]
