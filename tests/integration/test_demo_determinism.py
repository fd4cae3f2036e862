"""The demo recipe is deterministic on one machine (issue 38): two runs with the same seed, `make demo`'s command
(``launch.train`` under torchrun, 2 gloo processes, ``--tp 2``, configs/demo.toml, its model at full demo width),
a few steps, end with the same checkpoint, every tensor bit for bit: weights, momenta, RNG states.

This is what makes the measured spread (configs/demo-expected.json) a statement about seeds: a user's figure for
seed S on this machine is the one measured, so a result outside the range is a difference in the machine or the
code, worth a report.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint
from pipeline.checkpoint import read_tensors
from tests.support import DEMO_CLASSES, REPO, TORCHRUN, flags
from tests.support.processes import free_port, small_env


def _train_demo(shards: Path, run_dir: Path, seed: int) -> Path:
    """`make demo`'s training command on the test's demo data (4 classes, so ``--num-classes``), 3 steps of 16
    images (the recipe's batch of 64 is a whole epoch of this data)."""
    cmd = [
        TORCHRUN,
        "--nproc_per_node=2",
        f"--master-port={free_port()}",
        *flags("-m launch.train"),
        *flags("--config {} --data {} --run-dir {} --tp 2", REPO / "configs" / "demo.toml", shards, run_dir),
        *flags("--seed {} --num-classes {} --batch-size 16 --max-steps 3", seed, DEMO_CLASSES),
        *flags("--data.workers 1 --checkpoint.every-minutes 0"),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=small_env(), capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = checkpoint.latest(run_dir)
    assert last is not None and last.name == "step-00000003", last
    return last


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, not ==: a NaN (an RNG state's "no cached value") equals itself, -0.0 differs from 0.0."""
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


@pytest.mark.multiprocess
def test_the_same_seed_gives_the_same_checkpoint_bit_for_bit(demo_shards: Path, tmp_path: Path) -> None:
    a = read_tensors(_train_demo(demo_shards, tmp_path / "a", seed=5))
    b = read_tensors(_train_demo(demo_shards, tmp_path / "b", seed=5))
    assert a.keys() == b.keys() and any(key.startswith("tower0.model.") for key in a), sorted(a)[:5]
    differ = [key for key in a if not _same_bits(a[key], b[key])]
    assert not differ, f"{len(differ)} tensors differ between two runs of seed 5, e.g. {differ[:6]}"
    assert a["tower0.model.fc6.weight"].shape[0] == 512 // 2  # the recipe's fc width, over two towers
