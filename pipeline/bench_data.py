"""Input-pipeline throughput: DALI vs the PyTorch DataLoader fallback, same shards, same cores, one run.

    python -m pipeline.bench_data --data SHARDS [--batch-size 64] [--workers 2] [--steps 30] [--means image,channel]
    python -m pipeline.bench_data --data SHARDS --resume-at 0.1,0.9   # time to the first batch of a resumed epoch
    python -m pipeline.bench_data --data SHARDS --verify               # sha256 cost per shard

Each loader produces training batches exactly as training does (``pipeline.data.train_loader``:
decode, random crop, mirror, lighting, mean subtraction, float32 NCHW on ``--device``).
``--workers`` is DALI's CPU threads and the DataLoader's worker processes alike. The
configurations take turns (``--rounds`` each) so that drift in a shared machine's load hits all;
the best round counts. Steady state excludes each epoch's first batch (pipeline build, worker
start-up), which is reported separately as start-up time. Images per CPU-second (user + system
time of this process and its DataLoader workers, start-up included) measures the work per image
and moves less with the neighbours' load than wall-clock rates, so both are printed. No fixture
data is bundled: ``python -m tests._data_fixtures OUT --images 2000`` writes 256x256
natural-looking JPEG shards to measure on.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import time
from dataclasses import replace
from typing import Any

from pipeline.data import DataConfig, train_loader
from pipeline.data.common import resolve_workers
from preprocess.errors import run_cli


def time_to_first_batch(cfg: DataConfig, *, batch_size: int, device: Any, at: float, skip: bool) -> tuple[int, float]:
    """Seconds from ``train_loader`` to the first batch at fraction ``at`` of epoch 0: with ``start_batch``, or
    (``skip``) by iterating from batch 0 and discarding the batches before, as a trainer without it would."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps = len(train_loader(cfg, dp_rank=0, dp_size=1, epoch=0, seed=0, device=device, batch_size=batch_size))
    k = min(int(at * steps), steps - 1)
    start = time.perf_counter()
    loader = train_loader(
        cfg, dp_rank=0, dp_size=1, epoch=0, seed=0, device=device, batch_size=batch_size, start_batch=0 if skip else k
    )
    for i, _ in enumerate(loader):
        if skip and i < k:
            continue
        sync()
        break
    return k, time.perf_counter() - start


def measure(cfg: DataConfig, *, batch_size: int, steps: int, device: Any) -> dict[str, float]:
    """Steady-state images/s over ``steps`` batches (epochs restart as needed) and mean start-up seconds."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cpu_before = _cpu_seconds()
    images = 0
    busy = 0.0
    startups = []
    epoch = 0
    done = 0
    while done < steps:
        loader = train_loader(cfg, dp_rank=0, dp_size=1, epoch=epoch, seed=0, device=device, batch_size=batch_size)
        start = time.perf_counter()
        first = True
        for batch, _ in loader:
            sync()
            now = time.perf_counter()
            if first:
                startups.append(now - start)
                first = False
            else:
                images += batch.shape[0]
                busy += now - start
                done += 1
            start = now
            if done >= steps:
                break
        del loader  # closes the epoch: DataLoader workers exit and their CPU time is counted
        epoch += 1
    cpu = _cpu_seconds() - cpu_before
    delivered = images + len(startups) * batch_size  # start-up batches cost CPU too
    return {
        "images_per_s": images / busy if busy else float("nan"),
        "startup_s": sum(startups) / len(startups),
        "images": images,
        "images_per_cpu_s": delivered / cpu if cpu else float("nan"),
    }


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and of its exited, waited-for children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench_data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="preprocessed dataset directory (manifest.json + shards)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (per rank)")
    parser.add_argument("--workers", type=int, default=0, help="DALI threads = DataLoader workers (0 = all CPUs)")
    parser.add_argument("--steps", type=int, default=30, help="timed batches per loader and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per configuration; the best counts")
    parser.add_argument("--loaders", default="dali,torch", help="comma-separated: dali, torch")
    parser.add_argument("--means", default="image", help="comma-separated --data.mean values: image, channel")
    parser.add_argument("--device", default="cpu", help="where batches are delivered: cpu or cuda[:N]")
    parser.add_argument(
        "--resume-at",
        default="",
        help="comma-separated epoch fractions (e.g. 0.1,0.9): time to "
        "the first batch of a resumed epoch instead of throughput",
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="with --resume-at: skip the decode-and-discard baseline (slow late in the epoch)",
    )
    parser.add_argument("--verify", action="store_true", help="time the sha256 check of every train shard instead")
    args = parser.parse_args(argv)
    return run_cli(lambda: _run(args))


def _header(args: argparse.Namespace, device: Any, workers: int) -> None:
    import nvidia.dali
    import torch
    import torchvision

    print(
        f"# input pipeline, {datetime.date.today().isoformat()}, {platform.node() or 'host'}: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, device {device}"
    )
    print(
        f"# torch {torch.__version__}, torchvision {torchvision.__version__}, DALI {nvidia.dali.__version__}, "
        f"Python {platform.python_version()}; batch {args.batch_size}, {workers} workers/threads"
    )


def _run(args: argparse.Namespace) -> int:
    import torch

    device = torch.device(args.device)
    workers = resolve_workers(args.workers)
    loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    base = DataConfig(data=args.data, workers=workers)
    if args.verify:
        return _verify(args, base)
    if args.resume_at:
        return _resume(args, base, loaders, device, workers)
    configs = [(name, mean.strip()) for name in loaders for mean in args.means.split(",") if mean.strip()]
    results: dict[tuple[str, str], list[dict[str, float]]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for name, mean in configs:
            cfg = replace(base, loader=name, mean=mean, verify="size")  # hashing is timed by --verify
            results[(name, mean)].append(measure(cfg, batch_size=args.batch_size, steps=args.steps, device=device))
    _header(args, device, workers)
    print(f"# {args.steps} steps x {args.rounds} rounds")
    print(
        f"{'loader':<8} {'mean':<8} {'img/s (best)':>13} {'img/s (all rounds)':>24} {'img/CPU-s':>10} "
        f"{'start-up s':>11}"
    )
    best, per_cpu = {}, {}
    for (name, mean), rounds in results.items():
        best[name, mean] = max(r["images_per_s"] for r in rounds)
        per_cpu[name, mean] = max(r["images_per_cpu_s"] for r in rounds)
        every = ", ".join(f"{r['images_per_s']:.0f}" for r in rounds)
        startup = sum(r["startup_s"] for r in rounds) / len(rounds)
        print(
            f"{name:<8} {mean:<8} {best[name, mean]:>13.0f} {every:>24} {per_cpu[name, mean]:>10.0f} {startup:>11.2f}"
        )
    for mean in {m for _, m in configs}:
        if ("dali", mean) in best and ("torch", mean) in best:
            print(
                f"mean={mean}: DALI / DataLoader {best['dali', mean] / best['torch', mean]:.2f}x images/s, "
                f"{per_cpu['dali', mean] / per_cpu['torch', mean]:.2f}x images per CPU-second"
            )
    for name in loaders:
        if (name, "image") in best and (name, "channel") in best:
            print(
                f"{name}: mean image / per-channel {best[name, 'image'] / best[name, 'channel']:.2f}x images/s, "
                f"{per_cpu[name, 'image'] / per_cpu[name, 'channel']:.2f}x images per CPU-second"
            )
    return 0


def _resume(args: argparse.Namespace, base: DataConfig, loaders: list[str], device: Any, workers: int) -> int:
    fractions = [float(f) for f in args.resume_at.split(",") if f.strip()]
    rows = []
    for name in loaders:
        cfg = replace(base, loader=name, verify="size")
        for skip in (False,) if args.no_baseline else (False, True):
            for at in fractions:
                k, seconds = min(
                    (
                        time_to_first_batch(cfg, batch_size=args.batch_size, device=device, at=at, skip=skip)
                        for _ in range(args.rounds)
                    ),
                    key=lambda r: r[1],
                )
                rows.append((name, "decode and discard" if skip else "start_batch", at, k, seconds))
    _header(args, device, workers)
    print(f"# time from train_loader() to the first batch of a resumed epoch, best of {args.rounds}")
    print(f"{'loader':<8} {'how':<20} {'at':>5} {'batch':>6} {'seconds':>8}")
    for name, how, at, k, seconds in rows:
        print(f"{name:<8} {how:<20} {at:>5.2f} {k:>6} {seconds:>8.2f}")
    return 0


def _verify(args: argparse.Namespace, base: DataConfig) -> int:
    """sha256 of every train shard, from the page cache and with the shard evicted from it first (as from disk)."""
    from pipeline.data import open_dataset
    from pipeline.data.integrity import file_sha256

    split, _ = open_dataset(base, "train")
    totals = {"cached": [0, 0.0], "evicted": [0, 0.0]}
    for path in split.shards:
        for how in ("evicted", "cached"):
            if how == "evicted":
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            file_sha256(path)
            seconds = time.perf_counter() - start
            size = path.stat().st_size
            totals[how][0] += size
            totals[how][1] += seconds
            print(f"{path.name} ({how}): {size / 1e9:.2f} GB in {seconds:.2f} s ({size / 1e9 / seconds:.2f} GB/s)")
    for how, (size, seconds) in totals.items():
        print(
            f"all {len(split.shards)} train shards, {how}: {size / 1e9:.2f} GB in {seconds:.2f} s "
            f"({size / 1e9 / seconds:.2f} GB/s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
