"""The trainer's own decisions on a one-process harness run (when it saves); the distributed runs, with
the same harness, are tests/integration/test_train.py."""

from __future__ import annotations

from pathlib import Path

from tests.support import NARROW_MODEL, flags
from tests.support.harness_runs import train


def test_epoch_end_saves_every_n_epochs(classes_only: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = train(
        tmp_path / "o",
        [
            *flags("--data {} --run-dir {}", classes_only, run_dir),
            *NARROW_MODEL,
            *flags("--tp 1 --batch-size 4 --epochs 4 --train.val-every 4 --train.ten-crop false"),
            *flags("--checkpoint.every-epochs 2 --checkpoint.every-minutes 0"),
        ],
        data="fixed",
    )
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step-00000008", "step-00000016"], names  # 4 steps an epoch: epochs 2 and 4 only
    # A one-process run saves alone on purpose: no PyTorch warning "assuming the intent" on every save.
    assert "Warning" not in proc.stderr, proc.stderr[-4000:]
