"""End to end: the real ``Trainer`` loop against a bare PyTorch loop, the tower split's price, the checkpoint stall.

    python -m pipeline.bench.train [--data SHARDS] [--batch-size 16] [--steps 40] [--rounds 3] [--json FILE]
    python -m pipeline.bench.train --gpu-report --data SHARDS       # on a CUDA machine: see pipeline.bench.gpu

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
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from basics.errors import UserError, run_cli
from pipeline.bench.harness import (
    SIZES,
    Setup,
    data_config,
    environment,
    loop_overhead,
    resolve_setup,
    sync,
)

# ------------------------------------------------------------------------------------------------ tp=2 vs tp=1


def _tp_worker(rank: int, setup: Setup, steps: int, port: int, out: str) -> None:
    """One tower of a tp=2 pair (spawned): init the pair's group, time the model step, rank 0 writes the result."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from pipeline.bench.model import time_steps
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

    from pipeline.bench import train as importable  # spawned children import the worker by this name
    from pipeline.bench.model import time_steps
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
    wait_device = sync(device)
    blocked, background, to_host, hashing = [], [], [], []
    size = 0
    for i in range(saves):
        state.progress.step = i + 1
        wait_device()
        start = time.perf_counter()
        path = checkpointer.save(state, torch.device(device))
        blocked.append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpointer.wait()
        background.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        start = time.perf_counter()
        state.tensors()
        wait_device()
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
        help="the GPU input path side by side (pipeline.bench.gpu); needs CUDA and --data",
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
        from pipeline.bench import gpu as bench_gpu

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
        from basics.files import write_json_atomic

        write_json_atomic(args.json, report)
    return 0


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
