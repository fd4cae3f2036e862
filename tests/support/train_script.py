"""slurm/train.sh run by bash outside Slurm (tests/unit/test_train_script.py, tests/integration/test_train_script.py):
stand-ins for ``srun`` (runs its command once: a one-node allocation) and ``scontrol`` (records what it is
asked), and the environment sbatch would give the script."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from tests.support import HOOKS, PYTHON, REPO

JOB = "4242"

SRUN = """#!/bin/bash
# srun stand-in: its own options dropped, the command run once (this host is the one-node allocation)
while [[ "${1:-}" == --* ]]; do shift; done
exec "$@"
"""
SCONTROL = """#!/bin/bash
# scontrol stand-in: every call recorded; `show hostnames` answers this host, `show node` knows no NodeAddr
echo "scontrol $*" >> "$FAKE_SLURM_CALLS"
[[ "$1 $2" == "show hostnames" ]] && hostname
exit 0
"""


def write_script(path: Path, text: str) -> None:
    """``text`` as an executable script at ``path``."""
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment sbatch would give the script (one node, job 4242), with the stand-ins first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_script(bin_dir / "srun", SRUN)
    write_script(bin_dir / "scontrol", SCONTROL)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PREFLIGHT", "HANG_", "MAX_RESTARTS"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=PYTHON,
        PYTHONPATH=os.pathsep.join([HOOKS, str(REPO)]),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        SLURM_JOB_ID=JOB,
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_NODELIST=socket.gethostname(),
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_CPUS_PER_TASK="2",
        NPROC_PER_NODE="2",
        FAKE_SLURM_CALLS=str(tmp_path / "scontrol.calls"),
    )
    env.update(extra)
    return env


def requeues(tmp_path: Path) -> list[str]:
    """The ``scontrol requeue`` calls the script made."""
    calls = tmp_path / "scontrol.calls"
    return [c for c in (calls.read_text().splitlines() if calls.exists() else []) if c.startswith("scontrol requeue")]
