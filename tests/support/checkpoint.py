"""What tests/unit/test_checkpoint.py and tests/integration/test_checkpoint.py share."""

from __future__ import annotations

from pathlib import Path

from tests.support import REPO

V1 = REPO / "tests" / "data" / "checkpoint-v1"  # written by main before the package split (its README)


def _v1_run(tmp_path: Path) -> Path:
    """A writable copy of the kept run directory (a resume writes beside it)."""
    import shutil

    run = tmp_path / "v1"
    shutil.copytree(V1, run)
    return run
