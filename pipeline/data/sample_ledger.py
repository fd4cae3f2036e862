"""The consumed-samples ledger: which sample keys each step of a run trained on, per rank, in the run directory.

With ``--train.record-samples true`` every data-parallel slice (the tensor-parallel rank 0 of each pair: a
pair's batches are identical) appends one JSON line per step to ``RUN_DIR/samples/rank-N.jsonl``::

    {"epoch": 0, "step": 12, "step_in_epoch": 12, "dp_rank": 1, "dp_size": 4, "keys": ["000123", ...]}

``step`` is the steps done before the batch. A start (fresh or resumed at step S) first drops the lines
of steps >= S from every rank's file, so the ledger always holds the steps of the run's own trajectory:
replayed steps once, a rank that no longer exists under a smaller dp size keeps the steps it took.
:func:`read_ledger` puts the slices back into global batches; :func:`epoch_keys` lists an epoch's samples
(a sample seen twice appears twice), which is what an exactly-once check compares with the split.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

import torch.distributed as dist

from basics.files import atomic_output
from pipeline.run_dir import RunDir


class SampleLedger:
    """This rank's appender (``None`` files for the tensor-parallel rank 1 of a pair: it records nothing)."""

    def __init__(self, file: IO[str] | None, dp_rank: int, dp_size: int):
        self._file = file
        self.dp_rank, self.dp_size = dp_rank, dp_size

    @classmethod
    def open(
        cls, run_dir: RunDir, *, rank: int, dp_rank: int, dp_size: int, tp_rank: int, from_step: int
    ) -> SampleLedger:
        """Collective when distributed: rank 0 drops the lines of steps >= ``from_step``, then every recording
        rank opens its file for appending."""
        if rank == 0:
            run_dir.samples.mkdir(parents=True, exist_ok=True)
            for path in sorted(run_dir.samples.glob("rank-*.jsonl")):
                _keep_before(path, from_step)
        if dist.is_initialized():
            dist.barrier()  # nobody appends to a file rank 0 is still rewriting
        if tp_rank != 0:
            return cls(None, dp_rank, dp_size)
        return cls(open(run_dir.samples_of(rank), "a", buffering=1), dp_rank, dp_size)  # one write per line

    def record(self, *, epoch: int, step: int, step_in_epoch: int, keys: list[str]) -> None:
        if self._file is None:
            return
        line = {
            "epoch": epoch,
            "step": step,
            "step_in_epoch": step_in_epoch,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "keys": keys,
        }
        self._file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _lines(path: Path) -> list[dict[str, Any]]:
    """A file's records; a line cut short by a killed process is no record."""
    out = []
    for text in path.read_text().splitlines():
        try:
            out.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return out


def _keep_before(path: Path, step: int) -> None:
    kept = [line for line in _lines(path) if line["step"] < step]
    with atomic_output(path, durable=False) as tmp:
        tmp.write_text("".join(json.dumps(line) + "\n" for line in kept))


def read_ledger(run_dir: RunDir) -> dict[int, list[str]]:
    """step -> the global batch's keys (the dp slices in dp-rank order). A step whose slices do not make a
    whole batch (a rank's line missing, or two dp sizes) raises ValueError naming it."""
    slices: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
    for path in sorted(run_dir.samples.glob("rank-*.jsonl")):
        for line in _lines(path):
            slices[line["step"]][line["dp_rank"]] = line
    batches = {}
    for step, by_rank in sorted(slices.items()):
        sizes = {line["dp_size"] for line in by_rank.values()}
        if len(sizes) != 1 or sorted(by_rank) != list(range(next(iter(sizes)))):
            raise ValueError(f"step {step}: the ledger holds dp slices {sorted(by_rank)} of dp sizes {sizes}")
        batches[step] = [key for r in sorted(by_rank) for key in by_rank[r]["keys"]]
    return batches


def epoch_keys(run_dir: RunDir) -> dict[int, list[str]]:
    """epoch -> every key its steps trained on, in order (a key seen twice is listed twice)."""
    epochs: dict[int, list[str]] = defaultdict(list)
    steps: dict[int, int] = {}
    for path in sorted(run_dir.samples.glob("rank-*.jsonl")):
        for line in _lines(path):
            steps[line["step"]] = line["epoch"]
    for step, keys in read_ledger(run_dir).items():
        epochs[steps[step]].extend(keys)
    return dict(epochs)
