"""Distributed training on CPU with gloo: layout invariance, exact resume, LR drops, TensorBoard, guard rails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import HARNESS, NARROW_MODEL, REPO, TORCHRUN, flags


def _env(out: Path, data: str = "real") -> dict[str, str]:
    env = {**os.environ, "HARNESS_OUT": str(out), "HARNESS_DATA": data, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return env


def _train(
    out: Path, args: list[str], nproc: int = 1, data: str = "real", timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    if nproc == 1:
        cmd = [sys.executable, HARNESS, *args]
    else:
        cmd = [TORCHRUN, f"--nproc_per_node={nproc}", "--standalone", HARNESS, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(out, data), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def test_epoch_end_saves_every_n_epochs(classes_only: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _train(
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
