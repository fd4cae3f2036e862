"""The harness (tests/support/harness.py) run to completion from a test: one plain process, or several under
torchrun on this host (tests/unit/test_train.py, tests/integration/test_train.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import HARNESS, REPO, TORCHRUN


def train(
    out: Path, args: list[str], nproc: int = 1, data: str = "real", timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """``launch.train ARGS`` through the harness on ``data`` ("real" or "fixed", its ``HARNESS_DATA``), each rank's
    outcome in ``out``; raises with the end of its stderr if it fails and ``check``."""
    out.mkdir(parents=True, exist_ok=True)
    if nproc == 1:
        cmd = [sys.executable, HARNESS, *args]
    else:
        cmd = [TORCHRUN, f"--nproc_per_node={nproc}", "--standalone", HARNESS, *args]
    env = {**os.environ, "HARNESS_OUT": str(out), "HARNESS_DATA": data, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc
