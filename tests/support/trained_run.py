"""A tiny trained run for the evaluation, figure, report and ablation tests (conftest.py's ``trained_run``).

The demo dataset (``tests.support.datasets``: 4 classes, 24 val images) trained for one epoch of 12 steps
with a narrow model over the paper's two-tower split (2 gloo processes), checkpoints at steps 6
and 12, centre-crop validation at the end (so ``best`` exists). Read-only for the tests.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import NARROW, REPO, TORCHRUN, flags
from tests.support.processes import free_port, small_env

TRAIN_ARGS = [
    *NARROW,
    *flags("--batch-size 8 --data.workers 1 --train.ten-crop false"),
    *flags("--checkpoint.every-minutes 0 --checkpoint.every-steps 6 --epochs 1"),
    *flags("--model.init kaiming --data.mean channel --lr 0.02 --train.log-every 4"),
]


def train(shards: Path, run_dir: Path, extra: list[str] = (), nproc: int = 2, timeout: float = 600) -> Path:
    """``launch.train`` under torchrun (gloo, CPU) with the tiny-run flags; raises with its log on failure."""
    cmd = [
        TORCHRUN,
        f"--nproc_per_node={nproc}",
        f"--master-port={free_port()}",
        *flags("-m launch.train --data {} --run-dir {} --tp", shards, run_dir),
        "2" if nproc == 2 else "1",
        *TRAIN_ARGS,
        *extra,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=small_env(), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return run_dir
