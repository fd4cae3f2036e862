"""pipeline.faults.lease: one writer per run directory (no Slurm, no torch in the lease itself).

A second writer is refused with one line naming the holder; the same job (a requeue, an elastic
restart) takes over; a stale lease (old heartbeat, or a holder that is gone) is taken with a warning
and the old holder learns it at its next heartbeat; of several racing takers exactly one wins.
The end-to-end cases on real Slurm are in tests/integration/test_slurm_train.py and tests/integration/test_submit.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipeline.faults.lease import LEASE_NAME
from preprocess import format as fmt
from tests.support import PYTHON, REPO, TORCHRUN, flags
from tests.support.lease import _foreign_lease
from tests.support.processes import small_env

# ------------------------------------------------------------------------------- the entry points


@pytest.mark.multiprocess
def test_launch_train_refuses_a_held_run_dir_before_writing_anything(tmp_path: Path) -> None:
    """Plain python and torchrun with 2 ranks: every rank fails with the holder's line, nothing is written."""
    run_dir, data = tmp_path / "run", tmp_path / "data"
    _foreign_lease(run_dir)
    data.mkdir()
    fmt.write_manifest(data, fmt.Manifest(classes=[{"index": i, "wnid": f"n{i}", "name": ""} for i in range(4)]))
    args = flags("-m launch.train --data {} --run-dir {} --tp 1 --train.device cpu", data, run_dir)
    single = subprocess.run([PYTHON, *args], cwd=REPO, env=small_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 2, single.stderr
    assert single.stderr.strip().splitlines()[-1].startswith(f"error: {run_dir} is being written by Slurm job 7")
    assert "Traceback" not in single.stderr
    two = subprocess.run(
        [TORCHRUN, *flags("--standalone --nproc-per-node=2 --max-restarts=0"), *args],
        cwd=REPO,
        env=small_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode != 0
    assert two.stderr.count(f"error: {run_dir} is being written by Slurm job 7") == 2, two.stderr[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == [LEASE_NAME]  # no config.json, no checkpoints/
