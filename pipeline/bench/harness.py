"""What the benchmarks share: the model/batch set-up, the two loops (the real ``Trainer`` and a plain one),
the loaders that time every hand-over, the data sources and the machine's description.

``pipeline.bench.train`` (the loop, the tower split, the checkpoint stall, the scaling estimate) and
``pipeline.bench.gpu`` (the GPU report) both build on this module; neither imports the other's
internals.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basics.errors import UserError

# --size: (conv widths, fc width, batch). "tiny" makes the step so cheap that the loop's own per-step cost shows.
SIZES = {
    "tiny": ((16, 32, 48, 48, 32), 64, 8),
    "cpu": ((48, 128, 192, 192, 128), 1024, 16),
    "paper": ((96, 256, 384, 384, 256), 4096, 128),
}


@dataclass(frozen=True)
class Setup:
    """What both loops share: model shape, batch, device and precision."""

    widths: tuple[int, ...]
    fc_width: int
    num_classes: int
    batch_size: int
    device: str
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0

    def model_config(self) -> Any:
        from pipeline.model import ModelConfig

        return ModelConfig(
            num_classes=self.num_classes,
            widths=self.widths,
            fc_width=self.fc_width,
            channels_last=self.channels_last,
            compile=self.compile,
        )


# ------------------------------------------------------------------------------------------------ batches


@dataclass
class Recording:
    """One loop's pass through a :class:`RecordingLoader`: when each batch was asked for and handed over."""

    asked: list[float] = field(default_factory=list)
    got: list[float] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # this process's CPU seconds (all threads) at the window's ends
    main_cpu: list[float] = field(default_factory=list)  # the loop's thread alone (loader threads excluded)

    def window(self, warmup: int, steps: int) -> dict[str, float]:
        """Steps ``warmup .. warmup+steps-1``: from asking for the first to asking for the one after the last."""
        if len(self.asked) < warmup + steps + 1:
            raise RuntimeError(f"the loop took {len(self.asked) - 1} steps, fewer than {warmup + steps}")
        span = self.asked[warmup + steps] - self.asked[warmup]
        wait = sum(self.got[i] - self.asked[i] for i in range(warmup, warmup + steps))
        images = sum(self.images[warmup : warmup + steps])
        cpu = self.cpu[1] - self.cpu[0] if len(self.cpu) == 2 else float("nan")
        main = self.main_cpu[1] - self.main_cpu[0] if len(self.main_cpu) == 2 else float("nan")
        return {
            "images": images,
            "seconds": span,
            "images_per_s": images / span,
            "step_s": span / steps,
            "data_wait_fraction": wait / span,
            "cpu_s_per_step": cpu / steps,
            "main_cpu_s_per_step": main / steps,
        }


class RecordingLoader:
    """``len()`` = the steps to run; iterating draws from ``source`` and timestamps every hand-over.

    The clock is read after a device sync at the window's two ends only (``sync_at``), so queued GPU work
    is counted without adding a sync to every step. The process's CPU time is read there too: on a shared
    machine it moves far less with the neighbours' load than the wall clock does.
    """

    def __init__(
        self,
        source: Iterator[tuple[Any, Any]],
        steps: int,
        record: Recording,
        sync: Callable[[], None],
        sync_at: tuple[int, int],
    ):
        self.source, self.steps, self.record, self.sync, self.sync_at = source, steps, record, sync, sync_at

    def __len__(self) -> int:
        return self.steps

    @property
    def steps_in_epoch(self) -> int:
        """What ``pipeline.data.Loader`` calls the epoch's step count (it always starts at batch 0 here)."""
        return self.steps

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for i in range(self.steps + 1):
            if i in self.sync_at:
                self.sync()
                self.record.cpu.append(time.process_time())
                self.record.main_cpu.append(time.thread_time())
            self.record.asked.append(time.perf_counter())
            if i == self.steps:
                return
            images, labels = next(self.source)
            self.record.got.append(time.perf_counter())
            self.record.images.append(int(labels.shape[0]))
            yield images, labels


def real_batches(data_cfg: Any, setup: Setup) -> Iterator[tuple[Any, Any]]:
    """The training loader's batches, epoch after epoch (each epoch a fresh pipeline, as in training)."""
    import torch

    from pipeline import data

    for epoch in itertools.count():
        yield from data.train_loader(
            data_cfg,
            dp_rank=0,
            dp_size=1,
            epoch=epoch,
            seed=setup.seed,
            device=torch.device(setup.device),
            batch_size=setup.batch_size,
            num_classes=setup.num_classes,
        )


def synthetic_batches(setup: Setup, crop: int = 227, pool: int = 4) -> Iterator[tuple[Any, Any]]:
    """A few fixed batches already on the device, cycled: no input cost at all."""
    import torch

    g = torch.Generator().manual_seed(setup.seed)
    made = []
    for _ in range(pool):
        images = torch.randn(setup.batch_size, 3, crop, crop, generator=g).to(setup.device)
        if setup.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, setup.num_classes, (setup.batch_size,), generator=g).to(setup.device)
        made.append((images, labels))
    return itertools.cycle(made)


def data_config(**values: Any) -> Any:
    """A ``DataConfig`` for benchmarks: shards checked by size only (hashing them is measured on its own,
    ``python -m pipeline.bench.data --verify``; here it would be timed as data wait)."""
    from pipeline.data import DataConfig

    values.setdefault("verify", "size")
    return DataConfig(**values)


def sync(device: str) -> Callable[[], None]:
    import torch

    return (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)


def open_train(data_cfg: Any) -> tuple[Any, Any]:
    """The train split and its normalisation constants, as the loaders see them."""
    from pipeline import data

    opener = getattr(data, "open_dataset", None) or data.open_split  # the pipeline.data package names it so
    return opener(data_cfg, "train")


# ------------------------------------------------------------------------------------------------ input alone


def torchvision_batches(data_cfg: Any, *, batch_size: int, workers: int, device: str) -> Iterator[tuple[Any, Any]]:
    """The usual recipe a user would write first: webdataset + PIL + torchvision transforms in workers."""
    import torch
    import torchvision.transforms as T
    import webdataset as wds

    split, norm = open_train(data_cfg)
    transform = T.Compose(
        [
            T.RandomCrop(norm.crop),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    dataset = (
        wds.WebDataset([str(p) for p in split.shards], shardshuffle=len(split.shards), empty_check=False)
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(transform, int)
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        persistent_workers=workers > 0,
    )
    for _ in itertools.count():
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


# ------------------------------------------------------------------------------------------------ the two loops


def run_trainer(
    setup: Setup, data_cfg: Any, source: Iterator[tuple[Any, Any]], *, warmup: int, steps: int, run_dir: Path
) -> Recording:
    """``Trainer.fit`` for ``warmup + steps + 1`` steps of one long epoch, defaults otherwise (a fresh run dir)."""
    import torch

    from pipeline.config import OptimConfig, RunConfig, TrainConfig
    from pipeline.mesh import ParallelDims, build_mesh
    from pipeline.train import Loaders, build_trainer

    total = warmup + steps + 1
    record = Recording()

    def train(cfg: Any, **_: Any) -> RecordingLoader:
        return RecordingLoader(source, total, record, sync(setup.device), (warmup, warmup + steps))

    cfg = RunConfig(
        run_dir=str(run_dir),
        data=data_cfg,
        model=setup.model_config(),
        optim=OptimConfig(batch_size=setup.batch_size),
        train=TrainConfig(
            epochs=1,
            max_steps=total,
            seed=setup.seed,
            tp=1,
            amp=setup.amp,
            device="cuda" if setup.device.startswith("cuda") else "cpu",
        ),
    )
    device = torch.device(setup.device)
    trainer = build_trainer(
        cfg, build_mesh(ParallelDims(1, 0, 1), device.type), device, threading.Event(), Loaders(train=train)
    )
    trainer.fit()
    return record


def run_plain(setup: Setup, source: Iterator[tuple[Any, Any]], *, warmup: int, steps: int) -> Recording:
    """The minimal loop a user would write: forward, loss, backward, SGD step (the trainer's hyperparameters)."""
    import torch
    import torch.nn.functional as F

    from pipeline.config import OptimConfig
    from pipeline.model import build_model

    torch.manual_seed(setup.seed)
    model = build_model(setup.model_config()).to(setup.device)
    optim = OptimConfig()
    opt = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    model.train()
    record = Recording()
    device_type = torch.device(setup.device).type
    loader = RecordingLoader(source, warmup + steps + 1, record, sync(setup.device), (warmup, warmup + steps))
    for images, labels in loader:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=setup.amp == "bf16"):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return record


def loop_overhead(
    setup: Setup, data_cfg: Any, *, synthetic: bool, warmup: int, steps: int, rounds: int, scratch: Path
) -> dict[str, Any]:
    """Trainer vs plain loop, alternating rounds on fresh loaders; the best round of each counts."""
    per_loop: dict[str, list[dict[str, float]]] = {"trainer": [], "plain": []}
    for r in range(rounds):
        for name in ("plain", "trainer") if r % 2 else ("trainer", "plain"):
            source = synthetic_batches(setup) if synthetic else real_batches(data_cfg, setup)
            if name == "trainer":
                run_dir = scratch / f"run-{r}"
                record = run_trainer(setup, data_cfg, source, warmup=warmup, steps=steps, run_dir=run_dir)
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                record = run_plain(setup, source, warmup=warmup, steps=steps)
            per_loop[name].append(record.window(warmup, steps))
    best = {name: max(rs, key=lambda w: w["images_per_s"]) for name, rs in per_loop.items()}
    least_cpu = {name: min(w["cpu_s_per_step"] for w in rs) for name, rs in per_loop.items()}
    least_main = {name: min(w["main_cpu_s_per_step"] for w in rs) for name, rs in per_loop.items()}
    return {
        "loader": "synthetic" if synthetic else data_cfg.loader,
        "trainer": best["trainer"],
        "plain": best["plain"],
        "rounds": per_loop,
        "overhead": best["plain"]["images_per_s"] / best["trainer"]["images_per_s"] - 1,
        "cpu_s_per_step": least_cpu,
        "cpu_overhead": least_cpu["trainer"] / least_cpu["plain"] - 1,
        "main_cpu_s_per_step": least_main,
        "main_cpu_overhead": least_main["trainer"] / least_main["plain"] - 1,
        # a neighbour's load drifts slowly: the two loops of one round ran back to back
        "paired_cpu_overhead_median": statistics.median(
            t["cpu_s_per_step"] / p["cpu_s_per_step"] - 1 for t, p in zip(per_loop["trainer"], per_loop["plain"])
        ),
    }


# ------------------------------------------------------------------------------------------------ the machine


def environment(device: str) -> dict[str, Any]:
    """Machine, versions and date: what a figure in docs/BENCHMARKS.md must come with."""
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "load_average": list(os.getloadavg()),
        "command": "python -m pipeline.bench.train " + " ".join(sys.argv[1:]),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_setup(args: argparse.Namespace, device: str, num_classes: int) -> Setup:
    size = args.size if args.size != "auto" else ("paper" if device.startswith("cuda") else "cpu")
    widths, fc_width, batch = SIZES[size]
    batch = args.batch_size or batch
    if batch < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch})")
    return Setup(
        widths=widths, fc_width=fc_width, num_classes=num_classes, batch_size=batch, device=device, amp=args.amp
    )
