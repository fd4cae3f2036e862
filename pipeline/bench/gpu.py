"""The GPU input path, side by side in one run: ``python -m pipeline.bench.train --gpu-report --data SHARDS``.

On one CUDA device, the paper's model and batch (128 unless ``--batch-size``), each part after warm-up:

1. DALI alone: ``mixed`` (nvJPEG) decode and the training augmentation (random 227 window, mirror, PCA
   lighting, mean image) in a bare DALI graph, nothing after it, for each ``hw_decoder_load`` in the sweep
   (the share of JPEGs sent to the A100/H100 hardware decoder; the rest go to the CUDA decoder).
2. Our loader alone: ``pipeline.data.train_loader`` on the GPU, batches handed to torch (what the trainer gets),
   and the training thread's CPU time in it per sample, part by part (feed, hand-over to DALI, mean image,
   copy out: ``pipeline.bench.data.thread_parts``; one epoch must hold ``--steps`` + 6 batches).
3. The model step alone on synthetic batches: fp32 eager, and bf16 + channels_last + torch.compile.
4. Both together: the ``Trainer`` and the plain loop (``pipeline.bench.train``) on our loader, bf16 +
   channels_last + compile.
5. The baseline: a torchvision-style recipe (webdataset in DataLoader workers, PIL decode, RandomCrop,
   RandomHorizontalFlip, ToTensor, Normalize, pinned memory), alone and under the plain loop.
6. A check that the GPU pipeline augments as the CPU pipeline does: the same epoch's first batches from
   our loader on the GPU and on the CPU, per image and per channel.

Without a visible CUDA device it stops with a one-line error. The pieces take ``gpu=False`` so the tests
run them on CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from basics.errors import UserError
from pipeline.bench.harness import (
    Recording,
    RecordingLoader,
    Setup,
    data_config,
    environment,
    loop_overhead,
    resolve_setup,
    run_plain,
    sync,
    torchvision_batches,
)

HW_DECODER_LOADS = (0.0, 0.35, 0.65, 0.9, 1.0)
STATS_BATCHES = 4
# What counts as "the same augmentation" on the 0..255 scale: nvJPEG and libjpeg-turbo may round a
# few pixels differently, a wrong window or mirror moves an image's mean difference by tens of levels.
SAME_IMAGE_MAE = 2.0
SAME_CHANNEL_MEAN = 1.0


def dali_graph(
    data_cfg: Any,
    *,
    batch_size: int,
    workers: int,
    gpu: bool,
    hw_decoder_load: float,
    seed: int = 0,
    device_id: int = 0,
) -> Any:
    """A built bare DALI pipeline of the loader's operators (``pipeline.bench.data.bare_graph``): read, decode,
    random window + mirror + lighting, the mean image's window subtracted, float CHW."""
    from pipeline.bench.data import bare_graph

    return bare_graph(
        data_cfg,
        batch_size=batch_size,
        workers=workers,
        gpu=gpu,
        hw_decoder_load=hw_decoder_load,
        seed=seed,
        device_id=device_id,
    )


def dali_batches(pipe: Any, device: str) -> Iterator[tuple[Any, Any]]:
    """Run the graph forever (the reader wraps around epochs), each batch copied into a torch tensor."""
    import torch

    from pipeline.bench.data import bare_batches

    return bare_batches(pipe, torch.device(device))


def rate(source: Iterator[tuple[Any, Any]], *, warmup: int, steps: int, device: str) -> dict[str, float]:
    """Images/s of a source alone: batches drawn and dropped."""
    record = Recording()
    for _ in RecordingLoader(source, warmup + steps, record, sync(device), (warmup, warmup + steps)):
        pass
    return record.window(warmup, steps)


def our_batches(data_cfg: Any, setup: Setup) -> Iterator[tuple[Any, Any]]:
    from pipeline.bench.harness import real_batches

    return real_batches(data_cfg, setup)


def loader_thread(data_cfg: Any, *, batch_size: int, steps: int, device: str) -> dict[str, float]:
    """The training thread's CPU time in our loader, µs per sample by part (``pipeline.bench.data.thread_parts``):
    on a GPU this thread also launches the model, so every µs here is taken from the step."""
    import torch

    from pipeline.bench.data import thread_parts

    return thread_parts(data_cfg, batch_size=batch_size, warmup=3, steps=steps, device=torch.device(device))


def cuda_index(device: str) -> int:
    """The ordinal of ``cuda:N`` (``cuda``: the current device, as torch places tensors there)."""
    import torch

    d = torch.device(device)
    if d.type != "cuda":
        return 0
    return d.index if d.index is not None else torch.cuda.current_device()


# ------------------------------------------------------------------------------------------------ GPU vs CPU


def compare_devices(data_cfg: Any, *, batch_size: int, gpu_device: str, batches: int = STATS_BATCHES) -> dict[str, Any]:
    """The same epoch's first batches from our loader on ``gpu_device`` and on the CPU, image by image."""
    import torch

    from pipeline.data import train_loader

    def take(device: str) -> tuple[Any, Any]:
        loader = train_loader(
            data_cfg, dp_rank=0, dp_size=1, epoch=0, seed=0, device=torch.device(device), batch_size=batch_size
        )
        got = list(itertools.islice(iter(loader), batches))
        return torch.cat([b[0].float().cpu() for b in got]), torch.cat([b[1].cpu() for b in got])

    cpu_images, cpu_labels = take("cpu")
    gpu_images, gpu_labels = take(gpu_device)
    n = min(len(cpu_labels), len(gpu_labels))
    same_order = n > 0 and bool(torch.equal(cpu_labels[:n], gpu_labels[:n]))
    per_image = (cpu_images[:n] - gpu_images[:n]).abs().mean(dim=(1, 2, 3))
    channel = {
        name: {"cpu": t[0].mean(dim=(0, 2, 3)).tolist(), "gpu": t[1].mean(dim=(0, 2, 3)).tolist()}
        for name, t in {"mean": (cpu_images, gpu_images)}.items()
    }
    channel["std"] = {"cpu": cpu_images.std(dim=(0, 2, 3)).tolist(), "gpu": gpu_images.std(dim=(0, 2, 3)).tolist()}
    mean_gap = max(abs(a - b) for a, b in zip(channel["mean"]["cpu"], channel["mean"]["gpu"]))
    match = same_order and float(per_image.max()) <= SAME_IMAGE_MAE and mean_gap <= SAME_CHANNEL_MEAN
    return {
        "images": n,
        "same_order": same_order,
        "image_mae_max": float(per_image.max()),
        "image_mae_mean": float(per_image.mean()),
        "channel": channel,
        "channel_mean_gap": mean_gap,
        "match": match,
    }


# ------------------------------------------------------------------------------------------------ the report


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            "--gpu-report needs a CUDA GPU and none is visible; run it on a GPU machine "
            "(the CPU figures: python -m pipeline.bench.train without --gpu-report)"
        )
    if not args.data:
        raise UserError("--gpu-report reads real shards: pass --data SHARDS (a `python -m preprocess shard` output)")
    device = args.device if args.device.startswith("cuda") else "cuda"  # --device auto|cuda|cuda:N
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this process sees {torch.cuda.device_count()} CUDA device(s)")
    if index is not None:
        torch.cuda.set_device(index)  # DALI, torch and the Trainer all on that device, not on GPU 0
    report = gpu_report(args, device)
    print(json.dumps(report, indent=1))
    if args.json:
        from basics.files import write_json_atomic

        write_json_atomic(args.json, report)
    return 0


def gpu_report(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Every part of the module docstring on ``device``; ``device="cpu"`` runs the same code without a GPU."""
    from dataclasses import asdict, replace

    import torch

    from pipeline.bench.model import time_steps
    from pipeline.data import resolve_workers
    from pipeline.model import build_model
    from preprocess.format import read_manifest

    gpu = device.startswith("cuda")
    workers = resolve_workers(args.workers)
    setup = resolve_setup(args, device, len(read_manifest(args.data).classes))
    tuned = replace(setup, amp="bf16", channels_last=True, compile=gpu)
    ours = data_config(data=args.data, loader="dali", workers=workers, channels_last=tuned.channels_last)
    plain_cfg = data_config(data=args.data, loader="dali", workers=workers)
    w, n = args.warmup, args.steps
    report: dict[str, Any] = {
        "environment": environment(device),
        "setup": asdict(tuned),
        "workers": workers,
        "warmup": w,
        "steps": n,
    }
    report["dali_alone"] = {}
    for load in HW_DECODER_LOADS if gpu else (0.0,):
        pipe = dali_graph(
            plain_cfg,
            batch_size=setup.batch_size,
            workers=workers,
            gpu=gpu,
            hw_decoder_load=load,
            device_id=cuda_index(device),
        )
        report["dali_alone"][str(load)] = rate(dali_batches(pipe, device), warmup=w, steps=n, device=device)
        del pipe
    report["loader_alone"] = rate(our_batches(ours, tuned), warmup=w, steps=n, device=device)
    report["loader_thread_us_per_sample"] = loader_thread(ours, batch_size=setup.batch_size, steps=n, device=device)
    report["torchvision_alone"] = rate(
        torchvision_batches(plain_cfg, batch_size=setup.batch_size, workers=workers, device=device),
        warmup=w,
        steps=n,
        device=device,
    )
    report["model_alone"] = {}
    for name, s in (("fp32", setup), ("bf16 + channels_last + compile", tuned)):
        torch.manual_seed(0)
        model = build_model(replace(s, num_classes=1000).model_config()).to(device)
        seconds = time_steps(
            model,
            batch=s.batch_size,
            steps=n,
            device=torch.device(device),
            bf16=s.amp == "bf16",
            channels_last=s.channels_last,
            warmup=max(w, 1),
        )
        report["model_alone"][name] = {"step_s": seconds, "images_per_s": s.batch_size / seconds}
        del model
    scratch = Path(tempfile.mkdtemp(prefix="bench-gpu-", dir=Path.cwd()))
    try:
        report["together"] = loop_overhead(
            tuned, ours, synthetic=False, warmup=w, steps=n, rounds=args.rounds, scratch=scratch
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    baseline = run_plain(
        tuned,
        torchvision_batches(plain_cfg, batch_size=setup.batch_size, workers=workers, device=device),
        warmup=w,
        steps=n,
    )
    report["torchvision_with_model"] = baseline.window(w, n)
    report["gpu_vs_cpu_augmentation"] = compare_devices(ours, batch_size=min(setup.batch_size, 32), gpu_device=device)
    model_rate = report["model_alone"]["bf16 + channels_last + compile"]["images_per_s"]
    trainer = report["together"]["trainer"]
    report["summary"] = {
        "trainer_vs_model_alone": trainer["images_per_s"] / model_rate,
        "trainer_data_wait_fraction": trainer["data_wait_fraction"],
        "trainer_vs_torchvision_recipe": trainer["images_per_s"] / report["torchvision_with_model"]["images_per_s"],
        "augmentation_matches_cpu": report["gpu_vs_cpu_augmentation"]["match"],
        "loader_thread_us_per_batch": report["loader_thread_us_per_sample"]["total"] * setup.batch_size,
    }
    return report
