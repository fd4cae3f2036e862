"""Preprocessing benchmark: our per-image transform against a naive PIL pipeline, on one core and a pool.

``python -m preprocess bench`` (or ``python -m preprocess.bench``) writes deterministic,
ImageNet-like JPEGs into a temporary directory (mostly ~500x375 at ~100 KB, a tail of large
camera-sized ones), then, in the same run and on the same bytes, measures:

* ``baseline``  the naive pipeline: PIL open -> convert("RGB") -> resize (shorter side 256,
  BILINEAR with antialiasing) -> centre crop -> save JPEG q90;
* ``ours``      :func:`preprocess.image.process`;
* ``decode``    a bare full-size decode (simplejpeg), the floor a full decode can't go below;
* ``pool``      ours in a process pool of 1..N workers (reading the files, as the shard writer does);
* ``variants``  (``--variants``) the trade-offs that were tried: other resampling filters, any M/8
  DCT scale, fast DCT/upsampling, PIL's encoder, torch's resize kernel (if torch is installed),
  and decoding alone at our scales and at any M/8 scale.

Single-core figures are CPU time of this process (time.process_time), each image's best of
``--repeat`` passes, so that other load on a shared machine inflates them little; pool figures
are wall-clock. Quality is the PSNR of our 256x256 output against the baseline's (both decoded).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image, ImageDraw, features

from basics.errors import UserError
from preprocess import image
from preprocess.format import IMAGE_SIZE

LARGE_SHARE = 0.08  # share of images with a long side of 1500..4000 px
LARGE_LONG_SIDE = (1500, 4000)
LARGE_THRESHOLD = 1000  # long side above which an image counts as "large" in the report
# Goals this benchmark checks.
GOAL_SPEEDUP = 2.0  # ours / baseline, images per second on one core
GOAL_PSNR_DB = 30.0  # ours against the baseline
GOAL_FLOOR_SHARE = 0.5  # ours / bare full decode

Transform = Callable[[bytes], Any]


# --------------------------------------------------------------------------------------------
# Synthetic ImageNet-like sources


def sample_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) distributed like ImageNet: mostly 500 px on the long side, a large tail."""
    if rng.random() < LARGE_SHARE:
        low, high = LARGE_LONG_SIDE
        long_side = int(math.exp(rng.uniform(math.log(low), math.log(high))))  # log-uniform
    elif rng.random() < 0.75:
        long_side = 500  # Flickr's "medium" size: the bulk of ImageNet
    else:
        long_side = int(rng.integers(200, 500))
    aspect = rng.choice([4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9, 2.0], p=[0.45, 0.25, 0.1, 0.08, 0.08, 0.04])
    short_side = max(32, round(long_side / aspect))
    return (short_side, long_side) if rng.random() < 0.3 else (long_side, short_side)


def _colour_field(rng: np.random.Generator, width: int, height: int, cell: float, amp: float) -> np.ndarray:
    """Smooth random colour variation with features about ``cell`` px wide, centred on 0 (int16)."""
    grid = (max(2, round(height / cell)), max(2, round(width / cell)), 3)
    small = np.clip(128 + rng.normal(0, amp, grid), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16) - 128


def synth_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like RGB image: gradients, flat shapes with edges, fine texture and sensor grain."""
    # Draw at most 640 px on the long side, then upscale: large photos carry less detail per pixel.
    scale = min(1.0, 640 / max(width, height))
    w, h = max(8, round(width * scale)), max(8, round(height * scale))
    base = _colour_field(rng, w, h, max(w, h) / 4, 50) + rng.integers(70, 190, 3)
    canvas = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 14))):
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.05, 0.6) * w, y0 + rng.uniform(0.05, 0.6) * h
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))) for _ in range(5)], fill=fill)
    textured = np.asarray(canvas).astype(np.int16) + _colour_field(rng, w, h, 2.5, 22)
    canvas = Image.fromarray(np.clip(textured, 0, 255).astype(np.uint8))
    if scale < 1:
        canvas = canvas.resize((width, height), Image.Resampling.BICUBIC)
    # Grain from a tiled 256x256 patch: as incompressible for JPEG as fresh noise, much cheaper.
    tile = rng.normal(0, 4, (256, 256, 3)).astype(np.int16)
    grain = np.tile(tile, (-(-height // 256), -(-width // 256), 1))[:height, :width]
    return np.clip(np.asarray(canvas).astype(np.int16) + grain, 0, 255).astype(np.uint8)


def write_sources(directory: Path, count: int, seed: int) -> list[Path]:
    """``count`` JPEGs as a camera or Flickr would save them (4:2:0, quality 85..96)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        width, height = sample_size(rng)
        large = max(width, height) > LARGE_THRESHOLD
        quality = int(rng.integers(85, 94) if large else rng.integers(88, 97))
        buf = io.BytesIO()
        Image.fromarray(synth_image(rng, width, height)).save(buf, "JPEG", quality=quality)
        path = directory / f"synth_{i:05d}.JPEG"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# The pipelines measured


@dataclass
class Pipeline:
    name: str
    fn: Transform
    compare: bool = True  # its outputs are JPEGs to compare with the baseline's (PSNR)


def baseline(data: bytes, size: int = IMAGE_SIZE, quality: int = 90) -> bytes:
    """The naive pipeline (what torchvision's Resize(256) + CenterCrop(256) + PIL save do)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = img.size
    scale = size / min(width, height)
    new_size = (max(size, int(width * scale)), max(size, int(height * scale)))
    img = img.resize(new_size, Image.Resampling.BILINEAR)
    left = int(round((new_size[0] - size) / 2))
    top = int(round((new_size[1] - size) / 2))
    img = img.crop((left, top, left + size, top + size))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def bare_decode(data: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(data, "RGB")


def _variant_any_scale(data: bytes) -> bytes:
    """Let libjpeg-turbo pick any M/8 scale (simplejpeg's min_height/min_width as is)."""
    rgb = simplejpeg.decode_jpeg(data, "RGB", min_height=IMAGE_SIZE, min_width=IMAGE_SIZE)
    return image.encode_jpeg(image.resize_center_crop(rgb, IMAGE_SIZE))


def _variant_fast_decode(fastdct: bool, fastupsample: bool) -> Transform:
    """Our scale choice with libjpeg-turbo's fast integer IDCT and/or nearest chroma upsampling."""

    def transform(data: bytes) -> bytes:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        d = image.dct_denominator(width, height, IMAGE_SIZE)
        rgb = simplejpeg.decode_jpeg(
            data,
            "RGB",
            fastdct=fastdct,
            fastupsample=fastupsample,
            min_height=-(-height // d),
            min_width=-(-width // d),
        )
        return image.encode_jpeg(image.resize_center_crop(rgb, IMAGE_SIZE))

    return transform


def _variant_resample(resample: Image.Resampling) -> Transform:
    def transform(data: bytes) -> bytes:
        rgb = image.decode_rgb(data, IMAGE_SIZE)
        h, w = rgb.shape[:2]
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        out = Image.fromarray(rgb).resize((IMAGE_SIZE, IMAGE_SIZE), resample, box=box)
        return image.encode_jpeg(np.asarray(out))

    return transform


def _variant_pil_encode(data: bytes) -> bytes:
    out = image.resize_center_crop(image.decode_rgb(data, IMAGE_SIZE), IMAGE_SIZE)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _variant_torch_resize() -> Transform | None:
    """Our decode with torch's antialiased bilinear uint8 kernel (AVX2) instead of PIL's resize.

    torch is a project dependency (training) but not one of image.py's: measured here to see what
    a faster resize would buy. The crop is rounded to whole source pixels (as torchvision does).
    """
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    torch.set_num_threads(1)  # one core, like every other pipeline here

    def transform(data: bytes) -> bytes:
        rgb = image.decode_rgb(data, IMAGE_SIZE)
        h, w = rgb.shape[:2]
        side = min(w, h)
        top, left = (h - side) // 2, (w - side) // 2
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None, :, top : top + side, left : left + side]
        y = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return image.encode_jpeg(y[0].permute(1, 2, 0).contiguous().numpy())

    return transform


def _decode_only_fast_scale(data: bytes) -> np.ndarray:
    return image.decode_rgb(data, IMAGE_SIZE)


def _decode_only_any_scale(data: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(data, "RGB", min_height=IMAGE_SIZE, min_width=IMAGE_SIZE)


VARIANTS: dict[str, Transform] = {
    "ours, BOX filter": _variant_resample(Image.Resampling.BOX),
    "ours, BICUBIC filter": _variant_resample(Image.Resampling.BICUBIC),
    "ours, any M/8 DCT scale": _variant_any_scale,
    "ours, fastdct": _variant_fast_decode(True, False),
    "ours, fastdct+fastupsample": _variant_fast_decode(True, True),
    "ours, PIL encoder": _variant_pil_encode,
}
# Decode alone, to show where the M/8 scales stand (no output to compare).
DECODE_VARIANTS: dict[str, Transform] = {
    "decode only, 1/2^k scale": _decode_only_fast_scale,
    "decode only, any M/8": _decode_only_any_scale,
}


def variant_pipelines() -> list[Pipeline]:
    found = [Pipeline(name, fn) for name, fn in VARIANTS.items()]
    torch_resize = _variant_torch_resize()
    if torch_resize is not None:
        found.append(Pipeline("ours, torch AA resize", torch_resize))
    return found + [Pipeline(name, fn, compare=False) for name, fn in DECODE_VARIANTS.items()]


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Rate:
    name: str
    images: int
    seconds: float  # CPU seconds, sum of each image's best pass
    large_seconds: float  # the part spent on large images
    large_images: int
    psnr_db: float | None = None  # mean over images, against the baseline
    psnr_min_db: float | None = None

    @property
    def per_s(self) -> float:
        return self.images / self.seconds

    @property
    def typical_per_s(self) -> float:
        typical = self.images - self.large_images
        return typical / (self.seconds - self.large_seconds) if typical else float("nan")

    @property
    def large_per_s(self) -> float:
        return self.large_images / self.large_seconds if self.large_seconds else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "images_per_s": _rounded(self.per_s, 1),
            "typical_images_per_s": _rounded(self.typical_per_s, 1),
            "large_images_per_s": _rounded(self.large_per_s, 2),
        }


def _rounded(value: float, digits: int) -> float | None:
    """JSON has no NaN: a figure with no images behind it is null."""
    return None if math.isnan(value) else round(value, digits)


def time_pipelines(
    pipelines: Sequence[Pipeline], sources: Sequence[bytes], large: Sequence[bool], repeat: int
) -> list[tuple[Rate, list[Any]]]:
    """CPU time of every pipeline on every image, best of ``repeat``; with the first pass's outputs.

    The pipelines take turns image by image, so that load from elsewhere on a shared machine
    (and CPU clock changes) hits all of them alike instead of whichever ran at the wrong moment.
    """
    best = [[math.inf] * len(sources) for _ in pipelines]
    outputs: list[list[Any]] = [[] for _ in pipelines]
    for rep in range(repeat):
        for i, data in enumerate(sources):
            for k, pipeline in enumerate(pipelines):
                start = time.process_time()
                out = pipeline.fn(data)
                best[k][i] = min(best[k][i], time.process_time() - start)
                if rep == 0 and pipeline.compare:
                    outputs[k].append(out)
    results = []
    for pipeline, times, outs in zip(pipelines, best, outputs):
        large_seconds = sum(t for t, big in zip(times, large) if big)
        results.append((Rate(pipeline.name, len(sources), sum(times), large_seconds, sum(large)), outs))
    return results


PSNR_CAP_DB = 100.0  # identical images count as this instead of infinity


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0**2 / mse))


def set_psnr(rate: Rate, outputs: Sequence[bytes], references: Sequence[np.ndarray]) -> None:
    values = [psnr(image.decode_shard_jpeg(out), ref) for out, ref in zip(outputs, references)]
    rate.psnr_db = float(np.mean(values))
    rate.psnr_min_db = float(np.min(values))


def exact_reference(data: bytes, size: int = IMAGE_SIZE) -> np.ndarray:
    """Full-size PIL decode, one BILINEAR resize of the exact central square; not encoded."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, box=box))


def scaled_decode_fidelity(sources: Sequence[bytes], large: Sequence[bool]) -> dict[str, float]:
    """PSNR of ours before encoding against :func:`exact_reference`: what DCT scaling alone costs.

    The PSNR against the baseline mixes in two JPEG encodings and the baseline's own rounding of
    the crop (up to half an output pixel off centre); this isolates our decode shortcut.
    """
    values = [
        psnr(image.resize_center_crop(image.decode_rgb(s, IMAGE_SIZE), IMAGE_SIZE), exact_reference(s)) for s in sources
    ]
    typical = [v for v, big in zip(values, large) if not big]
    big = [v for v, b in zip(values, large) if b]
    return {
        "mean_db": _rounded(float(np.mean(values)), 2),
        "typical_mean_db": _rounded(float(np.mean(typical)), 2) if typical else None,
        "large_mean_db": _rounded(float(np.mean(big)), 2) if big else None,
        "large_min_db": _rounded(float(np.min(big)), 2) if big else None,
    }


def _pool_process_file(path: str) -> int:
    with open(path, "rb") as f:
        return len(image.process(f.read()))


def _pool_ready(_: int) -> int:
    return os.getpid()


def pool_rates(paths: Sequence[Path], max_workers: int, repeat: int) -> list[dict[str, float]]:
    """Wall-clock images/s of ``process`` in a pool of 1..max_workers processes, best of ``repeat``.

    A ProcessPoolExecutor like the shard writer's; workers read the files themselves. Pool start-up
    is not timed: the workers are started and warmed up first.
    """
    names = [str(p) for p in paths]
    results = []
    for workers in range(1, max_workers + 1):
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_pool_ready, range(workers * 4)))  # every worker up, imports done
            list(pool.map(_pool_process_file, names[: workers * 8]))  # warm page cache and allocator
            best = math.inf
            for _ in range(repeat):
                start = time.perf_counter()
                for _ in pool.map(_pool_process_file, names, chunksize=4):
                    pass
                best = min(best, time.perf_counter() - start)
        results.append({"workers": workers, "seconds": round(best, 3), "images_per_s": round(len(names) / best, 1)})
    for row in results:
        row["efficiency"] = round(row["images_per_s"] / (row["workers"] * results[0]["images_per_s"]), 2)
    return results


# --------------------------------------------------------------------------------------------
# Report


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": _usable_cores(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "pillow": Image.__version__,
        "pillow_libjpeg_turbo": features.version("libjpeg_turbo"),
        "simplejpeg": simplejpeg.__version__,
        "simplejpeg_libjpeg_turbo": _simplejpeg_turbo_version(),
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _usable_cores() -> int:
    """Cores this process may run on (a Slurm allocation's, not the node's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _simplejpeg_turbo_version() -> str:
    """simplejpeg links libjpeg-turbo statically and doesn't expose its version: read the banner."""
    from simplejpeg import _jpeg

    try:
        blob = Path(_jpeg.__file__).read_bytes()
    except OSError:
        return "unknown"
    marker = b"libjpeg-turbo version "
    at = blob.find(marker)
    return blob[at + len(marker) : blob.find(b" ", at + len(marker))].decode() if at >= 0 else "unknown"


def source_summary(sources: Sequence[bytes], sizes: Sequence[tuple[int, int]], large: Sequence[bool]) -> dict[str, Any]:
    return {
        "images": len(sources),
        "large_images": int(sum(large)),
        "mean_kb": round(sum(map(len, sources)) / len(sources) / 1024, 1),
        "mean_kb_typical": round(np.mean([len(s) for s, b in zip(sources, large) if not b]) / 1024, 1),
        "mean_width": round(float(np.mean([w for w, _ in sizes]))),
        "mean_height": round(float(np.mean([h for _, h in sizes]))),
        "median_pixels": int(np.median([w * h for w, h in sizes])),
    }


def format_table(rates: Sequence[Rate], reference: Rate) -> str:
    header = f"{'pipeline':<28} {'img/s':>7} {'vs base':>7} {'typical':>8} {'large':>7} {'PSNR dB':>8} {'min':>6}"
    lines = [header, "-" * len(header)]
    for r in rates:
        psnr_text = f"{r.psnr_db:8.2f} {r.psnr_min_db:6.2f}" if r.psnr_db is not None else f"{'':>8} {'':>6}"
        lines.append(
            f"{r.name:<28} {r.per_s:7.1f} {r.per_s / reference.per_s:6.2f}x "
            f"{r.typical_per_s:8.1f} {r.large_per_s:7.2f} {psnr_text}"
        )
    return "\n".join(lines)


def goal_lines(ours: Rate, base: Rate, floor: Rate) -> list[tuple[bool, str]]:
    speedup = ours.per_s / base.per_s
    share = ours.per_s / floor.per_s
    return [
        (speedup >= GOAL_SPEEDUP, f"ours / baseline on one core = {speedup:.2f}x (goal >= {GOAL_SPEEDUP}x)"),
        (
            ours.psnr_db is not None and ours.psnr_db >= GOAL_PSNR_DB,
            f"PSNR of ours vs baseline = {ours.psnr_db:.2f} dB (goal >= {GOAL_PSNR_DB} dB)",
        ),
        (share >= GOAL_FLOOR_SHARE, f"ours / bare full decode = {share:.2f} (goal >= {GOAL_FLOOR_SHARE})"),
    ]


# --------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=400, help="synthetic source images")
    parser.add_argument(
        "--workers",
        type=int,
        default=_usable_cores(),
        help="measure the process pool with 1..N workers (0 = skip); N defaults to the usable cores",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    parser.add_argument("--repeat", type=int, default=3, help="passes per single-core pipeline (best kept)")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also measure the trade-offs tried (filters, DCT scales, fast DCT, encoders, torch resize)",
    )
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    if args.images < 1 or args.repeat < 1 or args.workers < 0:
        raise UserError("--images and --repeat must be at least 1, --workers at least 0")
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} usable cores, load {info['load_avg_1min']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="alexnet-bench-") as tmp:
        start = time.perf_counter()
        paths = write_sources(Path(tmp), args.images, args.seed)
        sources = [p.read_bytes() for p in paths]
        sizes = [simplejpeg.decode_jpeg_header(s)[1::-1] for s in sources]
        large = [max(w, h) > LARGE_THRESHOLD for w, h in sizes]
        summary = source_summary(sources, sizes, large)
        print(
            f"sources: {summary['images']} JPEGs ({summary['large_images']} with long side > "
            f"{LARGE_THRESHOLD} px), mean {summary['mean_width']}x{summary['mean_height']}, "
            f"{summary['mean_kb']} KB (typical ones {summary['mean_kb_typical']} KB); "
            f"generated in {time.perf_counter() - start:.1f} s",
            flush=True,
        )

        pipelines = [
            Pipeline("baseline (naive PIL)", baseline),
            Pipeline("ours (image.process)", image.process),
            Pipeline("bare full decode", bare_decode, compare=False),
        ]
        if args.variants:
            pipelines += variant_pipelines()
        print(f"timing {len(pipelines)} pipelines, {args.repeat} passes...", flush=True)
        timed = time_pipelines(pipelines, sources, large, args.repeat)
        base, ours, floor = (rate for rate, _ in timed[:3])
        references = [image.decode_shard_jpeg(out) for out in timed[0][1]]
        for (rate, outputs), pipeline in zip(timed[1:], pipelines[1:]):
            if pipeline.compare:
                set_psnr(rate, outputs, references)
        rates = [rate for rate, _ in timed]
        fidelity = scaled_decode_fidelity(sources, large)
        print(f"\none core (CPU time, best of {args.repeat}; PSNR of the 256x256 output vs the baseline's):")
        print(format_table(rates, base))
        print(f"('typical' = long side <= {LARGE_THRESHOLD} px, 'large' = the rest; img/s)")
        print(
            f"ours before encoding vs an exact full-size PIL resize (isolates DCT scaling): "
            f"typical {fidelity['typical_mean_db']} dB, large {fidelity['large_mean_db']} dB "
            f"(min {fidelity['large_min_db']}), capped at {PSNR_CAP_DB:.0f} dB = identical"
        )

        pool = pool_rates(paths, args.workers, args.repeat) if args.workers else []
    if pool:
        print("\nours in a process pool (wall clock):")
        for row in pool:
            print(
                f"  {row['workers']:>2} workers: {row['images_per_s']:7.1f} img/s  (efficiency {row['efficiency']:.2f})"
            )
    goals = goal_lines(ours, base, floor)
    print()
    for ok, text in goals:
        print(f"{'PASS' if ok else 'MISS'}  {text}")
    info["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        result = {
            "machine": info,
            "arguments": sys.argv[1:],
            "sources": summary,
            "single_core": [r.to_dict() for r in rates],
            "scaled_decode_fidelity": fidelity,
            "pool": pool,
            "goals": [{"met": ok, "text": text} for ok, text in goals],
        }
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"results written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m preprocess.bench",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
