"""The embedded demo dataset: a small, learnable, ImageNet-shaped dataset drawn procedurally.

``python -m preprocess make-demo OUT`` writes, in a few seconds and byte-identically for a seed::

    OUT/train/<wnid>/<wnid>_<n>.JPEG            ImageFolder layout, as ILSVRC2012_img_train.tar extracts
    OUT/val/ILSVRC2012_val_00000001.JPEG ...    flat, as ILSVRC2012_img_val.tar extracts
    OUT/devkit/ILSVRC2012_devkit_t12/data/meta.mat
    OUT/devkit/ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt
    OUT/demo.json                               what was written, which files are quirky (written last)

Each class is a shape filled with a texture in a colour palette, at a random position, scale and
rotation on a noisy background, with small distractors and brightness jitter. Classes share a
palette or a shape with others, so a model must learn combinations, not one colour. As in the real
devkit, the ILSVRC2012_IDs in meta.mat are NOT in sorted-wnid order, so the val labels are only
right if they go through meta.mat's ID -> wnid map. The train split carries ImageNet's real
quirks on purpose: a CMYK JPEG, a PNG named .JPEG, a grayscale JPEG, an EXIF-rotated JPEG,
a truncated JPEG and an empty file.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from basics.errors import UserError

MARKER = "demo.json"  # {"complete": false} first, the summary last; lets a re-run replace the demo
DEVKIT_DATA = "devkit/ILSVRC2012_devkit_t12/data"
TILE = 1024  # side of the precomputed texture and background tiles; images crop windows from them
BACKGROUNDS = 8  # background tiles
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: alexnet-at-scale make-demo"

PALETTES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "warm": ((230, 90, 30), (250, 200, 40)),
    "cool": ((30, 90, 220), (60, 200, 230)),
    "green": ((40, 160, 60), (170, 230, 90)),
    "yellow": ((240, 215, 30), (35, 35, 35)),
    "purple": ((140, 50, 190), (235, 90, 200)),
    "gray": ((240, 240, 240), (110, 110, 110)),
}


@dataclass(frozen=True)
class DemoClass:
    wnid: str
    name: str
    shape: str
    palette: str
    texture: str


# Real ILSVRC2012 wnids and names, in sorted-wnid order. Every (shape, palette, texture) is distinct,
# and most classes share a shape or a palette with another one.
CLASSES = (
    DemoClass("n01440764", "tench, Tinca tinca", "circle", "warm", "solid"),
    DemoClass("n02102040", "English springer, English springer spaniel", "square", "cool", "stripes"),
    DemoClass("n02979186", "cassette player", "triangle", "green", "dots"),
    DemoClass("n03000684", "chain saw, chainsaw", "bars", "warm", "solid"),
    DemoClass("n03028079", "church, church building", "ring", "cool", "solid"),
    DemoClass("n03394916", "French horn, horn", "cross", "yellow", "checker"),
    DemoClass("n03417042", "garbage truck, dustcart", "star", "purple", "solid"),
    DemoClass("n03425413", "gas pump, gasoline pump, petrol pump, island dispenser", "circle", "green", "checker"),
    DemoClass("n03445777", "golf ball", "square", "purple", "dots"),
    DemoClass("n03888605", "parachute, chute", "triangle", "gray", "stripes"),
    DemoClass("n04037443", "racer, race car, racing car", "ring", "yellow", "dots"),
    DemoClass("n04254680", "soccer ball", "cross", "warm", "stripes"),
)

# Train files that are broken or unusual on purpose, as some of ImageNet's are, and what the
# preprocessor should do with them.
QUIRKS = (
    ("cmyk", "CMYK JPEG: convert to RGB"),
    ("png", "PNG file named .JPEG: decode by content"),
    ("grayscale", "1-channel JPEG: convert to RGB"),
    ("exif_rotated", "JPEG with EXIF orientation 6: rotate upright"),
    ("truncated", "JPEG cut in half: skip and record"),
    ("empty", "zero-byte file: skip and record"),
)


def make_demo(
    out: str, *, classes: int = 10, train_per_class: int = 260, val_per_class: int = 50, seed: int = 0
) -> dict[str, Any]:
    """Write the demo dataset under ``out``; return its summary (also written to OUT/demo.json)."""
    if not 1 <= classes <= len(CLASSES):
        raise UserError(f"--classes must be in 1..{len(CLASSES)} (got {classes})")
    if train_per_class < 1 or val_per_class < 0:
        raise UserError("--train-per-class must be at least 1 and --val-per-class at least 0")
    root = Path(out)
    _prepare(root)
    chosen = CLASSES[:classes]
    painter = _Painter(chosen, seed)

    quirks = _write_train(root / "train", chosen, train_per_class, painter, seed)
    truth = _write_val(root / "val", chosen, val_per_class, painter, seed)
    ids = _ilsvrc_ids(len(chosen), seed)
    _write_devkit(root / DEVKIT_DATA, chosen, ids, truth, train_per_class)

    summary = {
        "classes": [
            {
                "index": i,
                "wnid": c.wnid,
                "name": c.name,
                "ILSVRC2012_ID": ids[i],
                "shape": c.shape,
                "palette": c.palette,
                "texture": c.texture,
            }
            for i, c in enumerate(chosen)
        ],
        "train_images": classes * train_per_class,
        "val_images": len(truth),
        "quirks": quirks,
        # An answer key independent of the devkit: the wnid of val image 1, 2, ...
        "val_wnids": [chosen[c].wnid for c in truth],
        "seed": seed,
        "devkit": "devkit",
        "complete": True,
    }
    (root / MARKER).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _prepare(root: Path) -> None:
    """Make ``root`` ready: new or empty, or a previous demo (replaced; never other data)."""
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise UserError(f"{root}: not empty and not a demo dataset; choose a new or empty directory")
        # An older demo, possibly with other sizes: stale files would join the new dataset.
        for sub in ("train", "val", "devkit"):
            shutil.rmtree(root / sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    # Claim the directory before writing: an interrupted run leaves a demo that a re-run may replace.
    (root / MARKER).write_text(json.dumps({"complete": False}) + "\n")


# --------------------------------------------------------------------------------------------
# Drawing


class _Painter:
    """Draws class images. The texture and noise tiles are computed once; images crop from them."""

    def __init__(self, classes: tuple[DemoClass, ...], seed: int):
        rng = np.random.default_rng([seed, 7])
        self.classes = classes
        self.textures = [_texture_tile(c) for c in classes]
        self.backgrounds = [_background_tile(rng) for _ in range(BACKGROUNDS)]

    def draw(self, class_index: int, rng: np.random.Generator) -> Image.Image:
        w, h = _image_size(rng)
        image = _window(self.backgrounds[int(rng.integers(BACKGROUNDS))], w, h, rng)
        mask = Image.new("L", (w, h), 0)
        _draw_shape(ImageDraw.Draw(mask), self.classes[class_index].shape, w, h, rng)
        image.paste(_window(self.textures[class_index], w, h, rng), (0, 0), mask)
        _distractors(ImageDraw.Draw(image), w, h, rng)
        # Brightness and colour-cast jitter, per channel.
        gain = rng.uniform(0.75, 1.2, 3)
        lut = np.minimum(255, np.arange(256)[None, :] * gain[:, None]).astype(np.uint8)
        return image.point(lut.ravel().tolist())


def _window(tile: Image.Image, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """A random w x h window of a precomputed tile (cropping is much cheaper than drawing anew)."""
    x, y = int(rng.integers(0, TILE - w + 1)), int(rng.integers(0, TILE - h + 1))
    return tile.crop((x, y, x + w, y + h))


def _background_tile(rng: np.random.Generator) -> Image.Image:
    """A smooth random colour field (8x8 upsampled) plus fine noise; unrelated to any class."""
    field = rng.integers(30, 210, (8, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(field).resize((TILE, TILE), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-18, 19, (TILE, TILE, 3), dtype=np.int16)
    return Image.fromarray((smooth + noise).clip(0, 255).astype(np.uint8))


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """ImageNet-like sizes: mostly landscape 200..640 px sides, some portrait, a few large."""
    long_side = int(rng.integers(260, 641)) if rng.random() > 0.01 else int(rng.integers(800, 1001))
    short_side = max(200, int(long_side * rng.uniform(0.6, 1.0)))
    return (short_side, long_side) if rng.random() < 0.15 else (long_side, short_side)


def _texture_tile(cls: DemoClass) -> Image.Image:
    a, b = (np.array(c, dtype=np.uint8) for c in PALETTES[cls.palette])
    y, x = np.ogrid[0:TILE, 0:TILE]
    if cls.texture == "solid":
        second = np.zeros((TILE, TILE), bool)
    elif cls.texture == "stripes":
        second = ((x + y) // 9) % 2 == 1
    elif cls.texture == "dots":
        second = (x % 18 - 9) ** 2 + (y % 18 - 9) ** 2 < 20
    elif cls.texture == "checker":
        second = (x // 12 + y // 12) % 2 == 1
    else:
        raise ValueError(cls.texture)
    return Image.fromarray(np.where(second[..., None], b, a))


def _rotated(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, w: int, h: int, rng: np.random.Generator) -> None:
    """Fill ``shape`` (white) into a mask at a random position, scale and rotation."""
    r = rng.uniform(0.22, 0.42) * min(w, h)
    cx, cy = rng.uniform(r * 0.8, w - r * 0.8), rng.uniform(r * 0.8, h - r * 0.8)
    angle = rng.uniform(0, 2 * math.pi)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        q = r * 0.55
        draw.ellipse((cx - q, cy - q, cx + q, cy + q), fill=0)
    elif shape == "square":
        q = r * 0.8
        draw.polygon(_rotated(_rect(-q, -q, q, q), cx, cy, angle), fill=255)
    elif shape == "triangle":
        corners = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(_rotated(corners, cx, cy, angle), fill=255)
    elif shape == "star":
        corners = [
            (
                (r if k % 2 == 0 else r * 0.42) * math.cos(k * math.pi / 5 - math.pi / 2),
                (r if k % 2 == 0 else r * 0.42) * math.sin(k * math.pi / 5 - math.pi / 2),
            )
            for k in range(10)
        ]
        draw.polygon(_rotated(corners, cx, cy, angle), fill=255)
    elif shape == "cross":
        t = r * 0.28
        draw.polygon(_rotated(_rect(-r, -t, r, t), cx, cy, angle), fill=255)
        draw.polygon(_rotated(_rect(-t, -r, t, r), cx, cy, angle), fill=255)
    elif shape == "bars":
        t = r * 0.16
        for k in (-2, 0, 2):
            draw.polygon(_rotated(_rect(-r, k * t * 1.6 - t, r, k * t * 1.6 + t), cx, cy, angle), fill=255)
    else:
        raise ValueError(shape)


def _distractors(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator) -> None:
    """A few small blobs and lines in random colours, so that no single pixel colour decides."""
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        s = rng.uniform(0.02, 0.07) * min(w, h)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x - s, y - s, x + s, y + s), fill=colour)
        else:
            draw.line((x, y, x + rng.uniform(-4, 4) * s, y + rng.uniform(-4, 4) * s), fill=colour, width=3)


def _jpeg(image: Image.Image, rng: np.random.Generator, **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=int(rng.integers(80, 96)), **options)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Splits


def _write_train(
    directory: Path, classes: tuple[DemoClass, ...], per_class: int, painter: _Painter, seed: int
) -> list[dict[str, str]]:
    """ImageFolder train split; returns the quirky files it planted."""
    # Quirk k goes to class k % C, image k // C: spread over classes, deterministic for any size.
    planted = {
        (k % len(classes), k // len(classes)): quirk
        for k, (quirk, _) in enumerate(QUIRKS)
        if k // len(classes) < per_class
    }
    expectation = dict(QUIRKS)
    quirks = []
    for c, cls in enumerate(classes):
        folder = directory / cls.wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, 0, c, i])
            image = painter.draw(c, rng)
            name = f"{cls.wnid}_{i + 1}.JPEG"
            quirk = planted.get((c, i))
            (folder / name).write_bytes(_quirky_bytes(image, quirk, rng) if quirk else _jpeg(image, rng))
            if quirk:
                quirks.append({"file": f"train/{cls.wnid}/{name}", "quirk": quirk, "expect": expectation[quirk]})
    return quirks


def _quirky_bytes(image: Image.Image, quirk: str, rng: np.random.Generator) -> bytes:
    if quirk == "cmyk":
        return _jpeg(image.convert("CMYK"), rng)
    if quirk == "grayscale":
        return _jpeg(image.convert("L"), rng)
    if quirk == "png":
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue()
    if quirk == "exif_rotated":
        # Stored on its side with orientation 6 ("rotate 90 CW to display"), as cameras write it.
        exif = Image.Exif()
        exif[0x0112] = 6
        return _jpeg(image.transpose(Image.Transpose.ROTATE_90), rng, exif=exif.tobytes())
    if quirk == "truncated":
        data = _jpeg(image, rng)
        return data[: len(data) // 2]
    if quirk == "empty":
        return b""
    raise ValueError(quirk)


def _write_val(
    directory: Path, classes: tuple[DemoClass, ...], per_class: int, painter: _Painter, seed: int
) -> list[int]:
    """Flat val split, classes interleaved as in ILSVRC2012; returns the class index of image 1, 2, ..."""
    directory.mkdir(parents=True)
    truth = [c for c in range(len(classes)) for _ in range(per_class)]
    np.random.default_rng([seed, 2]).shuffle(truth)
    seen = [0] * len(classes)
    for n, c in enumerate(truth, start=1):
        rng = np.random.default_rng([seed, 1, c, seen[c]])
        seen[c] += 1
        (directory / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(_jpeg(painter.draw(c, rng), rng))
    return truth


# --------------------------------------------------------------------------------------------
# Devkit


def _ilsvrc_ids(count: int, seed: int) -> list[int]:
    """ILSVRC2012_ID (1..count) of each class in sorted-wnid order: a permutation that is not sorted."""
    ids = [int(v) + 1 for v in np.random.default_rng([seed, 3]).permutation(count)]
    if count > 1 and ids == sorted(ids):
        ids.reverse()  # the point of the demo devkit is that this order differs
    return ids


def _write_devkit(
    directory: Path, classes: tuple[DemoClass, ...], ids: list[int], truth: list[int], train_per_class: int
) -> None:
    directory.mkdir(parents=True)
    lines = "".join(f"{ids[c]}\n" for c in truth)
    (directory / "ILSVRC2012_validation_ground_truth.txt").write_text(lines)
    (directory / "meta.mat").write_bytes(meta_mat_bytes(_synsets(classes, ids, train_per_class)))


def _synsets(classes: tuple[DemoClass, ...], ids: list[int], train_per_class: int) -> list[dict[str, Any]]:
    """Rows of meta.mat's ``synsets`` as in the real devkit: leaves (the classes) get IDs 1..N,
    then non-leaf synsets above them (num_children > 0) with higher IDs; rows in ID order."""
    n = len(classes)
    leaves = [
        {
            "ILSVRC2012_ID": ids[c],
            "WNID": cls.wnid,
            "words": cls.name,
            "gloss": f"demo class: a {cls.shape} with {cls.texture} {cls.palette} texture",
            "num_children": 0,
            "children": [],
            "wordnet_height": 0,
            "num_train_images": train_per_class,
        }
        for c, cls in enumerate(classes)
    ]
    half = sorted(ids)[: (n + 1) // 2]
    device = {
        "ILSVRC2012_ID": n + 1,
        "WNID": "n03183080",
        "words": "device",
        "gloss": "an instrumentality invented for a particular purpose",
        "num_children": len(half),
        "children": half,
        "wordnet_height": 1,
        "num_train_images": train_per_class * len(half),
    }
    top = [n + 1] + sorted(ids)[len(half) :]
    entity = {
        "ILSVRC2012_ID": n + 2,
        "WNID": "n00001740",
        "words": "entity",
        "gloss": "that which is perceived or known or inferred to have its own distinct existence",
        "num_children": len(top),
        "children": top,
        "wordnet_height": 2,
        "num_train_images": train_per_class * n,
    }
    return sorted(leaves, key=lambda s: s["ILSVRC2012_ID"]) + [device, entity]


def meta_mat_bytes(synsets: list[dict[str, Any]]) -> bytes:
    """A meta.mat with a ``synsets`` struct array (N x 1, the real file's field order and types)."""
    import scipy.io

    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    table = np.zeros((len(synsets), 1), dtype=[(f, object) for f in fields])
    for row, s in enumerate(synsets):
        table[row, 0] = (
            float(s["ILSVRC2012_ID"]),
            s["WNID"],
            s["words"],
            s["gloss"],
            float(s["num_children"]),
            np.array(s["children"], dtype=float).reshape(1, -1),
            float(s["wordnet_height"]),
            float(s["num_train_images"]),
        )
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": table})
    # savemat stamps the time into the 116-byte text header: fix it, so the same seed gives the same bytes.
    return _MAT_HEADER.ljust(116, b" ") + buf.getvalue()[116:]


# --------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="directory to write (new, empty, or an earlier demo, which is replaced)")
    parser.add_argument("--classes", type=int, default=10, help=f"number of classes (1..{len(CLASSES)})")
    parser.add_argument("--train-per-class", type=int, default=260, help="train images per class")
    parser.add_argument("--val-per-class", type=int, default=50, help="val images per class")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    summary = make_demo(
        str(args.out),
        classes=args.classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        seed=args.seed,
    )
    print(
        f"demo dataset in {args.out}: {summary['train_images']} train images in "
        f"{len(summary['classes'])} classes ({args.out}/train), {summary['val_images']} val images "
        f"({args.out}/val), devkit {os.path.join(str(args.out), 'devkit')}; "
        f"{len(summary['quirks'])} quirky train files listed in {args.out}/{MARKER}; "
        f"{time.monotonic() - started:.1f} s"
    )
    return 0
