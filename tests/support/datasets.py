"""Datasets for the tests: the demo dataset through the real preprocessing (``build_demo``; conftest.py
builds it once per session), ImageFolder source trees, and small preprocessed datasets for the
input-pipeline tests and the data benchmark (``make_dataset``).

Everything is written with ``preprocess.shards.write_shard`` and ``format.write_manifest``, the
same code the real preprocessing uses, so the loaders read exactly the on-disk format.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data import DataConfig, integrity
from pipeline.data.index_cache import index_rows
from preprocess import format as fmt
from preprocess.shards import Sample, write_shard
from tests.support import DEMO_CLASSES, DEMO_TRAIN, DEMO_VAL, PYTHON, REPO, TRAIN_SHARD_SIZE
from tests.support.processes import small_env

SIZE = fmt.IMAGE_SIZE

# A plausible ImageNet-like RGB PCA on the 0..255 scale: covariance eigenvalues (variances), descending.
EIGVAL = [8900.0, 460.0, 120.0]
EIGVEC = [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
CHANNEL_MEAN = [123.7, 116.3, 103.5]
CHANNEL_STD = [58.4, 57.1, 57.4]


def encode_jpeg(pixels: np.ndarray, quality: int = 100, subsampling: int = 0) -> bytes:
    """JPEG; by default without chroma subsampling, so coarse colour gradients survive almost exactly.

    ``subsampling=2`` is 4:2:0, what ``preprocess`` writes (and what the benchmark should decode).
    """
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def coordinate_image(tag: int = 0) -> np.ndarray:
    """R = x, G = y (0..255 across the 256 pixels), B = ``tag``: crop offsets and flips are readable."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([x, y, np.full_like(x, tag)], axis=-1).astype(np.uint8)


def natural_image(rng: np.random.Generator) -> np.ndarray:
    """Image-like content: a 1/f (pink) noise field per channel with correlated colours and edges.

    Natural images have a roughly 1/f amplitude spectrum; flat colours or white noise would make
    JPEG decoding unrealistically cheap or expensive.
    """
    fy = np.fft.fftfreq(SIZE)[:, None]
    fx = np.fft.rfftfreq(SIZE)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / SIZE) ** 1.1
    base = []
    for _ in range(2):
        phase = rng.uniform(0, 2 * np.pi, amplitude.shape)
        field = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(SIZE, SIZE))
        base.append((field - field.mean()) / (field.std() + 1e-8))
    mix = rng.normal(0, 1, (3, 2)) * 0.6 + np.array([[1.0, 0.2], [0.9, 0.0], [0.8, -0.2]])
    pixels = np.einsum("chw,kc->hwk", np.stack(base), mix) * 40 + rng.uniform(70, 170, 3)
    # A few hard-edged shapes: objects, occlusions.
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    for _ in range(rng.integers(2, 6)):
        cy, cx, r = rng.uniform(0, SIZE, 2).tolist() + [rng.uniform(15, 70)]
        pixels[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 4, pixels.shape)  # sensor noise / fine texture
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_dataset(
    root: Path,
    shard_sizes: dict[str, Sequence[int]],
    *,
    image: Callable[[int], np.ndarray] = coordinate_image,
    label: Callable[[int], int] = lambda i: i,
    num_classes: int | None = None,
    quality: int = 100,
    subsampling: int = 0,
    mean_image: np.ndarray | None = None,
    stats: bool = True,
) -> Path:
    """Write ``root``: per split the shards with the given sample counts, the manifest, a mean image.

    Sample ``i`` (numbered across the splits' shards in order) has key ``{split}_{i:05d}``, image
    ``image(i)`` and label ``label(i)``; by default the labels are the sample numbers, so a test can
    tell every sample apart from its label alone. The mean image defaults to zeros (outputs then
    equal the cropped pixels when lighting is off).
    """
    root = Path(root)
    splits = {}
    counter = 0
    max_label = 0
    for split, sizes in shard_sizes.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        infos = []
        for s, n in enumerate(sizes):
            samples = []
            for _ in range(n):
                samples.append(
                    Sample(f"{split}_{counter:05d}", label(counter), encode_jpeg(image(counter), quality, subsampling))
                )
                max_label = max(max_label, label(counter))
                counter += 1
            rel = f"{split}/{fmt.shard_name(split, s)}"
            count, sha, size = write_shard(root / rel, samples)
            infos.append(fmt.ShardInfo(path=rel, index=fmt.index_name(rel), samples=count, sha256=sha, bytes=size))
        splits[split] = fmt.SplitInfo(shards=infos, samples=sum(sizes), skipped=[], params={"quality": quality})
    classes = num_classes if num_classes is not None else max_label + 1
    if mean_image is None:
        mean_image = np.zeros((SIZE, SIZE, 3), np.float32)
    np.save(root / fmt.MEAN_IMAGE_NAME, mean_image.astype(np.float32))
    manifest = fmt.Manifest(
        classes=[{"index": i, "wnid": f"n{i:08d}", "name": f"class {i}"} for i in range(classes)],
        splits=splits,
        stats=fmt.Stats(
            images=counter,
            mean=CHANNEL_MEAN,
            std=CHANNEL_STD,
            mean_image=fmt.MEAN_IMAGE_NAME,
            eigval=EIGVAL,
            eigvec=EIGVEC,
        )
        if stats
        else None,
    )
    fmt.write_manifest(root, manifest)
    return root


def preprocess(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`python -m preprocess ARGS` from the repository (captured, bounded)."""
    proc = subprocess.run(
        [PYTHON, "-m", "preprocess", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        env=small_env(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"python -m preprocess {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return proc


def shard_args(src: Path, out: Path, split: str = "train", workers: int = 1) -> list[str]:
    """The `shard` arguments the demo dataset is built with (the manifest comparison relies on them)."""
    args = [
        "shard",
        "--src",
        str(src / split),
        "--out",
        str(out),
        "--split",
        split,
        "--workers",
        str(workers),
        "--no-progress",
    ]
    if split == "train":
        args += ["--shard-size", str(TRAIN_SHARD_SIZE)]
    else:
        args += ["--devkit", str(src / "devkit")]
    return args


def build_demo(root: Path) -> Path:
    preprocess(
        "make-demo",
        str(root / "src"),
        "--classes",
        str(DEMO_CLASSES),
        "--train-per-class",
        str(DEMO_TRAIN),
        "--val-per-class",
        str(DEMO_VAL),
    )
    preprocess(*shard_args(root / "src", root / "shards", "train"))
    preprocess(*shard_args(root / "src", root / "shards", "val"))
    return root


# --------------------------------------------------------------------------------------------
# Source images

WNIDS = ["n01440764", "n01443537", "n01484850"]


def jpeg_of_colour(rgb: tuple[int, int, int], size: tuple[int, int], seed: int) -> bytes:
    """A noisy JPEG around one colour (PIL, quality 85), ``size`` = (width, height)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb, dtype=np.float32) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def make_image_folder(root: Path) -> Path:
    """An ImageFolder tree: 3 classes x 7 images of distinct colours and sizes, plus one undecodable file."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for c, wnid in enumerate(WNIDS):
        (root / wnid).mkdir(parents=True)
        for i in range(7):
            size = (300 + 40 * i, 260 + 10 * c)
            (root / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg_of_colour(colours[c], size, seed=10 * c + i))
    (root / WNIDS[0] / f"{WNIDS[0]}_broken.JPEG").write_bytes(b"this is not an image")
    return root


def cfg_for(root: Path, loader: str = "dali", **kw) -> DataConfig:
    kw.setdefault("workers", 1)  # (0 would mean all CPUs)
    return DataConfig(data=str(root), loader=loader, **kw)


def rewrite_member(root: Path, shard_no: int, sample: int, member: str, payload: bytes) -> str:
    """Replace one member's bytes in a copy's shard (same size, padded) and fix the manifest's sha256; its key."""
    shard = root / "train" / fmt.shard_name("train", shard_no)
    key, jpg_offset, jpg_size, cls_offset, cls_size = index_rows(root / "train" / fmt.index_name(shard.name))[sample]
    offset, size = (jpg_offset, jpg_size) if member == "jpg" else (cls_offset, cls_size)
    assert len(payload) <= size
    data = bytearray(shard.read_bytes())
    data[offset : offset + size] = payload.ljust(size, b"\n" if member == "cls" else b"\0")
    shard.write_bytes(bytes(data))
    manifest = json.loads(fmt.manifest_path(root).read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        if entry["path"].endswith(shard.name):
            entry["sha256"] = integrity.file_sha256(shard)
    fmt.manifest_path(root).write_text(json.dumps(manifest))
    return key


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.datasets OUT --images N``: a natural-image dataset for ``pipeline.bench.data``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.support.datasets", description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (the preprocessing default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    sizes = [args.shard_size] * (args.images // args.shard_size)
    if args.images % args.shard_size:
        sizes.append(args.images % args.shard_size)
    images = [natural_image(rng) for _ in range(args.images)]
    mean_image = np.mean(images, axis=0, dtype=np.float64).astype(np.float32)
    make_dataset(
        args.out,
        {"train": sizes, "val": [max(1, args.images // 10)]},
        image=lambda i: images[i % len(images)],
        label=lambda i: i % args.classes,
        num_classes=args.classes,
        quality=args.quality,
        subsampling=2,
        mean_image=mean_image,
    )
    print(f"{args.out}: {args.images} train + {max(1, args.images // 10)} val images, {len(sizes)} train shards")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
