"""What tests/unit/test_faults.py and tests/integration/test_faults.py share."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support import PYTHON, SMALL_RUN, flags
from tests.support.processes import run_captured

RUN_TIMEOUT = 300  # seconds for any one training run (they take 10-40 s on 2 cores)


def _train_error(data: Path, run_dir: Path, *extra: str) -> tuple[int, str]:
    argv = [PYTHON, *flags("-m launch.train --data {} --run-dir {}", data, run_dir), *SMALL_RUN, "--tp", "1", *extra]
    proc = run_captured(argv, RUN_TIMEOUT)
    return proc.returncode, proc.stderr


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-4000:]
    return errors[0]


def _mount_tmpfs(directory: Path, size_kb: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [*flags("mount -t tmpfs -o"), f"size={size_kb}k", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or f'exit {proc.returncode}'}")


def _umount(directory: Path) -> None:
    if subprocess.run(["umount", str(directory)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(flags("umount -l {}", directory), capture_output=True, timeout=30)
