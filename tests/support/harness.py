"""Runs ``launch.train`` in this process (plain python or under torchrun) and records its outcome.

``HARNESS_DATA=fixed`` swaps the input pipeline for fixed synthetic global batches that each dp rank
slices by its rank: the global batch of a step is then the same whatever the (dp, tp) layout, which
is what a layout-invariance test needs (the real pipeline's sharding is tested in test_data.py).
The outcome (progress, LR drops) of each rank goes to ``$HARNESS_OUT/outcome-rank{RANK}.json``.

``HARNESS_PAUSE_AT=N`` with ``HARNESS_GATE=DIR`` holds every rank before its batch of global step ``N``
(after N steps): it creates ``DIR/paused-rank{RANK}`` and waits for ``DIR/go``. A test then acts on a
run in a known state (a signal lands between two given steps, whatever the machine's speed).
``HARNESS_POISON_AT=N`` spoils the training batch of global step ``N`` (1-based: the step that trains on it):
``HARNESS_POISON=nan`` makes its images NaN, ``HARNESS_POISON=scale:K`` multiplies them by K (a finite loss
spike); ``HARNESS_POISON_RANK=r`` limits it to rank r. A divergence test then diverges at a known step.
``HARNESS_POISON_ONCE=1`` spoils it in the step's first computation only, not when the step is re-run in
place (a transient fault of the device: the divergence does not repeat).
``HARNESS_HOLD_SAVE=DIR`` holds rank 0's checkpoint commit at the point named in ``DIR/hold`` (see
:func:`hold_saves`) and marks it with ``DIR/held``: a kill then provably lands inside a save.
``HARNESS_GATE_SAVE=1`` (with ``HARNESS_GATE``) holds every rank at the start of its first checkpoint
write (``DIR/saving-rank{RANK}``) until ``DIR/go``, before the save's file collectives: a link cut
there lands inside a save. ``HARNESS_UNREACHABLE_RANK=r``: rank r's reachability listener answers no
connection (a full accept queue drops every SYN), as if the link to it were cut (pipeline/faults/reach.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

STEPS_PER_EPOCH = 4


class FixedLoader:
    def __init__(
        self,
        *,
        dp_rank: int,
        dp_size: int,
        batch_size: int,
        num_classes: int,
        epoch: int,
        device: torch.device,
        views: int = 0,
        steps: int = STEPS_PER_EPOCH,
        start: int = 0,
    ):
        self.dp_rank, self.dp_size, self.batch, self.num_classes = dp_rank, dp_size, batch_size, num_classes
        self.epoch, self.device, self.views, self.steps_in_epoch, self.start = epoch, device, views, steps, start

    def __len__(self) -> int:
        return self.steps_in_epoch - self.start

    def __iter__(self):
        global_batch = self.batch * self.dp_size
        lo, hi = self.dp_rank * self.batch, (self.dp_rank + 1) * self.batch
        for step in range(self.start, self.steps_in_epoch):
            g = torch.Generator().manual_seed(1000 * self.epoch + step)
            labels = torch.randint(0, self.num_classes, (global_batch,), generator=g)
            images = torch.randn(global_batch, 3, 227, 227, generator=g)
            images += labels.view(-1, 1, 1, 1).float() * 0.1  # learnable signal
            if self.views:
                images = images.unsqueeze(1).expand(-1, self.views, -1, -1, -1).contiguous()
            yield images[lo:hi].to(self.device), labels[lo:hi].to(self.device)


def fixed_loaders():
    """Loaders with the signatures of pipeline.data's, handed to the trainer instead of the real ones."""
    from pipeline.train import Loaders

    def train_loader(
        cfg, *, dp_rank, dp_size, epoch, seed, device, batch_size, num_classes=None, start_batch=0, ahead=None
    ):
        return FixedLoader(
            dp_rank=dp_rank,
            dp_size=dp_size,
            batch_size=batch_size,
            num_classes=num_classes,
            epoch=epoch,
            device=device,
            start=start_batch,
        )

    def val_loader(cfg, *, dp_rank, dp_size, device, batch_size, ten_crop=False, num_classes=None, verify_cache=None):
        return FixedLoader(
            dp_rank=dp_rank,
            dp_size=dp_size,
            batch_size=batch_size,
            num_classes=num_classes,
            epoch=99,
            device=device,
            views=10 if ten_crop else 0,
            steps=2,
        )

    return Loaders(train=train_loader, val=val_loader)


class Gate:
    """Holds a train loader's iteration before the batch of global step ``at`` until ``gate/go`` exists."""

    def __init__(self, inner, *, first_step: int, at: int, gate: Path, rank: int):
        self.inner, self.first_step, self.at, self.gate, self.rank = inner, first_step, at, gate, rank
        self.steps_in_epoch = inner.steps_in_epoch

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for k, batch in enumerate(self.inner):
            if self.first_step + k == self.at:
                (self.gate / f"paused-rank{self.rank}").touch()
                while not (self.gate / "go").exists():
                    time.sleep(0.01)
            yield batch


def gated(loaders, at: int, gate: Path, rank: int):
    """``loaders`` (the real ones when None) with the training batches held at global step ``at``."""
    from pipeline.train import Loaders

    loaders = loaders or Loaders()

    def train_loader(cfg, *, epoch, start_batch=0, **kwargs):
        inner = loaders.train(cfg, epoch=epoch, start_batch=start_batch, **kwargs)
        return Gate(inner, first_step=epoch * inner.steps_in_epoch + start_batch, at=at, gate=gate, rank=rank)

    return Loaders(train=train_loader, val=loaders.val)


class Poisoned:
    """A train loader whose batch of global step ``at`` (1-based) is spoiled by ``spoil``."""

    def __init__(self, inner, *, first_step: int, at: int, spoil):
        self.inner, self.first_step, self.at, self.spoil = inner, first_step, at, spoil
        self.steps_in_epoch = inner.steps_in_epoch
        self.total = getattr(inner, "total", None)  # the split's size: the trainer weighs a short last batch by it

    def batch_keys(self, step: int) -> list[str]:
        """The inner loader's keys (a bad batch is recorded by them); a loader that names none has none."""
        return self.inner.batch_keys(step) if hasattr(self.inner, "batch_keys") else []

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for k, (images, labels) in enumerate(self.inner):
            yield (self.spoil(images) if self.first_step + k + 1 == self.at else images), labels


def poisoned(loaders, rank: int):
    """``HARNESS_POISON_AT``/``HARNESS_POISON``/``HARNESS_POISON_RANK``: see the module's docstring."""
    from pipeline.train import Loaders

    at, how = int(os.environ["HARNESS_POISON_AT"]), os.environ.get("HARNESS_POISON", "nan")
    if os.environ.get("HARNESS_POISON_RANK", str(rank)) != str(rank):
        return loaders
    if how == "nan":
        spoil = lambda images: torch.full_like(images, float("nan"))  # noqa: E731
    else:
        factor = float(how.removeprefix("scale:"))
        spoil = lambda images: images * factor  # noqa: E731
    loaders = loaders or Loaders()

    def train_loader(cfg, *, epoch, start_batch=0, **kwargs):
        inner = loaders.train(cfg, epoch=epoch, start_batch=start_batch, **kwargs)
        return Poisoned(inner, first_step=epoch * inner.steps_in_epoch + start_batch, at=at, spoil=spoil)

    return Loaders(train=train_loader, val=loaders.val)


def poison_once(rank: int) -> None:
    """``HARNESS_POISON_ONCE``: the images of step ``HARNESS_POISON_AT`` x ``HARNESS_POISON`` (scale:K) in that
    step's first computation only, on ``HARNESS_POISON_RANK`` (default: every rank)."""
    from pipeline import train_step

    at, factor = int(os.environ["HARNESS_POISON_AT"]), float(os.environ["HARNESS_POISON"].removeprefix("scale:"))
    if os.environ.get("HARNESS_POISON_RANK", str(rank)) != str(rank):
        return
    update, done = train_step.TrainStep._update, []

    def once(self, images, labels, step, compiling, **kwargs):
        if step + 1 == at and not done:
            done.append(step)
            images = images * factor
        return update(self, images, labels, step, compiling, **kwargs)

    train_step.TrainStep._update = once


def hold_saves(gate: Path) -> None:
    """Rank 0's checkpoint commit stops for good at the point ``gate/hold`` names, once ``gate/held`` says so:
    ``written`` (every rank's data on disk, nothing committed) or ``renamed`` (the directory has its final
    name, ``latest`` has not moved). The test kills the run there."""
    from pipeline.checkpoint import checkpointer

    def hold(point: str) -> None:
        try:
            wanted = (gate / "hold").read_text().strip()
        except FileNotFoundError:
            return
        if wanted == point:
            (gate / "held").write_text(point)
            while True:
                time.sleep(1)

    commit, fsync_dir = checkpointer.Checkpointer._commit, checkpointer.fsync_dir

    def held_commit(self, *args, **kwargs):
        hold("written")
        return commit(self, *args, **kwargs)

    def held_fsync_dir(path):  # the commit's fsync of the renamed directory, just before `latest` moves
        fsync_dir(path)
        hold("renamed")

    checkpointer.Checkpointer._commit = held_commit
    checkpointer.fsync_dir = held_fsync_dir


def gate_saves(gate: Path, rank: int) -> None:
    """Every rank's first checkpoint write waits at its start for ``gate/go`` (``gate/saving-rank{rank}``)."""
    from pipeline.checkpoint import Checkpointer

    write = Checkpointer._write

    def gated_write(self, *args, **kwargs):
        (gate / f"saving-rank{rank}").touch()
        while not (gate / "go").exists():
            time.sleep(0.01)
        return write(self, *args, **kwargs)

    Checkpointer._write = gated_write


class BlackholeListener:
    """A listener nobody can connect to: its accept queue (backlog 0) is filled by one connection of its
    own, and the kernel drops the SYNs that find a full queue, so connects time out as over a cut link."""

    def __init__(self, host: str = "127.0.0.1"):
        import socket

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(0)
        self.addr = f"{host}:{self.sock.getsockname()[1]}"
        self._filler = socket.create_connection((host, self.sock.getsockname()[1]), timeout=5)

    def close(self) -> None:
        self._filler.close()
        self.sock.close()


def unreachable(rank: int) -> None:
    """``HARNESS_UNREACHABLE_RANK=rank``: this rank's watchdog listens with a :class:`BlackholeListener`."""
    from pipeline.faults import reach

    if os.environ.get("HARNESS_UNREACHABLE_RANK") == str(rank):
        reach.Listener = lambda: BlackholeListener(reach.job_address())


def slowed(loaders, rank: int):
    """``HARNESS_SLOW_RANK=r``: on rank r each validation batch takes ``HARNESS_SLOW_VAL_S`` longer, each
    checkpoint save ``HARNESS_SLOW_SAVE_S`` longer (a slow but progressing phase, for the watchdog's tests),
    each training batch ``HARNESS_SLOW_DATA_S`` longer to arrive (a rank slow on its data) and each optimizer
    step ``HARNESS_SLOW_STEP_S`` longer (a rank slow on its compute)."""
    import time

    from pipeline.checkpoint import Checkpointer
    from pipeline.train import Loaders

    if os.environ.get("HARNESS_SLOW_RANK") != str(rank):
        return loaders
    val_s, save_s = float(os.environ.get("HARNESS_SLOW_VAL_S", 0)), float(os.environ.get("HARNESS_SLOW_SAVE_S", 0))
    loaders = loaders or Loaders()
    save = Checkpointer.save

    def slow_save(self, *args, **kwargs):
        time.sleep(save_s)
        return save(self, *args, **kwargs)

    def slow_val(*args, **kwargs):
        for batch in loaders.val(*args, **kwargs):
            time.sleep(val_s)
            yield batch

    data_s = float(os.environ.get("HARNESS_SLOW_DATA_S", 0))

    def slow_train(*args, **kwargs):
        return Delayed(loaders.train(*args, **kwargs), data_s)

    Checkpointer.save = slow_save
    step_s = float(os.environ.get("HARNESS_SLOW_STEP_S", 0))
    if step_s:
        sgd_step = torch.optim.SGD.step

        def slow_step(self, *args, **kwargs):
            time.sleep(step_s)
            return sgd_step(self, *args, **kwargs)

        torch.optim.SGD.step = slow_step
    return Loaders(train=slow_train if data_s else loaders.train, val=slow_val)


class Delayed:
    """A train loader whose every batch arrives ``seconds`` late (the time counts as waiting for data)."""

    def __init__(self, inner, seconds: float):
        self.inner, self.seconds = inner, seconds
        self.steps_in_epoch = inner.steps_in_epoch

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            time.sleep(self.seconds)
            yield batch


def main() -> int:
    loaders = fixed_loaders() if os.environ.get("HARNESS_DATA") == "fixed" else None
    loaders = slowed(loaders, int(os.environ.get("RANK", 0)))
    from basics.errors import run_cli
    from launch.train import run

    rank = int(os.environ.get("RANK", 0))
    out = Path(os.environ["HARNESS_OUT"])
    if os.environ.get("HARNESS_HOLD_SAVE"):
        hold_saves(Path(os.environ["HARNESS_HOLD_SAVE"]))
    if os.environ.get("HARNESS_GATE_SAVE"):
        gate_saves(Path(os.environ["HARNESS_GATE"]), rank)
    unreachable(rank)
    if os.environ.get("HARNESS_POISON_AT") and os.environ.get("HARNESS_POISON_ONCE"):
        poison_once(rank)
    elif os.environ.get("HARNESS_POISON_AT"):
        loaders = poisoned(loaders, rank)
    if os.environ.get("HARNESS_PAUSE_AT"):
        loaders = gated(loaders, int(os.environ["HARNESS_PAUSE_AT"]), Path(os.environ["HARNESS_GATE"]), rank)

    def body() -> int:
        outcome = run(sys.argv[1:], loaders=loaders)
        record = {
            "progress": vars(outcome.progress),
            "preempted": outcome.preempted,
            "lr_drops": outcome.lr_drops,
            "val_top1_error": outcome.val_top1_error,
        }
        (out / f"outcome-rank{rank}.json").write_text(json.dumps(record))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
