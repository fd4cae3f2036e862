"""A chaos campaign's training rank: tests/support/harness.py with the campaign's hooks (no pytest here).

Run by torchrun as a script, like the harness. ``CHAOS_CONTROL=DIR`` is where the campaign
(tests/support/chaos.py) leaves files that switch a fault on in a running rank, so a fault lands at a
step the campaign chose, not at a time:

``gate``             holds S: no rank is handed the batch of a global step past S while it says so
``slow-rank-R``      every training batch of rank R arrives ``CHAOS_SLOW_S`` seconds late while it exists
``poison-step-S``    rank 0's batch of global step S is NaN, in every computation of it (a bad batch; rank 0
                     renames the file ``...done`` once it handed the batch out)
``nan-once-step-S``  rank 0's images of global step S are NaN in the step's first computation only, not in its
                     re-run in place (a device that erred once; the file is renamed ``...done``)
``crash-step-S``     every rank raises at global step S, every time (a bug: the crash repeats until the file goes)
``disk-full``        rank 0's next checkpoint file fails at its first write with ENOSPC, once (the file is removed)

``CHAOS_RECORD=DIR`` writes ``DIR/rank-N.jsonl``: one JSON line per training batch handed to the loop,
``{"epoch", "step", "keys"}`` (``step`` global and 1-based, ``keys`` the batch's sample keys, from the
epoch's deterministic plan), the format of ``--train.record-samples``. A line is written when the batch is
yielded, so a batch a fault interrupted is recorded and then recorded again by the resumed run:
:func:`tests.support.chaos.consumed` keeps what the final trajectory trained on.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support import harness  # noqa: E402


class Chaotic:
    """A train loader that records each batch's keys and applies the control directory's faults."""

    def __init__(self, inner, *, first_step: int, epoch: int, keys, rank: int, control: Path, record: Path | None):
        self.inner, self.first_step, self.epoch, self.keys = inner, first_step, epoch, keys
        self.rank, self.control, self.record = rank, control, record
        self.steps_in_epoch = inner.steps_in_epoch
        self.total = getattr(inner, "total", None)  # the split's size: the trainer weighs a short last batch by it
        self.start_batch = first_step - epoch * inner.steps_in_epoch

    def batch_keys(self, step: int) -> list[str]:
        """This rank's sample keys of the epoch's batch ``step`` (a skipped batch is recorded by them)."""
        return self.keys(step - self.start_batch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        slow_s = float(os.environ.get("CHAOS_SLOW_S", "0.5"))
        for k, (images, labels) in enumerate(self.inner):
            step = self.first_step + k + 1
            while step > gate(self.control / "gate"):
                time.sleep(0.05)
            if (self.control / f"crash-step-{step}").exists():
                raise RuntimeError(f"chaos: a bug that raises at step {step}")
            poison = self.control / f"poison-step-{step}"
            if self.rank == 0 and poison.exists():
                poison.rename(poison.with_name(f"{poison.name}.done"))
                images = images * float("nan")
            if (self.control / f"slow-rank-{self.rank}").exists():
                time.sleep(slow_s)
            if self.record is not None:
                line = {"epoch": self.epoch, "step": step, "keys": self.keys(k)}
                with (self.record / f"rank-{self.rank}.jsonl").open("a") as f:
                    f.write(json.dumps(line) + "\n")
            yield images, labels


def gate(path: Path) -> float:
    """The last step the campaign lets the ranks train (no file: every step)."""
    try:
        return int(path.read_text())
    except FileNotFoundError:
        return float("inf")


def chaotic(loaders, rank: int):
    from pipeline.data.planner import EpochInputs
    from pipeline.train import Loaders

    control = Path(os.environ["CHAOS_CONTROL"])
    record = Path(os.environ["CHAOS_RECORD"]) if os.environ.get("CHAOS_RECORD") else None
    if record is not None:
        record.mkdir(parents=True, exist_ok=True)
    loaders = loaders or Loaders()

    def train_loader(cfg, *, epoch, start_batch=0, **kwargs):
        inner = loaders.train(cfg, epoch=epoch, start_batch=start_batch, **kwargs)
        # The epoch's plan again (a pure function of these): which samples each batch holds.
        inputs = EpochInputs(
            cfg,
            kwargs["dp_rank"],
            kwargs["dp_size"],
            kwargs["seed"],
            kwargs["batch_size"],
            kwargs.get("num_classes"),
            None,
        )
        prepared = inputs.prepare(epoch, start_batch)
        bounds = prepared.bounds

        def keys(k: int) -> list[str]:
            if k >= len(bounds):
                return []
            lo, hi = bounds[k]
            return [prepared.plan.key(i) for i in range(lo, hi)]

        first = epoch * inner.steps_in_epoch + start_batch
        return Chaotic(inner, first_step=first, epoch=epoch, keys=keys, rank=rank, control=control, record=record)

    return Loaders(train=train_loader, val=loaders.val)


class NoSpace:
    """A checkpoint file's stream on a full disk: it was created, and every write fails with ENOSPC, as the
    kernel's write does (the rest of the stream is the real one)."""

    def __init__(self, stream: Any, path: str):
        self._stream, self._path = stream, path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)


def full_disk_on(disk_full: Callable[[], bool]) -> None:
    """The file streams of torch.distributed.checkpoint's writer (every checkpoint file passes through
    ``FileSystem.create_stream``) strike a full disk when ``disk_full()`` says so as one is opened for
    writing: the error rises where a real one does, under the checkpointer's own handling of it."""
    from torch.distributed.checkpoint import filesystem

    create_stream = filesystem.FileSystem.create_stream

    @contextmanager
    def striking(self: Any, path: Any, mode: str) -> Iterator[Any]:
        with create_stream(self, path, mode) as stream:
            yield NoSpace(stream, str(path)) if "w" in mode and disk_full() else stream

    filesystem.FileSystem.create_stream = striking


def full_disk(rank: int) -> None:
    """``disk-full``: rank 0's next checkpoint file, once (the rank takes the file away)."""
    flag = Path(os.environ["CHAOS_CONTROL"]) / "disk-full"

    def once() -> bool:
        try:
            flag.unlink()
        except FileNotFoundError:
            return False
        return True

    if rank == 0:
        full_disk_on(once)


def nan_once(rank: int) -> None:
    """``nan-once-step-S``: rank 0's images of step S are NaN in that step's first computation only."""
    if rank != 0:
        return
    from pipeline import train_step

    control, update = Path(os.environ["CHAOS_CONTROL"]), train_step.TrainStep._update

    def erring(self, images, labels, step, compiling, **kwargs):
        flag = control / f"nan-once-step-{step + 1}"
        if flag.exists():
            flag.rename(flag.with_name(f"{flag.name}.done"))
            images = images * float("nan")
        return update(self, images, labels, step, compiling, **kwargs)

    train_step.TrainStep._update = erring


def main() -> int:
    rank = int(os.environ.get("RANK", 0))
    slowed = harness.slowed
    harness.slowed = lambda loaders, r: chaotic(slowed(loaders, r), r)
    full_disk(rank)
    nan_once(rank)
    return harness.main()


if __name__ == "__main__":
    sys.exit(main())
