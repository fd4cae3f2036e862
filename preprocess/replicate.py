"""A dataset with ImageNet's sample count from any small one: hard links under new names, one manifest.

``python -m preprocess replicate --src SHARDS --out BIG --samples 1281167`` links the source's
shards (and their DALI indexes) again and again as ``BIG/train/train-000000.tar``, ... until the
split holds at least ``--samples`` samples (whole shards), does the same for val, links the mean
image and writes one manifest listing every link with its source's sample count, size and sha256.
Every file the loaders, the hashing and the planning touch is then there at full count, while the
disk holds the source's bytes once: what grows with the dataset (plans, index reading, hashing,
manifests) can be measured at ImageNet's size on one machine. A link is a real directory entry
with its own path, so the verification cache hashes each one (as it would ImageNet's shards); the
page cache holds the source's bytes once, so hashing runs at memory speed, not disk speed.

The manifest is written last, so a ``BIG`` without one is incomplete; the same command completes it.
"""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

from basics.errors import UserError
from preprocess import format as fmt

IMAGENET_TRAIN = 1_281_167
IMAGENET_VAL = 50_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", required=True, type=Path, help="a preprocessed dataset (manifest.json + shards)")
    p.add_argument("--out", required=True, type=Path, help="new dataset directory, on the same filesystem as --src")
    p.add_argument("--samples", type=int, default=IMAGENET_TRAIN, help="train samples at least (whole shards)")
    p.add_argument("--val-samples", type=int, default=IMAGENET_VAL, help="val samples at least (0 = no val split)")


def run(args: argparse.Namespace) -> int:
    manifest = replicate(args.src, args.out, {"train": args.samples, "val": args.val_samples})
    for name, info in manifest.splits.items():
        print(f"{args.out / name}: {info.samples} samples in {len(info.shards)} shards (hard links)")
    print(f"{fmt.manifest_path(args.out)}: written")
    return 0


def replicate(src: Path, out: Path, samples: dict[str, int]) -> fmt.Manifest:
    """Write ``out`` as ``src`` linked up to ``samples[split]`` samples per split; its manifest."""
    src, out = Path(src), Path(out)
    for split, count in samples.items():
        if count < 0:
            raise UserError(f"--{'samples' if split == 'train' else 'val-samples'} must be >= 0 (got {count})")
    source = fmt.read_manifest(src)
    if fmt.manifest_path(out).exists():
        raise UserError(f"{fmt.manifest_path(out)}: already a dataset; delete {out} or pick another --out")
    if source.stats is None:
        raise UserError(f"{fmt.manifest_path(src)}: no train statistics; run `python -m preprocess finalize` first")
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, want in samples.items():
        if want == 0:
            continue
        info = source.split(name)
        if not info.shards or info.samples == 0:
            raise UserError(f"{src / name}: the {name} split has no samples to replicate")
        (out / name).mkdir(exist_ok=True)
        shards: list[fmt.ShardInfo] = []
        total = 0
        while total < want:
            shard = info.shards[len(shards) % len(info.shards)]
            tar = fmt.shard_name(name, len(shards))
            index = fmt.index_name(tar)
            _link(src / shard.path, out / name / tar)
            _link(src / shard.index, out / name / index)
            shards.append(fmt.ShardInfo(f"{name}/{tar}", f"{name}/{index}", shard.samples, shard.sha256, shard.bytes))
            total += shard.samples
        params = {**info.params, "replicated_from": str(src.resolve()), "source_shards": len(info.shards)}
        splits[name] = fmt.SplitInfo(shards=shards, samples=total, skipped=[], params=params)
    stats = source.stats
    _link(src / stats.mean_image, out / stats.mean_image)
    manifest = fmt.Manifest(classes=source.classes, splits=splits, stats=stats)
    fmt.write_manifest(out, manifest)
    return manifest


def _link(source: Path, target: Path) -> None:
    """Hard-link ``target`` to ``source``; a link already there from an interrupted run is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except FileExistsError:
        if not os.path.samefile(source, target):
            raise UserError(f"{target}: exists, not a link to {source}; delete it or pick another --out") from None
    except FileNotFoundError:
        raise UserError(f"{source}: listed in the source manifest but missing") from None
    except OSError as e:
        if e.errno == errno.EXDEV:
            raise UserError(
                f"{target}: cannot hard-link across filesystems; put --out on the same filesystem as {source}"
            ) from None
        raise
