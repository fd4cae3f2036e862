"""Training-step throughput of the model alone (synthetic batches, no input pipeline).

    python -m pipeline.bench.model [--batch-size 128] [--steps 30] [--device cuda]
    python -m pipeline.bench.model --device cpu --batch-size 2 --steps 1 --warmup 0 --no-compile   # a smoke run

Times forward + backward + SGD step of the paper's AlexNet in the optional modern settings
(fp32, channels_last, bf16 autocast, torch.compile) and, side by side in the same run, of
torchvision's ``alexnet`` (the 2014 "one weird trick" variant: no LRN, no groups, 64-192-384-256-256
channels), the baseline a user would otherwise pick up. Images/s are per device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.model import ModelConfig, build_model

CLASSES = 1000  # ImageNet's: ModelConfig's default (0) means "the dataset's", and there is no dataset here


def time_steps(
    model: torch.nn.Module,
    *,
    batch: int,
    steps: int,
    device: torch.device,
    bf16: bool,
    channels_last: bool,
    warmup: int = 5,
) -> float:
    """Median seconds per training step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(batch, 3, 227, 227, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, CLASSES, (batch,), device=device)
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench.model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant (the median is reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (cuDNN autotuning, compile)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    import torchvision

    variants = [
        (
            "torchvision alexnet (baseline)",
            lambda: torchvision.models.alexnet(num_classes=CLASSES),
            False,
            False,
            False,
        ),
        ("paper AlexNet fp32", None, False, False, False),
        ("paper AlexNet channels_last", None, False, True, False),
        ("paper AlexNet bf16", None, True, False, False),
        ("paper AlexNet channels_last + bf16", None, True, True, False),
    ]
    if not args.no_compile:
        variants += [
            (
                "torchvision alexnet bf16 + compile",
                lambda: torchvision.models.alexnet(num_classes=CLASSES),
                True,
                True,
                True,
            ),
            ("paper AlexNet channels_last + bf16 + compile", None, True, True, True),
        ]
    results = []
    for name, factory, bf16, channels_last, compile_ in variants:
        torch.manual_seed(0)
        model = factory() if factory else build_model(ModelConfig(num_classes=CLASSES, channels_last=channels_last))
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compile_:
            model.compile()
        seconds = time_steps(
            model,
            batch=args.batch_size,
            steps=args.steps,
            device=device,
            bf16=bf16,
            channels_last=channels_last,
            warmup=args.warmup,
        )
        results.append({"variant": name, "step_ms": 1000 * seconds, "images_per_s": args.batch_size / seconds})
        print(f"{name:48s} {1000 * seconds:8.2f} ms/step {args.batch_size / seconds:9.0f} img/s", flush=True)
    base = results[0]["images_per_s"]
    for r in results:
        r["vs_baseline"] = r["images_per_s"] / base
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
