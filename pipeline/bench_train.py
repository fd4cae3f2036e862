"""End to end: the real ``Trainer`` loop against a bare PyTorch loop, the tower split's price, the checkpoint stall.

    python -m pipeline.bench_train [--data SHARDS] [--batch-size 16] [--steps 40] [--rounds 3] [--json FILE]
    python -m pipeline.bench_train --gpu-report --data SHARDS       # on a CUDA machine: see pipeline.bench_gpu

Loop overhead: the same model, batch, loader and device through ``pipeline.train.Trainer.fit`` (logging,
TensorBoard, control all-reduce, checkpoint timer, as configured by default) and through a plain loop
(forward, loss, backward, step, nothing else), taking turns (``--rounds``; the best round counts, so a
neighbour's load on a shared machine hits both). Both read the same batches from the same loader, which
records when each batch is asked for and handed over: the window is ``--steps`` steps after ``--warmup``,
and data wait is the time spent inside the loader; the process's CPU time per step, which hardly moves
with a shared machine's load, is reported beside the wall clock. Loaders: the real one (``pipeline.data.train_loader``
on ``--data``, epochs chained) and an in-memory synthetic one that isolates the loop's own cost.

Tower split: median step time (forward, backward, SGD) of the model on one device against its two
towers on two (``--tp 2``: two gloo processes on CPU, two GPUs with NCCL), the same batch.

Checkpoint stall: ``Checkpointer.save`` of the full-size paper model (weights + momentum, ~0.5 GB) in
``--checkpoint-dir``: the time a training rank is blocked per save, with its parts (copy to host,
hashing for the integrity check). CPU-sized by default; ``--size paper`` (the default on a GPU) uses
the paper's model and batch 128. Figures and their reading: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preprocess.errors import UserError, run_cli

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
    """A ``DataConfig`` for benchmarks: shards checked by size only, where the config has that choice.

    Every epoch here builds a fresh loader without the trainer's verified-shards cache; hashing the
    shards each time would be timed as data wait.
    """
    import dataclasses

    from pipeline.data import DataConfig

    if "verify" in {f.name for f in dataclasses.fields(DataConfig)}:
        values.setdefault("verify", "size")
    return DataConfig(**values)


def _sync(device: str) -> Callable[[], None]:
    import torch

    return (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)


# ------------------------------------------------------------------------------------------------ the two loops


def run_trainer(
    setup: Setup, data_cfg: Any, source: Iterator[tuple[Any, Any]], *, warmup: int, steps: int, run_dir: Path
) -> Recording:
    """``Trainer.fit`` for ``warmup + steps + 1`` steps of one long epoch, defaults otherwise (a fresh run dir)."""
    import torch

    from pipeline.config import OptimConfig, RunConfig, TrainConfig
    from pipeline.mesh import ParallelDims, build_mesh
    from pipeline.train import Loaders, Trainer

    total = warmup + steps + 1
    record = Recording()

    def train(cfg: Any, **_: Any) -> RecordingLoader:
        return RecordingLoader(source, total, record, _sync(setup.device), (warmup, warmup + steps))

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
    trainer = Trainer(
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
    loader = RecordingLoader(source, warmup + steps + 1, record, _sync(setup.device), (warmup, warmup + steps))
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


# ------------------------------------------------------------------------------------------------ tp=2 vs tp=1


def _tp_worker(rank: int, setup: Setup, steps: int, port: int, out: str) -> None:
    """One tower of a tp=2 pair (spawned): init the pair's group, time the model step, rank 0 writes the result."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from pipeline.bench_model import time_steps
    from pipeline.model import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = setup.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=2, timeout=timedelta(minutes=5))
    try:
        torch.manual_seed(setup.seed)  # both towers see the same batch, as in training
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        model = build_model(setup.model_config(), tp_group=dist.group.WORLD).to(device)
        seconds = time_steps(
            model,
            batch=setup.batch_size,
            steps=steps,
            device=device,
            bf16=setup.amp == "bf16",
            channels_last=setup.channels_last,
        )
        if rank == 0:
            Path(out).write_text(json.dumps({"step_s": seconds}))
    finally:
        dist.destroy_process_group()


def tower_split(setup: Setup, *, steps: int, rounds: int, scratch: Path) -> dict[str, Any]:
    """Median step time on one device vs the two towers on two (processes or GPUs), alternating rounds."""
    import torch
    import torch.multiprocessing as mp

    from pipeline import bench_train as importable  # spawned children import the worker by this name
    from pipeline.bench_model import time_steps
    from pipeline.model import build_model

    if setup.device.startswith("cuda") and torch.cuda.device_count() < 2:
        return {"skipped": f"tp=2 needs 2 GPUs; {torch.cuda.device_count()} visible"}
    one, two = [], []
    for r in range(rounds):
        torch.manual_seed(setup.seed)
        model = build_model(setup.model_config()).to(setup.device)
        one.append(
            time_steps(
                model,
                batch=setup.batch_size,
                steps=steps,
                device=torch.device(setup.device),
                bf16=setup.amp == "bf16",
                channels_last=setup.channels_last,
            )
        )
        del model
        out = scratch / f"tp-{r}.json"
        mp.start_processes(
            importable._tp_worker, args=(setup, steps, _free_port(), str(out)), nprocs=2, start_method="spawn"
        )
        two.append(json.loads(out.read_text())["step_s"])
    t1, t2 = min(one), min(two)
    return {
        "tp1_step_s": t1,
        "tp2_step_s": t2,
        "tp1_rounds": one,
        "tp2_rounds": two,
        "speedup": t1 / t2,
        "split_efficiency": t1 / (2 * t2),
        "threads_per_process": torch.get_num_threads(),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ checkpoint stall


def checkpoint_stall(
    device: str, *, saves: int, directory: Path, model_cfg: Any = None, async_save: bool = False
) -> dict[str, Any]:
    """``Checkpointer.save`` of a model (the full-size paper model) with SGD momentum, ``saves`` times; its parts.

    ``async_save``: the time training is blocked is the copy to host memory; the write goes on in the
    background (``background_s``: from the return of ``save`` until the checkpoint is committed)."""
    import torch

    from pipeline.checkpoint import CheckpointConfig, Checkpointer, TrainState, verify
    from pipeline.config import RunConfig
    from pipeline.model import ModelConfig, build_model
    from pipeline.schedule import LRSchedule, ScheduleConfig

    torch.manual_seed(0)
    model_cfg = model_cfg or ModelConfig(num_classes=1000)
    model = build_model(model_cfg).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():  # momentum buffers as after the first step (save writes zeros otherwise)
        opt.state[p]["momentum_buffer"] = torch.randn_like(p) * 1e-3
    cfg = RunConfig(run_dir=str(directory), model=model_cfg)
    layout = {"world_size": 1, "dp_size": 1, "tp_size": 1}
    state = TrainState(model, opt, LRSchedule(ScheduleConfig(), 0.01), cfg, layout, rank=0, tp_rank=0)
    checkpointer = Checkpointer(directory, CheckpointConfig(keep_last=1, async_save=async_save), rank=0)
    sync = _sync(device)
    blocked, background, to_host, hashing = [], [], [], []
    size = 0
    for i in range(saves):
        state.progress.step = i + 1
        sync()
        start = time.perf_counter()
        path = checkpointer.save(state, torch.device(device))
        blocked.append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpointer.wait()
        background.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        start = time.perf_counter()
        state.tensors()
        sync()
        to_host.append(time.perf_counter() - start)
        start = time.perf_counter()
        if verify(path) is not None:
            raise RuntimeError(f"{path} does not verify")
        hashing.append(time.perf_counter() - start)
    return {
        "bytes": size,
        "saves": saves,
        "async_save": async_save,
        "blocked_s": min(blocked),
        "blocked_rounds": blocked,
        "background_s": min(background),
        "state_to_host_s": min(to_host),
        "verify_hash_s": min(hashing),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# ------------------------------------------------------------------------------------------------ scaling on paper


@dataclass(frozen=True)
class ScalingAssumptions:
    """The model behind ``--scaling`` (docs/BENCHMARKS.md states and discusses each)."""

    step_s: float = 128 / 15064  # compiled paper model, bf16, batch 128 per GPU, one H100 (bench_model)
    parameters: float = 60.97e6  # the paper model with 1000 classes
    gpus_per_node: int = 8
    nvlink_bytes_per_s: float = 360e9  # NCCL all-reduce bus bandwidth inside an NVSwitch node
    link_efficiency: float = 0.8  # of the inter-node line rate that an all-reduce achieves
    overlap_window: float = 0.6  # share of the step after the FC gradients are ready (the conv backward)
    last_bucket: float = 0.04  # share of the gradient bytes produced last (conv layers): never hidden


def scaling_estimate(
    nodes: int,
    link_gbps: float,
    *,
    grad_bytes_per_param: int,
    overlap: bool,
    a: ScalingAssumptions = ScalingAssumptions(),
) -> dict[str, float]:
    """Step time and efficiency of data parallelism over ``nodes`` x 8 GPUs, one ``link_gbps`` NIC per node.

    Hierarchical ring all-reduce: reduce-scatter and all-gather inside the node over NVLink
    (2(g-1)/g of the bytes), then each GPU's 1/g across nodes, the g rings sharing the NIC (2(n-1)/n of
    the bytes through it). Overlap hides communication behind the conv layers' backward pass, except
    the last bucket's.
    """
    size = a.parameters * grad_bytes_per_param
    g = a.gpus_per_node
    inside = 2 * (g - 1) / g * size / a.nvlink_bytes_per_s
    across = 2 * (nodes - 1) / nodes * size / (a.link_efficiency * link_gbps * 1e9 / 8)
    comm = inside + across
    exposed = max(a.last_bucket * comm, comm - a.overlap_window * a.step_s) if overlap else comm
    step = a.step_s + exposed
    return {"allreduce_s": comm, "step_s": step, "efficiency": a.step_s / step, "images_per_s": nodes * g * 128 / step}


def print_scaling(a: ScalingAssumptions = ScalingAssumptions()) -> None:
    print(
        f"per-GPU step {1000 * a.step_s:.2f} ms at batch 128, {a.parameters / 1e6:.2f}M parameters; "
        "efficiency = step alone / step with the all-reduce"
    )
    print(
        "| link/node | nodes | GPUs | all-reduce fp32 | fp32 | fp32 + overlap | all-reduce bf16 | bf16 | "
        "bf16 + overlap | img/s (bf16 + overlap) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for link in (100, 200, 400, 3200):  # 3200: eight 400 Gb/s NICs per node (one per GPU, DGX H100-style)
        for nodes in (1, 2, 8, 32):
            cells = []
            for width in (4, 2):
                seq = scaling_estimate(nodes, link, grad_bytes_per_param=width, overlap=False, a=a)
                ovl = scaling_estimate(nodes, link, grad_bytes_per_param=width, overlap=True, a=a)
                cells += [
                    f"{1000 * seq['allreduce_s']:.1f} ms",
                    f"{100 * seq['efficiency']:.0f}%",
                    f"{100 * ovl['efficiency']:.0f}%",
                ]
            label = "8x400" if link == 3200 else str(link)
            print(f"| {label} Gb/s | {nodes} | {8 * nodes} | {' | '.join(cells)} | {ovl['images_per_s']:,.0f} |")


# ------------------------------------------------------------------------------------------------ the command


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
        "command": "python -m pipeline.bench_train " + " ".join(sys.argv[1:]),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench_train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        help="preprocessed dataset (manifest.json + shards) for the real loader; "
        "without it only the synthetic loader runs",
    )
    parser.add_argument(
        "--loaders",
        default="",
        help="comma-separated from synthetic, dali, torch (default: synthetic, plus dali with --data)",
    )
    parser.add_argument(
        "--size",
        choices=("auto", *SIZES),
        default="auto",
        help="model and batch: tiny (batch 8), cpu (a narrow model, batch 16) or paper (the paper's "
        "model, batch 128); auto = paper on a GPU, else cpu",
    )
    parser.add_argument("--batch-size", type=int, default=0, help="override the size's batch")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per loop and round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each loop counts")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    parser.add_argument("--workers", type=int, default=0, help="loader threads/workers (0 = this process's CPUs)")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none", help="autocast in both loops")
    parser.add_argument("--tp-steps", type=int, default=10, help="timed steps per tp round (0 = skip the tp check)")
    parser.add_argument(
        "--checkpoint-saves",
        type=int,
        default=3,
        help="saves of the full-size paper model to time (0 = skip; --size tiny saves the tiny "
        "model instead, for tests)",
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="where the checkpoint stall writes (the disk run dirs live on); default: a "
        "temporary directory under the current one, removed afterwards",
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument(
        "--scaling", action="store_true", help="print the data-parallel scaling estimate (arithmetic only) and exit"
    )
    parser.add_argument(
        "--gpu-report",
        action="store_true",
        help="the GPU input path side by side (pipeline.bench_gpu); needs CUDA and --data",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import torch

    if args.scaling:
        print_scaling()
        return 0
    if args.gpu_report:
        from pipeline import bench_gpu

        return bench_gpu.run(args)
    for name in ("steps", "rounds", "warmup"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            raise UserError(f"--{name} must be at least {0 if name == 'warmup' else 1} (got {getattr(args, name)})")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}, but no CUDA device is visible; use --device cpu")
    report = measure(args, device)
    print_report(report)
    if args.json:
        from preprocess.files import write_json_atomic

        write_json_atomic(args.json, report)
    return 0


def resolve_setup(args: argparse.Namespace, device: str, num_classes: int) -> Setup:
    size = args.size if args.size != "auto" else ("paper" if device.startswith("cuda") else "cpu")
    widths, fc_width, batch = SIZES[size]
    batch = args.batch_size or batch
    if batch < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch})")
    return Setup(
        widths=widths, fc_width=fc_width, num_classes=num_classes, batch_size=batch, device=device, amp=args.amp
    )


def measure(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Every part the options ask for, as one JSON-able report."""
    from dataclasses import asdict, replace

    from preprocess.format import read_manifest

    loaders = [x.strip() for x in args.loaders.split(",") if x.strip()] or (
        ["synthetic", "dali"] if args.data else ["synthetic"]
    )
    unknown = set(loaders) - {"synthetic", "dali", "torch"}
    if unknown:
        raise UserError(f"--loaders: unknown {', '.join(sorted(unknown))}; use synthetic, dali or torch")
    if any(x != "synthetic" for x in loaders) and not args.data:
        raise UserError(
            "--loaders dali/torch read real shards: pass --data SHARDS (a `python -m preprocess shard` output)"
        )
    num_classes = len(read_manifest(args.data).classes) if args.data else 1000
    setup = resolve_setup(args, device, num_classes)
    report: dict[str, Any] = {
        "environment": environment(device),
        "setup": asdict(setup),
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "loops": {},
    }
    scratch = Path(tempfile.mkdtemp(prefix="bench-train-", dir=args.checkpoint_dir or Path.cwd()))
    try:
        for name in loaders:
            data_cfg = data_config(
                data=args.data or "", loader=name if name != "synthetic" else "dali", workers=args.workers
            )
            report["loops"][name] = loop_overhead(
                setup,
                data_cfg,
                synthetic=name == "synthetic",
                warmup=args.warmup,
                steps=args.steps,
                rounds=args.rounds,
                scratch=scratch,
            )
        if args.tp_steps:
            report["tower_split"] = tower_split(
                replace(setup, num_classes=1000), steps=args.tp_steps, rounds=args.rounds, scratch=scratch
            )
        if args.checkpoint_saves:
            model_cfg = None if args.size != "tiny" else replace(setup, num_classes=1000).model_config()
            for key, background in (("checkpoint", False), ("checkpoint_async", True)):
                report[key] = checkpoint_stall(
                    device,
                    saves=args.checkpoint_saves,
                    directory=scratch / key,
                    model_cfg=model_cfg,
                    async_save=background,
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["environment"]["load_average_end"] = list(os.getloadavg())
    return report


def print_report(report: dict[str, Any]) -> None:
    env, setup = report["environment"], report["setup"]
    print(
        f"# {env['date']}, {env['host']}: {env['cpu']}, {env['cpus']} CPUs, device {env['device']}"
        f"{' (' + env['gpu'] + ')' if 'gpu' in env else ''}; load average {env['load_average'][0]:.2f} -> "
        f"{env['load_average_end'][0]:.2f}"
    )
    print(
        f"# torch {env['torch']}, DALI {env.get('dali', '-')}, Python {env['python']}; model widths "
        f"{','.join(map(str, setup['widths']))} fc {setup['fc_width']}, {setup['num_classes']} classes, batch "
        f"{setup['batch_size']}, amp {setup['amp']}; {report['steps']} steps after {report['warmup']}, "
        f"{report['rounds']} alternating rounds (best)"
    )
    print(f"# {env['command']}")
    print(f"{'loader':<10} {'loop':<8} {'img/s':>9} {'step ms':>9} {'data wait':>10} {'img/s all rounds':>24}")
    for name, loop in report["loops"].items():
        for which in ("plain", "trainer"):
            best = loop[which]
            every = ", ".join(f"{r['images_per_s']:.0f}" for r in loop["rounds"][which])
            print(
                f"{name:<10} {which:<8} {best['images_per_s']:>9.1f} {1000 * best['step_s']:>9.1f} "
                f"{100 * best['data_wait_fraction']:>9.1f}% {every:>24}"
            )
        extra_ms = 1000 * (loop["trainer"]["step_s"] - loop["plain"]["step_s"])
        cpu, main = loop["cpu_s_per_step"], loop["main_cpu_s_per_step"]
        print(
            f"{name:<10} Trainer overhead vs the plain loop: {100 * loop['overhead']:+.1f}% "
            f"(plain / trainer = {1 + loop['overhead']:.3f}x, {extra_ms:+.2f} ms/step); in CPU time "
            f"{100 * loop['cpu_overhead']:+.1f}% ({1000 * cpu['plain']:.1f} vs {1000 * cpu['trainer']:.1f} "
            f"CPU-ms/step, least of the rounds); the loop's thread alone {100 * loop['main_cpu_overhead']:+.1f}% "
            f"({1000 * main['plain']:.1f} vs {1000 * main['trainer']:.1f}); "
            f"both loops {loop['trainer']['images']} images; round by round (median) "
            f"{100 * loop['paired_cpu_overhead_median']:+.1f}% CPU"
        )
    split = report.get("tower_split")
    if split and "skipped" in split:
        print(f"tower split: skipped ({split['skipped']})")
    elif split:
        print(
            f"tower split (1000 classes, same batch): tp=1 {1000 * split['tp1_step_s']:.1f} ms/step on one device, "
            f"tp=2 {1000 * split['tp2_step_s']:.1f} ms/step on two: {split['speedup']:.2f}x faster, "
            f"{100 * split['split_efficiency']:.0f}% of a perfect split "
            f"({split['threads_per_process']} thread(s) per process)"
        )
    ckpt = report.get("checkpoint")
    if ckpt:
        print(
            f"checkpoint stall ({ckpt['parameters'] / 1e6:.1f}M parameters, {ckpt['bytes'] / 1e9:.2f} GB "
            f"weights + momentum): blocked {ckpt['blocked_s']:.2f} s per save (best of {ckpt['saves']}: "
            f"{', '.join(f'{s:.2f}' for s in ckpt['blocked_rounds'])}); of which state to host "
            f"{ckpt['state_to_host_s']:.2f} s, re-hashing for the integrity check ~{ckpt['verify_hash_s']:.2f} s"
        )
    background = report.get("checkpoint_async")
    if background:
        print(
            f"checkpoint stall with --checkpoint.async-save: blocked {background['blocked_s']:.2f} s per save "
            f"(copy to host memory), then {background['background_s']:.2f} s written in the background"
        )


if __name__ == "__main__":
    sys.exit(main())
