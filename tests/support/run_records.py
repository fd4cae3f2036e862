"""What a running job keeps in its run directory, read by a test while it runs (no pytest here)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.run_dir import RunDir


def progress_record(run_dir: Path, rank: int) -> dict | None:
    """The watchdog's progress record of ``rank`` (its pid, phase and step); None until it is first written."""
    try:
        return json.loads((RunDir(run_dir).progress / f"rank-{rank}.json").read_text())
    except (OSError, ValueError):
        return None
