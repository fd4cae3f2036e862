"""Input-pipeline throughput: DALI vs the PyTorch DataLoader fallback, same shards, same cores, one run.

    python -m pipeline.bench_data --data SHARDS [--batch-size 64] [--workers 2] [--steps 30] [--device cpu]

Each loader produces training batches exactly as training does (``pipeline.data.train_loader``:
decode, random crop, mirror, lighting, mean subtraction, float32 NCHW on ``--device``).
``--workers`` is DALI's CPU threads and the DataLoader's worker processes alike. The loaders
take turns (``--rounds`` each) so that drift in a shared machine's load hits both; the best
round counts. Steady state excludes each epoch's first batch (pipeline build, worker start-up,
shuffle-buffer fill), which is reported separately as start-up time. On a machine shared with
other work, wall-clock rates move with the neighbours' load; images per CPU-second (user + system
time of this process and its DataLoader workers, start-up included) measures the work per image
and hardly moves, so both are printed. No fixture data is
bundled: ``python -m tests._data_fixtures OUT --images 2000`` writes 256x256 natural-looking
JPEG shards to measure on.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import time
from dataclasses import replace
from typing import Any

from pipeline.data import DataConfig, train_loader
from pipeline.data.common import resolve_workers
from preprocess.errors import UserError, run_cli


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
    return {"images_per_s": images / busy if busy else float("nan"), "startup_s": sum(startups) / len(startups),
            "images": images, "images_per_cpu_s": delivered / cpu if cpu else float("nan")}


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and of its exited, waited-for children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="preprocessed dataset directory (manifest.json + shards)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (per rank)")
    parser.add_argument("--workers", type=int, default=0, help="DALI threads = DataLoader workers (0 = all CPUs)")
    parser.add_argument("--steps", type=int, default=30, help="timed batches per loader and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per loader; the best counts")
    parser.add_argument("--loaders", default="dali,torch", help="comma-separated: dali, torch")
    parser.add_argument("--device", default="cpu", help="where batches are delivered: cpu or cuda[:N]")
    args = parser.parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import torch

    device = torch.device(args.device)
    workers = resolve_workers(args.workers)
    loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    base = DataConfig(data=args.data, workers=workers)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in loaders}
    for _ in range(args.rounds):
        for name in loaders:
            results[name].append(measure(replace(base, loader=name), batch_size=args.batch_size, steps=args.steps,
                                         device=device))

    import nvidia.dali
    import torchvision

    print(f"# input pipeline, {datetime.date.today().isoformat()}, {platform.node() or 'host'}: "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, device {device}")
    print(f"# torch {torch.__version__}, torchvision {torchvision.__version__}, DALI {nvidia.dali.__version__}, "
          f"Python {platform.python_version()}; batch {args.batch_size}, {workers} workers/threads, "
          f"{args.steps} steps x {args.rounds} rounds")
    print(f"{'loader':<8} {'img/s (best)':>13} {'img/s (all rounds)':>24} {'img/CPU-s':>10} {'start-up s':>11}")
    best, per_cpu = {}, {}
    for name, rounds in results.items():
        best[name] = max(r["images_per_s"] for r in rounds)
        per_cpu[name] = max(r["images_per_cpu_s"] for r in rounds)
        every = ", ".join(f"{r['images_per_s']:.0f}" for r in rounds)
        startup = sum(r["startup_s"] for r in rounds) / len(rounds)
        print(f"{name:<8} {best[name]:>13.0f} {every:>24} {per_cpu[name]:>10.0f} {startup:>11.2f}")
    if "dali" in best and "torch" in best:
        print(f"DALI / DataLoader: {best['dali'] / best['torch']:.2f}x images/s, "
              f"{per_cpu['dali'] / per_cpu['torch']:.2f}x images per CPU-second")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
