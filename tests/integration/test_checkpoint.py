"""Checkpoint promises, tried as an unlucky or hostile user would: every restart resumes from the newest
intact checkpoint, no saved work is lost or replaced by a corrupt copy, and no file read runs code."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import checkpoint
from tests.support.checkpoint import _v1_run

# ---------------------------------------------------------------------------------------------- format v1


@pytest.mark.slow
def test_checkpoint_written_by_v1_resumes_a_training_run(tmp_path: Path, demo_shards: Path) -> None:
    """The trainer itself, started as a user restarts a run: its own config.json as --config."""
    import subprocess

    from tests.support import HARNESS, PYTHON, REPO, flags
    from tests.support.processes import small_env

    run = _v1_run(tmp_path)
    args = flags("--config {} --run-dir {} --data {}", run / "config.json", run, demo_shards)
    proc = subprocess.run(
        [PYTHON, HARNESS, *args, *flags("--max-steps 4 --train.log-every 1")],
        cwd=REPO,
        env=small_env({"HARNESS_OUT": str(tmp_path)}),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Mid-epoch in the order drawn per dp rank (before the lanes): it goes on at the next epoch, saying so.
    assert "resuming at the start of epoch 1" in proc.stderr, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and "epoch 1, step 2" in proc.stderr, proc.stderr[-4000:]
    last = checkpoint.latest(run)
    assert checkpoint.read_meta(last)["progress"]["step"] == 4 and checkpoint.verify(last) is None
    assert checkpoint.read_meta(run / "checkpoints" / "step-00000002")["health"] == checkpoint.GOOD
