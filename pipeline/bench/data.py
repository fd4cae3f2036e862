"""Input-pipeline throughput: DALI vs the PyTorch DataLoader fallback, same shards, same cores, one run.

    python -m pipeline.bench.data --data SHARDS [--batch-size 64] [--workers 2] [--steps 30] [--means image,channel]
    python -m pipeline.bench.data --data SHARDS --resume-at 0.1,0.9   # time to the first batch of a resumed epoch
    python -m pipeline.bench.data --data SHARDS --verify               # sha256 cost per shard

Each loader produces training batches exactly as training does (``pipeline.data.train_loader``:
decode, random crop, mirror, lighting, mean subtraction, float32 NCHW on ``--device``).
``--workers`` is DALI's CPU threads and the DataLoader's worker processes alike. The
configurations take turns (``--rounds`` each) so that drift in a shared machine's load hits all;
the best round counts. Steady state excludes each epoch's first batch (pipeline build, worker
start-up), which is reported separately as start-up time. Images per CPU-second (user + system
time of this process and its DataLoader workers, start-up included) measures the work per image
and moves less with the neighbours' load than wall-clock rates, so both are printed. No fixture
data is bundled: ``python -m tests.support.datasets OUT --images 2000`` writes 256x256
natural-looking JPEG shards to measure on.

``--input-path``: the DALI loader's cost to the *training thread* (the thread that iterates it: on a
GPU it also launches the model), part by part in microseconds of that thread's CPU time per sample
(``time.thread_time``), and images per CPU-second of the whole process tree (worker processes
included) against a bare DALI graph of the same operators and a hand-written webdataset +
DataLoader pipeline, torch's default threads. The parts are found by name, so running this file
with an older checkout first on ``PYTHONPATH`` measures that checkout with the same code::

    PYTHONPATH=OLD_CHECKOUT python pipeline/bench/data.py --data SHARDS --input-path
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import resource
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from basics import procfs
from basics.errors import run_cli
from pipeline.data import DataConfig, resolve_workers, train_loader


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


# ------------------------------------------------------------------------------------------------ the input path


def process_tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process, of its live descendants (DataLoader or DALI worker processes)
    and of its exited, waited-for children: differences of two readings are the whole tree's work between them."""
    own, dead = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + dead.ru_utime + dead.ru_stime
    children: dict[int, list[tuple[int, float]]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        fields = procfs.stat_fields(entry)
        if fields is None:  # exited meanwhile
            continue
        ticks = sum(int(procfs.field(fields, n)) for n in (procfs.UTIME, procfs.STIME, procfs.CUTIME, procfs.CSTIME))
        children.setdefault(int(procfs.field(fields, procfs.PPID)), []).append((int(entry), ticks / tick))
    pending = [os.getpid()]
    while pending:
        for pid, seconds in children.get(pending.pop(), []):
            total += seconds
            pending.append(pid)
    return total


class ThreadParts:
    """While entered, sums the calling thread's CPU time (``time.thread_time``) in each part of the DALI loader.

    The parts are the functions that do them, found by name and wrapped (so the same code measures an
    older checkout): ``feed`` is ``dali_pipeline.Feed.__call__`` (reading the samples, labels, window
    parameters), ``hand-over to DALI`` DALI's ``Pipeline._feed_input`` (what its external_source calls
    per input), ``mean image`` ``dali_pipeline.Output._subtract_windows`` where it exists (the loader
    subtracted the mean image's windows in torch, sample by sample, before it moved into the graph),
    ``copy out`` ``Output.__call__`` less the mean image. Only the entering thread is counted, and only
    while ``counting`` is set.
    """

    PARTS = ("feed", "hand-over to DALI", "mean image", "copy out")

    def __init__(self) -> None:
        from nvidia.dali.pipeline import Pipeline

        from pipeline.data import dali_pipeline

        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.counting = False
        self._targets = [
            ("feed", dali_pipeline.Feed, "__call__"),
            ("hand-over to DALI", Pipeline, "_feed_input"),
            ("mean image", dali_pipeline.Output, "_subtract_windows"),
            ("copy out", dali_pipeline.Output, "__call__"),
        ]
        self._saved: list[tuple[type, str, Any]] = []
        self._thread = threading.get_ident()

    def _wrap(self, part: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)  # keeps the signature: DALI inspects its source's arguments
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.counting or threading.get_ident() != self._thread:
                return function(*args, **kwargs)
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part] += time.thread_time() - start

        return timed

    def __enter__(self) -> "ThreadParts":
        for part, owner, name in self._targets:
            function = owner.__dict__.get(name)
            if function is not None:
                self._saved.append((owner, name, function))
                setattr(owner, name, self._wrap(part, function))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, function in reversed(self._saved):
            setattr(owner, name, function)
        self._saved.clear()

    def per_sample_us(self, samples: int, total: float) -> dict[str, float]:
        """µs per sample of each part, ``other`` (the rest of the loader's time: DALI's run and outputs calls,
        the batch's bookkeeping) and ``total`` (everything the thread spent inside the loader)."""
        parts = dict(self.seconds)
        parts["copy out"] -= parts["mean image"]  # the mean image was subtracted inside the copy
        parts["other"] = total - sum(parts.values())
        parts["total"] = total
        return {part: seconds / samples * 1e6 for part, seconds in parts.items()}


def thread_parts(cfg: DataConfig, *, batch_size: int, warmup: int, steps: int, device: Any) -> dict[str, float]:
    """The DALI loader's cost to the thread that iterates it, µs per sample by part (:class:`ThreadParts`).

    Batches ``warmup .. warmup+steps-1`` of one epoch, each ``next()`` timed on the thread: at steady
    state each one feeds DALI one batch and copies one out, so the parts and the total cover the same
    batches. The epoch must have ``warmup + steps`` batches and a few more (DALI runs ahead).
    """
    cfg = replace(cfg, loader="dali")
    with ThreadParts() as parts:
        loader = train_loader(cfg, dp_rank=0, dp_size=1, epoch=0, seed=0, device=device, batch_size=batch_size)
        if len(loader) < warmup + steps + 3:
            raise ValueError(
                f"an epoch of {len(loader)} batches of {batch_size} is too short to time {steps} after {warmup}; "
                "use more images (python -m tests.support.datasets OUT --images N) or fewer --steps"
            )
        batches = iter(loader)
        total, samples = 0.0, 0
        for i in range(warmup + steps):
            parts.counting = i >= warmup
            start = time.thread_time()
            _, labels = next(batches)
            if parts.counting:
                total += time.thread_time() - start
                samples += len(labels)
        parts.counting = False
        del batches, loader
    return parts.per_sample_us(samples, total)


def bare_graph(
    cfg: DataConfig,
    *,
    batch_size: int,
    workers: int,
    gpu: bool,
    hw_decoder_load: float | None = None,
    seed: int = 0,
    device_id: int = 0,
) -> Any:
    """The reference: a built DALI pipeline of DALI's own operators only, doing the loader's work.

    DALI's webdataset reader (shuffled), decode, random window, mirror and PCA lighting in one
    ``crop_mirror_normalize``, and the mean image cropped and mirrored by the same window and
    subtracted (``--data.mean image``), as the loader's graph does; nothing of ours around it. Written
    here against DALI alone, so that it stays the same reference whichever checkout is measured.
    ``device_id``: the CUDA device it runs on when ``gpu`` (the benchmark's ``--device cuda:N``).
    """
    import numpy as np
    from nvidia.dali import Pipeline, fn, types

    from pipeline.data import open_dataset
    from pipeline.data.dali_pipeline import decoder_options

    split, norm = open_dataset(cfg, "train")
    where = "gpu" if gpu else "cpu"
    positions = [k / norm.max_offset for k in range(norm.max_offset + 1)] if norm.max_offset else [0.5]
    pipe = Pipeline(batch_size=batch_size, num_threads=workers, device_id=device_id if gpu else None, seed=seed)
    with pipe:
        jpegs, cls = fn.readers.webdataset(
            paths=[str(p) for p in split.shards],
            index_paths=[str(p) for p in split.indexes],
            ext=["jpg", "cls"],
            random_shuffle=True,
            initial_fill=4096,
            seed=seed + 1,
            name="reader",
        )
        decoder_args = decoder_options(gpu)  # the loader's own decoder settings (chroma upsampling)
        if gpu and hw_decoder_load is not None:
            decoder_args["hw_decoder_load"] = hw_decoder_load
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB, **decoder_args)
        alpha = fn.random.normal(shape=[1, 3], stddev=norm.lighting_std)
        offset = fn.reshape(fn.coord_transform(alpha, M=norm.lighting.flatten().tolist()), shape=[3])
        window = dict(
            crop=(norm.crop, norm.crop),
            crop_pos_x=fn.random.uniform(values=positions),
            crop_pos_y=fn.random.uniform(values=positions),
            mirror=fn.random.coin_flip(probability=0.5),
            dtype=types.FLOAT,
            output_layout="CHW",
        )
        mean = types.Constant(np.asarray(norm.channel_mean, np.float32)) - offset
        out = fn.crop_mirror_normalize(images, mean=mean, std=list(norm.channel_std), **window)
        if norm.mean_image is not None:
            out = out - fn.crop_mirror_normalize(
                types.Constant(norm.mean_image, layout="HWC", device=where), mean=0.0, std=1.0, **window
            )
        pipe.set_outputs(out, fn.pad(cls, fill_value=0))
    pipe.build()
    return pipe


def bare_batches(pipe: Any, device: Any) -> Iterator[tuple[Any, Any]]:
    """Run a :func:`bare_graph` forever (its reader wraps around epochs), each batch copied into a torch tensor.

    Into the same tensor every time, as DALI's own ``DALIGenericIterator`` does: the cheapest copy there
    is (a consumer must be done with a batch before asking for the next)."""
    import numpy as np
    import torch
    from nvidia.dali.plugin.pytorch import feed_ndarray

    out = None
    while True:
        images, labels = pipe.run()
        dense = images.as_tensor()
        if out is None or list(out.shape) != dense.shape():
            out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
        yield out, torch.from_numpy(np.array(labels.as_tensor()))


def tree_rate(
    make: Callable[[], Iterator[tuple[Any, Any]]], *, warmup: int, steps: int, device: Any
) -> dict[str, float]:
    """Images per CPU-second of the process tree (and per wall second) over ``steps`` batches after ``warmup``."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = make()
    try:
        for _ in range(warmup):
            next(batches)
        sync()
        cpu, wall, images = process_tree_cpu_seconds(), time.perf_counter(), 0
        for _ in range(steps):
            images += len(next(batches)[0])
        sync()
        cpu, wall = process_tree_cpu_seconds() - cpu, time.perf_counter() - wall
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    return {"images_per_cpu_s": images / cpu, "images_per_s": images / wall, "images": images}


def input_path(args: argparse.Namespace, base: DataConfig, device: Any, workers: int) -> dict[str, Any]:
    """The loader, the bare DALI graph and the webdataset recipe, alternating; and the loader's thread parts."""
    from pipeline.bench.harness import torchvision_batches

    cfg = replace(base, loader="dali", verify="size")
    batch = args.batch_size
    steps = args.steps
    warmup = 3

    def ours() -> Iterator[tuple[Any, Any]]:
        loader = train_loader(cfg, dp_rank=0, dp_size=1, epoch=0, seed=0, device=device, batch_size=batch)
        if len(loader) < warmup + steps + 1:
            raise ValueError(f"an epoch of {len(loader)} batches of {batch} is too short for {warmup} + {steps}")
        return iter(loader)

    def bare() -> Iterator[tuple[Any, Any]]:
        return bare_batches(bare_graph(cfg, batch_size=batch, workers=workers, gpu=device.type == "cuda"), device)

    def webdataset() -> Iterator[tuple[Any, Any]]:
        return torchvision_batches(cfg, batch_size=batch, workers=workers, device=str(device))

    pipelines = {"loader": ours, "bare DALI graph": bare, "webdataset + DataLoader": webdataset}
    rates: dict[str, list[dict[str, float]]] = {name: [] for name in pipelines}
    parts = []
    for _ in range(args.rounds):
        for name, make in pipelines.items():
            rates[name].append(tree_rate(make, warmup=warmup, steps=steps, device=device))
        parts.append(thread_parts(cfg, batch_size=batch, warmup=warmup, steps=steps, device=device))
    best = {name: max(r["images_per_cpu_s"] for r in rounds) for name, rounds in rates.items()}
    return {
        "thread_us_per_sample": min(parts, key=lambda p: p["total"]),  # the round the thread spent least in
        "thread_us_per_sample_rounds": parts,
        "images_per_cpu_s": best,
        "rounds": rates,
        "loader_vs_bare_dali": best["loader"] / best["bare DALI graph"],
        "loader_vs_webdataset": best["loader"] / best["webdataset + DataLoader"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
    parser.add_argument(
        "--input-path",
        action="store_true",
        help="the DALI loader's cost to the training thread by part, and images per CPU-second against a bare "
        "DALI graph and a webdataset + DataLoader pipeline, instead",
    )
    parser.add_argument("--json", default="", help="with --input-path: also write the figures to this JSON file")
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
    if args.input_path:
        return _input_path(args, base, device, workers)
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


def _input_path(args: argparse.Namespace, base: DataConfig, device: Any, workers: int) -> int:
    import json

    import torch

    import pipeline.data

    report = input_path(args, base, device, workers)
    _header(args, device, workers)
    print(f"# code measured: {Path(pipeline.data.__file__).parent}; torch threads {torch.get_num_threads()} (default)")
    print(f"# training thread, µs per sample (time.thread_time), best of {args.rounds} rounds of {args.steps} batches")
    for part, us in report["thread_us_per_sample"].items():
        print(f"{part:<20} {us:>8.2f}")
    print(f"# images per CPU-second of the process tree, best of {args.rounds} alternating rounds")
    for name, rate in report["images_per_cpu_s"].items():
        print(f"{name:<26} {rate:>8.0f}")
    print(
        f"loader / bare DALI graph {report['loader_vs_bare_dali']:.2f}x, "
        f"loader / webdataset + DataLoader {report['loader_vs_webdataset']:.2f}x"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
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
