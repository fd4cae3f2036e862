"""The shard and manifest format: the one place that knows names, keys and the schema.

Layout of a preprocessed dataset directory ``OUT``::

    OUT/manifest.json                 classes, splits, shards, checksums, skipped files, statistics
    OUT/mean_image.npy                float32 256x256x3 mean of the train split (RGB, 0..255)
    OUT/{split}/{split}-000000.tar    WebDataset shards: KEY.jpg (256x256 RGB JPEG) + KEY.cls (ASCII label)
    OUT/{split}/{split}-000000.idx    DALI index file for the shard (``wds2idx`` format)
    OUT/{split}/{split}-000000.json   done-record of the shard (written last: its presence marks completion)
    OUT/{split}/plan.json             the deterministic shard plan every array task agrees on

This module has no heavy imports (no torch, no PIL): ``pipeline`` imports it to read datasets.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basics.errors import UserError
from basics.files import write_json_atomic

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MEAN_IMAGE_NAME = "mean_image.npy"
PLAN_NAME = "plan.json"
SPLITS = ("train", "val")

IMAGE_EXT = "jpg"
LABEL_EXT = "cls"
IMAGE_SIZE = 256  # stored side length; training crops 227 from it

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class FormatError(UserError):
    """A dataset directory that does not match this format (missing manifest, wrong schema...)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_name(shard: str) -> str:
    """DALI index file that belongs to a shard file name."""
    return shard[: -len(".tar")] + ".idx"


def done_name(shard: str) -> str:
    """Done-record of a shard; written after the tar and index are in place."""
    return shard[: -len(".tar")] + ".json"


def sample_key(source_name: str) -> str:
    """Sample key from a source file name, without dots.

    WebDataset and DALI split a member name at the *first* dot, so ``n01440764_10026.JPEG`` cannot
    be used as a key: take the stem and replace anything but [A-Za-z0-9_-].
    """
    stem = os.path.basename(source_name)
    stem = stem.split(".", 1)[0] if "." in stem else stem
    key = _KEY_UNSAFE.sub("_", stem)
    if not key:
        raise ValueError(f"cannot derive a sample key from {source_name!r}")
    return key


def encode_label(label: int) -> bytes:
    return str(int(label)).encode("ascii")


def decode_label(raw: bytes | bytearray | memoryview) -> int:
    """Label from a ``.cls`` payload; DALI hands these over as raw uint8 bytes."""
    return int(bytes(raw).decode("ascii").strip())


@dataclass
class ShardInfo:
    path: str  # relative to the dataset directory
    index: str  # relative path of the DALI index file
    samples: int
    sha256: str
    bytes: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardInfo":
        return cls(**{k: d[k] for k in ("path", "index", "samples", "sha256", "bytes")})


@dataclass
class SplitInfo:
    shards: list[ShardInfo]
    samples: int
    skipped: list[dict[str, str]]  # {"file": ..., "reason": ...}
    params: dict[str, Any]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SplitInfo":
        return cls(
            shards=[ShardInfo.from_dict(s) for s in d["shards"]],
            samples=int(d["samples"]),
            skipped=list(d.get("skipped", [])),
            params=dict(d.get("params", {})),
        )


@dataclass
class Stats:
    """Train-split pixel statistics on the 0..255 scale, RGB order."""

    images: int  # how many train images they were computed from
    mean: list[float]
    std: list[float]
    mean_image: str  # relative path of the 256x256x3 float32 .npy
    eigval: list[float]  # eigenvalues of the 3x3 RGB covariance, descending
    eigvec: list[list[float]]  # columns are eigenvectors: eigvec[:, i] goes with eigval[i]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Stats":
        return cls(**{k: d[k] for k in ("images", "mean", "std", "mean_image", "eigval", "eigvec")})


@dataclass
class Manifest:
    classes: list[dict[str, Any]]  # {"index": i, "wnid": ..., "name": ...} in index order
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    stats: Stats | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def wnids(self) -> list[str]:
        return [c["wnid"] for c in self.classes]

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise FormatError(
                f"manifest has no {name!r} split (has: {', '.join(self.splits) or 'none'}); "
                f"run `python -m preprocess shard --split {name}` first"
            )
        return self.splits[name]

    def to_dict(self) -> dict[str, Any]:
        def plain(obj: Any) -> Any:
            if hasattr(obj, "__dataclass_fields__"):
                return {k: plain(getattr(obj, k)) for k in obj.__dataclass_fields__}
            if isinstance(obj, dict):
                return {k: plain(v) for k, v in obj.items()}
            if isinstance(obj, list):
                return [plain(v) for v in obj]
            return obj

        return plain(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise FormatError(
                f"manifest schema version {version!r} is not {SCHEMA_VERSION}; "
                "re-run `python -m preprocess shard` with this version"
            )
        return cls(
            classes=list(d["classes"]),
            splits={k: SplitInfo.from_dict(v) for k, v in d.get("splits", {}).items()},
            stats=Stats.from_dict(d["stats"]) if d.get("stats") else None,
            schema_version=version,
        )


def manifest_path(root: str | Path) -> Path:
    return Path(root) / MANIFEST_NAME


def read_manifest(root: str | Path) -> Manifest:
    path = manifest_path(root)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FormatError(
            f"{path}: no manifest; is this a preprocessed dataset? (create one with `python -m preprocess shard`)"
        ) from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e}); re-run `python -m preprocess finalize`") from None
    return Manifest.from_dict(data)


def write_manifest(root: str | Path, manifest: Manifest) -> None:
    write_json_atomic(manifest_path(root), manifest.to_dict())
