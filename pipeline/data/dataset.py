"""The dataset on disk, checked once per loader in Python before any pipeline runs: the split and its normalisation.

:func:`open_split` reads the manifest and checks every shard a loader relies on (present, the manifest's size,
its index's sample count) and the train statistics, raising a one-line ``UserError`` naming what is wrong;
:func:`open_dataset` is the same from the run's ``DataConfig``. The result, a :class:`Split` and its
:class:`Normalization`, is what every other module of ``pipeline.data`` reads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from basics.errors import UserError
from preprocess import format as fmt
from preprocess.format import FormatError

if TYPE_CHECKING:
    from pipeline.data.config import DataConfig


@dataclass(frozen=True)
class Split:
    """One split's shards, in reading order, with their sample counts (from the manifest)."""

    root: Path
    name: str
    shards: tuple[Path, ...]
    indexes: tuple[Path, ...]
    counts: tuple[int, ...]
    sha256: tuple[str, ...]
    num_classes: int

    @property
    def total(self) -> int:
        return sum(self.counts)

    def reordered(self, order: Sequence[int]) -> "Split":
        def pick(values: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(values[i] for i in order)

        return Split(
            self.root,
            self.name,
            pick(self.shards),
            pick(self.indexes),
            pick(self.counts),
            pick(self.sha256),
            self.num_classes,
        )

    def describe(self) -> str:
        return f"{self.root / self.name} ({len(self.shards)} shards)"


@dataclass(frozen=True)
class Normalization:
    """The numbers the augmentation needs, on the 0..255 scale, RGB."""

    image_size: int
    crop: int
    mean_image: np.ndarray | None  # float32 HxWx3 when mean="image", else None
    channel_mean: tuple[float, float, float]  # subtracted per channel (zeros when mean="image")
    channel_std: tuple[float, float, float]  # divided per channel (ones when mean="image")
    lighting: np.ndarray  # 3x3: offset = lighting @ alpha, columns eigvec[:, i] * sqrt(eigval[i])
    lighting_std: float

    @property
    def max_offset(self) -> int:
        return self.image_size - self.crop

    def center_offset(self) -> int:
        """Top/left of the centre window; the torch fallback and DALI use this same integer."""
        return self.max_offset // 2


def open_dataset(cfg: DataConfig, split: str, *, num_classes: int | None = None) -> tuple[Split, Normalization]:
    """The checked split and its normalisation constants, as the loaders see them (tests use this too)."""
    return open_split(
        cfg.data, split, crop=cfg.crop, mean=cfg.mean, lighting_std=cfg.lighting_std, num_classes=num_classes
    )


def open_split(
    data: str | Path, split: str, *, crop: int, mean: str, lighting_std: float, num_classes: int | None = None
) -> tuple[Split, Normalization]:
    """Read the manifest and check everything a loader relies on; raise UserError naming what is wrong.

    ``mean`` is ``"image"`` (the paper's mean image) or ``"channel"`` (per-channel mean/std).
    """
    root = Path(data)
    manifest = read_manifest(root)
    info = manifest.split(split)
    if num_classes is not None and num_classes != manifest.num_classes:
        raise UserError(
            f"{fmt.manifest_path(root)}: the dataset has {manifest.num_classes} classes but the "
            f"model has {num_classes}; set --num-classes {manifest.num_classes} or use another dataset"
        )
    if not info.shards or info.samples == 0:
        raise FormatError(f"{root / split}: the {split} split has no samples")
    shards, indexes, counts, hashes = [], [], [], []
    for shard in info.shards:
        path, index = inside(root, shard.path, "shard"), inside(root, shard.index, "index")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise UserError(
                f"{path}: shard listed in the manifest is missing; copy it back or re-run "
                f"`python -m preprocess shard --split {split}`"
            ) from None
        if size != shard.bytes:
            raise UserError(
                f"{path}: shard is {size} bytes, the manifest says {shard.bytes} (truncated or "
                f"corrupt copy); copy it again or re-run `python -m preprocess shard --split {split}`"
            )
        indexed = _index_count(index)
        if indexed != shard.samples:
            raise UserError(
                f"{index}: index lists {indexed} samples, the manifest {shard.samples} for {path.name}; "
                f"re-run `python -m preprocess shard --split {split}`"
            )
        shards.append(path)
        indexes.append(index)
        counts.append(shard.samples)
        hashes.append(shard.sha256)
    if sum(counts) != info.samples:
        raise FormatError(
            f"{fmt.manifest_path(root)}: {split} shards hold {sum(counts)} samples but the split "
            f"says {info.samples}; re-run `python -m preprocess finalize`"
        )
    return Split(
        root, split, tuple(shards), tuple(indexes), tuple(counts), tuple(hashes), manifest.num_classes
    ), _normalization(manifest, root, crop=crop, mean=mean, lighting_std=lighting_std)


def read_manifest(root: Path) -> fmt.Manifest:
    """The manifest, with a missing key or a value of the wrong type as one line naming it."""
    try:
        manifest = fmt.read_manifest(root)
        for info in manifest.splits.values():
            for shard in info.shards:
                if not (
                    isinstance(shard.path, str)
                    and isinstance(shard.index, str)
                    and isinstance(shard.sha256, str)
                    and type(shard.samples) is int
                    and type(shard.bytes) is int
                ):
                    raise TypeError(f"shard entry {shard.path!r} has a field of the wrong type")
        return manifest
    except KeyError as e:
        problem = f"missing key {e}"
    except (TypeError, ValueError, AttributeError) as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise FormatError(
        f"{fmt.manifest_path(root)}: malformed manifest ({problem}); re-run `python -m preprocess finalize`"
    )


def inside(root: Path, relative: str, what: str) -> Path:
    """``root / relative``, refused when it leaves the dataset directory (``..``, or an absolute path elsewhere)."""
    path = Path(os.path.normpath(root / relative))
    base = Path(os.path.normpath(root))
    if path == base or not path.is_relative_to(base):
        raise FormatError(
            f"{fmt.manifest_path(root)}: {what} path {relative!r} is outside the dataset directory; "
            "a manifest may only name files under it"
        )
    return path


def _index_count(index: Path) -> int:
    """Sample count from a DALI index header (``v1.2 N``); only the first line is read."""
    try:
        with open(index, "rb") as f:
            header = f.readline(100).split()
    except FileNotFoundError:
        raise UserError(
            f"{index}: DALI index file is missing; re-run `python -m preprocess shard` "
            "(or create it with DALI's wds2idx)"
        ) from None
    if len(header) != 2 or not header[0].startswith(b"v1.") or not header[1].isdigit():
        raise UserError(f"{index}: not a DALI index file (bad header {b' '.join(header)[:40]!r})")
    return int(header[1])


def _normalization(manifest: fmt.Manifest, root: Path, *, crop: int, mean: str, lighting_std: float) -> Normalization:
    stats = manifest.stats
    if stats is None:
        raise UserError(
            f"{fmt.manifest_path(root)}: manifest has no train statistics (mean, PCA eigval/eigvec); "
            "run `python -m preprocess finalize` after sharding the train split"
        )
    eigval, eigvec = np.asarray(stats.eigval, np.float64), np.asarray(stats.eigvec, np.float64)
    if eigval.shape != (3,) or eigvec.shape != (3, 3) or not np.all(np.isfinite(eigvec)) or np.any(eigval < 0):
        raise UserError(
            f"{fmt.manifest_path(root)}: manifest's PCA statistics are malformed "
            f"(eigval {stats.eigval}, eigvec {stats.eigvec}); re-run `python -m preprocess finalize`"
        )
    lighting = (eigvec * np.sqrt(eigval)[None, :]).astype(np.float32)
    size = fmt.IMAGE_SIZE
    if mean == "image":
        path = inside(root, stats.mean_image, "mean image")
        try:
            mean_image = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise UserError(
                f"{path}: mean image listed in the manifest is missing; re-run `python -m preprocess finalize`"
            ) from None
        except ValueError as e:
            raise UserError(f"{path}: not a readable .npy mean image ({e})") from None
        if mean_image.shape != (size, size, 3):
            raise UserError(f"{path}: mean image has shape {mean_image.shape}, expected ({size}, {size}, 3)")
        return Normalization(
            size,
            crop,
            np.ascontiguousarray(mean_image, np.float32),
            (0.0, 0.0, 0.0),
            (1.0, 1.0, 1.0),
            lighting,
            lighting_std,
        )
    if len(stats.mean) != 3 or len(stats.std) != 3 or min(stats.std) <= 0:
        raise UserError(
            f"{fmt.manifest_path(root)}: manifest's channel mean/std are malformed "
            f"({stats.mean}, {stats.std}); re-run `python -m preprocess finalize`"
        )
    return Normalization(
        size, crop, None, tuple(map(float, stats.mean)), tuple(map(float, stats.std)), lighting, lighting_std
    )
