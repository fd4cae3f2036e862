"""The input pipeline: AlexNet's augmentation from the preprocessed WebDataset shards.

Interface (all the training loop and the evaluator need)::

    loader = train_loader(cfg, dp_rank=r, dp_size=n, epoch=e, seed=run_seed, device=device,
                          batch_size=per_rank_batch, num_classes=classes,
                          start_batch=k, verify_cache=run_dir / "verified-shards")
    loader.steps_in_epoch                # the epoch's steps: the same on every dp rank
    len(loader)                          # the batches it yields: steps_in_epoch - start_batch
    for images, labels in loader: ...    # images [B, 3, crop, crop] on ``device``, labels int64
    val_loader(cfg, dp_rank=r, dp_size=n, device=device, batch_size=b, ten_crop=True)  # [B, 10, 3, crop, crop]

Contract: every sample is seen exactly once per epoch across the dp ranks (nothing dropped or
padded; ranks take equal step counts); augmentation and order derive from ``(seed, dp_rank,
epoch)`` only, so both ranks of a tensor-parallel pair get identical batches, an epoch is
reproducible, and it can resume at any batch without reading the batches before it; the shards
read are checked against the manifest's sha256; errors the user can fix are one-line
``UserError``s naming the file and sample. The implementation is picked by ``DataConfig.loader``
from :data:`IMPLEMENTATIONS` (DALI, or a PyTorch DataLoader where DALI is missing); both import
only ``pipeline.data.common``. Design and measurements: ``docs/data-pipeline.md``,
``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pipeline.data.common import (
    TEN_CROP_VIEWS,
    EpochRequest,
    Implementation,
    Loader,
    Normalization,
    Split,
    augment_seed,
    batch_bounds,
    open_split,
    plan_epoch,
    resolve_workers,
    shard_order,
    steps_per_epoch,
)
from pipeline.data.integrity import verify_shards
from preprocess import format as fmt
from preprocess.errors import UserError

if TYPE_CHECKING:
    import torch

IMPLEMENTATIONS = {"dali": "pipeline.data.dali_pipeline", "torch": "pipeline.data.torch_loader"}
"""``--data.loader`` name -> implementation module (imported only when chosen: DALI is heavy and optional)."""
MEANS = ("image", "channel")
DTYPES = ("float32", "bfloat16")
VERIFY = ("full", "size")

__all__ = ["DataConfig", "IMPLEMENTATIONS", "Loader", "open_dataset", "train_loader", "val_loader"]


@dataclass
class DataConfig:
    data: str = "demo/shards"
    """preprocessed dataset directory (manifest.json + shards), from `python -m preprocess shard`"""
    loader: str = "dali"
    """input pipeline: dali (GPU decode on CUDA, CPU threads otherwise) or torch (DataLoader fallback)"""
    crop: int = 227
    """side of the square training/validation crop taken from the 256x256 stored images"""
    mean: str = "image"
    """mean subtraction: image (the paper: the 256x256 train mean image, 0..255 scale) or channel (mean/std)"""
    lighting_std: float = 0.1
    """std of the PCA lighting coefficients alpha (the paper: 0.1; 0 = off)"""
    verify: str = "full"
    """shard check before reading: full (sha256 against the manifest, once per shard per run dir) or size"""
    workers: int = 0
    """CPU threads (dali) or worker processes (torch) per rank; 0 = this process's CPUs / local ranks"""
    dtype: str = "float32"
    """image dtype handed to the model: float32 or bfloat16"""
    channels_last: bool = False
    """hand images over in NHWC memory (torch.channels_last) instead of NCHW"""

    def __post_init__(self) -> None:
        if self.loader not in IMPLEMENTATIONS:
            raise UserError(f"--data.loader must be one of {', '.join(IMPLEMENTATIONS)} (got {self.loader!r})")
        if self.mean not in MEANS:
            raise UserError(f"--data.mean must be one of {', '.join(MEANS)} (got {self.mean!r})")
        if self.dtype not in DTYPES:
            raise UserError(f"--data.dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if not 1 <= self.crop <= fmt.IMAGE_SIZE:
            raise UserError(f"--data.crop must be in 1..{fmt.IMAGE_SIZE} (got {self.crop})")
        if self.lighting_std < 0:
            raise UserError(f"--data.lighting-std must be >= 0 (got {self.lighting_std})")
        if self.verify not in VERIFY:
            raise UserError(f"--data.verify must be one of {', '.join(VERIFY)} (got {self.verify!r})")
        if self.workers < 0:
            raise UserError(f"--data.workers must be >= 0 (got {self.workers})")


def open_dataset(cfg: DataConfig, split: str, *, num_classes: int | None = None) -> tuple[Split, Normalization]:
    """The checked split and its normalisation constants, as the loaders see them (tests use this too)."""
    return open_split(
        cfg.data, split, crop=cfg.crop, mean=cfg.mean, lighting_std=cfg.lighting_std, num_classes=num_classes
    )


def train_loader(
    cfg: DataConfig,
    *,
    dp_rank: int,
    dp_size: int,
    epoch: int,
    seed: int,
    device: torch.device | str,
    batch_size: int,
    num_classes: int | None = None,
    start_batch: int = 0,
    verify_cache: Path | None = None,
) -> Loader:
    """One epoch of augmented training batches for data-parallel rank ``dp_rank`` of ``dp_size``.

    ``batch_size`` is per dp rank. Both tensor-parallel ranks of a pair pass the same ``dp_rank``
    and get identical batches. ``num_classes`` (the model's) is checked against the manifest.
    ``start_batch`` resumes the epoch: the loader yields the epoch's batches from that one on,
    equal to an uninterrupted epoch's, without reading or decoding the ones before. With
    ``verify="full"``, the shards this rank reads are checked against the manifest's sha256;
    ``verify_cache`` (a directory, e.g. in the run dir) remembers verified shards by size and
    mtime, so a requeued run does not hash them again.
    """
    split, norm = open_dataset(cfg, "train", num_classes=num_classes)
    split = split.reordered(shard_order(len(split.shards), seed, epoch))
    return _build(
        cfg,
        split,
        norm,
        train=True,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=augment_seed(seed, dp_rank, epoch),
        device=device,
        batch_size=batch_size,
        ten_crop=False,
        start_batch=start_batch,
        verify_cache=verify_cache,
    )


def val_loader(
    cfg: DataConfig,
    *,
    dp_rank: int,
    dp_size: int,
    device: torch.device | str,
    batch_size: int,
    ten_crop: bool = False,
    num_classes: int | None = None,
    verify_cache: Path | None = None,
    split: str = "val",
) -> Loader:
    """Every image of ``split`` (default val) once across the dp ranks, in manifest order, without
    augmentation: centre crop, or the 10 views [B, 10, 3, crop, crop]."""
    split, norm = open_dataset(cfg, split, num_classes=num_classes)
    return _build(
        cfg,
        split,
        norm,
        train=False,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=0,
        device=device,
        batch_size=batch_size,
        ten_crop=ten_crop,
        start_batch=0,
        verify_cache=verify_cache,
    )


def implementation(name: str) -> Implementation:
    """The implementation module registered as ``name``."""
    return cast(Implementation, importlib.import_module(IMPLEMENTATIONS[name]))


def _build(
    cfg: DataConfig,
    split: Split,
    norm: Normalization,
    *,
    train: bool,
    dp_rank: int,
    dp_size: int,
    seed: int,
    device: torch.device | str,
    batch_size: int,
    ten_crop: bool,
    start_batch: int,
    verify_cache: Path | None,
) -> Loader:
    import torch

    if batch_size < 1:
        raise UserError(f"batch size per data-parallel rank must be at least 1 (got {batch_size})")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    steps = steps_per_epoch(split.total, dp_size, batch_size)
    if not 0 <= start_batch <= steps:
        raise UserError(
            f"cannot start the epoch at batch {start_batch}: it has {steps} steps of {batch_size} "
            "per rank (was the batch size or the dp size changed since the checkpoint?)"
        )
    target = torch.device(device)
    plan = plan_epoch(split, norm, dp_rank=dp_rank, dp_size=dp_size, seed=seed, train=train)
    bounds = [(lo, hi) for lo, hi in batch_bounds(len(plan), steps, batch_size)[start_batch:] if hi > lo]
    if cfg.verify == "full" and bounds:
        read = sorted(set(plan.shard[bounds[0][0] :].tolist()))
        verify_shards(split, read, cache=verify_cache)
    request = EpochRequest(
        split=split,
        norm=norm,
        plan=plan,
        batches=bounds,
        train=train,
        ten_crop=ten_crop,
        batch_size=batch_size,
        device=target,
        workers=resolve_workers(cfg.workers),
        dtype=cfg.dtype,
        channels_last=cfg.channels_last,
    )
    make = implementation(cfg.loader).batches(request)
    shape = (0, TEN_CROP_VIEWS, 3, cfg.crop, cfg.crop) if ten_crop else (0, 3, cfg.crop, cfg.crop)

    def empty() -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.zeros(shape, dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32, device=target)
        return images, torch.zeros(0, dtype=torch.int64, device=target)

    return Loader(
        make, steps_in_epoch=steps, start_batch=start_batch, samples=len(plan), total=split.total, empty=empty
    )
