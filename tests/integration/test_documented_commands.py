"""The slow half of tests/unit/test_documented_commands.py (its docstring says what the pair checks): the
documented commands no other test runs, run on tiny data and the CPU."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import PYTHON
from tests.support.datasets import make_dataset
from tests.support.documented_commands import (
    _here,
)
from tests.support.processes import run_captured


@pytest.mark.slow
def test_cheap_documented_commands_run(tmp_path: Path) -> None:
    """The documented commands no other test runs, on tiny data and the CPU: each exits 0."""
    make_dataset(tmp_path / "small", {"train": [100, 100], "val": [6]}, quality=60)  # bench.scale: 3 batches of 64

    def run(key: str, commands: list[list[str]]) -> list[str]:
        for args in commands:  # in order: a later one may read what an earlier one wrote
            proc = run_captured([PYTHON, "-m", *args], 400)
            if proc.returncode != 0:
                return [f"{key}: python -m {' '.join(args)} exits {proc.returncode}:\n{proc.stderr[-2000:]}"]
        return []

    here = _here(tmp_path)
    # bench.data reads what tests.support.datasets writes: one chain; the others side by side.
    data_chain = here.pop("python -m tests.support.datasets") + here.pop("python -m pipeline.bench.data")
    chains = {"python -m tests.support.datasets, pipeline.bench.data": data_chain, **here}
    with ThreadPoolExecutor(len(chains)) as pool:
        failures = [f for found in pool.map(run, chains, chains.values()) for f in found]
    assert not failures, "\n\n".join(failures)
    assert len(json.loads((tmp_path / "m.json").read_text())["results"]) == 5  # every variant without compile
