"""The input pipeline: AlexNet's augmentation from the preprocessed WebDataset shards.

Interface (all the training loop and the evaluator need)::

    loader = train_loader(cfg, dp_rank=r, dp_size=n, epoch=e, seed=run_seed, device=device,
                          batch_size=per_rank_batch, num_classes=classes,
                          start_batch=k, ahead=ahead)      # ahead = Ahead(): next epoch prepared meanwhile
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
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from basics.errors import UserError
from pipeline.data.common import (
    TEN_CROP_VIEWS,
    EpochRequest,
    Implementation,
    Loader,
    Normalization,
    Plan,
    Split,
    augment_seed,
    batch_bounds,
    open_split,
    plan_epoch,
    resolve_workers,
    shard_order,
    steps_per_epoch,
)
from pipeline.data.integrity import Verified, dataset_cache, verify_shards
from preprocess import format as fmt

if TYPE_CHECKING:
    import torch

IMPLEMENTATIONS = {"dali": "pipeline.data.dali_pipeline", "torch": "pipeline.data.torch_loader"}
"""``--data.loader`` name -> implementation module (imported only when chosen: DALI is heavy and optional)."""
MEANS = ("image", "channel")
DTYPES = ("float32", "bfloat16")
VERIFY = ("full", "size")
INDEX_CACHE = "index"  # parsed DALI index files (.npy), inside the dataset's cache directory

__all__ = ["Ahead", "DataConfig", "IMPLEMENTATIONS", "Loader", "open_dataset", "train_loader", "val_loader"]


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
    """shard check before reading: full (sha256 against the manifest, remembered per dataset until changed) or size"""
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
    ahead: Ahead | None = None,
) -> Loader:
    """One epoch of augmented training batches for data-parallel rank ``dp_rank`` of ``dp_size``.

    ``batch_size`` is per dp rank. Both tensor-parallel ranks of a pair pass the same ``dp_rank``
    and get identical batches. ``num_classes`` (the model's) is checked against the manifest.
    ``start_batch`` resumes the epoch: the loader yields the epoch's batches from that one on,
    equal to an uninterrupted epoch's, without reading or decoding the ones before. With
    ``verify="full"``, the shards this rank reads are checked against the manifest's sha256 and
    remembered in ``verify_cache`` (default: the dataset's own cache, see
    :func:`pipeline.data.integrity.dataset_cache`), so another run or epoch does not hash them again.
    ``ahead`` (kept by the caller across epochs) takes this epoch's plan from it when it was
    prepared in the background, and starts preparing the next epoch's, so no epoch start waits
    for a plan or for hashing.
    """
    inputs = _EpochInputs(cfg, dp_rank, dp_size, seed, batch_size, num_classes, verify_cache)
    if ahead is None:
        prepared = inputs.prepare(epoch, start_batch)
    else:
        prepared = ahead.take((inputs, epoch, start_batch), lambda: inputs.prepare(epoch, start_batch))
        # Started when the second batch is asked for: not competing with the first step for cores.
        return _loader(
            cfg,
            prepared,
            device=device,
            ten_crop=False,
            after_first_batch=lambda: ahead.start(
                (inputs, epoch + 1, 0), lambda: inputs.prepare(epoch + 1, 0, cancel=ahead.cancelled)
            ),
        )
    return _loader(cfg, prepared, device=device, ten_crop=False)


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
    opened, norm = open_dataset(cfg, split, num_classes=num_classes)
    prepared = _prepare(
        cfg,
        opened,
        norm,
        train=False,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=0,
        batch_size=batch_size,
        start_batch=0,
        verify_cache=verify_cache,
    )
    return _loader(cfg, prepared, device=device, ten_crop=ten_crop)


def implementation(name: str) -> Implementation:
    """The implementation module registered as ``name``."""
    return cast(Implementation, importlib.import_module(IMPLEMENTATIONS[name]))


@dataclass(frozen=True)
class _Prepared:
    """An epoch before any batch: the checked split, the plan, its batches, the shards verified for it."""

    split: Split
    norm: Normalization
    plan: Plan
    train: bool
    batch_size: int
    bounds: list[tuple[int, int]]  # the non-empty batches to yield
    steps: int
    start_batch: int
    cache: Path | None  # where the verified shards are recorded (None: --data.verify size)
    verified: Verified | None


@dataclass(frozen=True)
class _EpochInputs:
    """What a training epoch's preparation depends on besides the epoch (the key ``Ahead`` matches)."""

    cfg: DataConfig
    dp_rank: int
    dp_size: int
    seed: int
    batch_size: int
    num_classes: int | None
    verify_cache: Path | None

    def prepare(self, epoch: int, start_batch: int, cancel: threading.Event | None = None) -> _Prepared:
        split, norm = open_dataset(self.cfg, "train", num_classes=self.num_classes)
        return _prepare(
            self.cfg,
            split.reordered(shard_order(len(split.shards), self.seed, epoch)),
            norm,
            train=True,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            seed=augment_seed(self.seed, self.dp_rank, epoch),
            batch_size=self.batch_size,
            start_batch=start_batch,
            verify_cache=self.verify_cache,
            cancel=cancel,
        )


class Ahead:
    """The next epoch's preparation (index reading, plan, shard hashing), run in a background thread.

    ``train_loader(..., ahead=a)`` takes its epoch from here when it matches and starts the next
    one; a caller keeps one per training run and calls :meth:`close` when done. The work is numpy
    and ``hashlib`` (both release the GIL), so the training loop keeps its core. A failure in the
    background is not trusted either way: the epoch is prepared again in the foreground, which
    raises the error if it still holds. Files verified ahead are stat-ed again when taken, so a
    shard written in between is hashed again before it is read.
    """

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self._key: object = None
        self._thread: threading.Thread | None = None
        self._result: list[Any] = []

    def take(self, key: object, prepare: Callable[[], _Prepared]) -> _Prepared:
        thread, matches, result = self._thread, self._key == key, self._result
        self._thread, self._key, self._result = None, None, []
        if thread is not None and matches:
            thread.join()
            if result and isinstance(result[0], _Prepared):
                prepared = result[0]
                try:
                    if prepared.verified is not None:
                        changed = prepared.verified.changed(prepared.split)
                        if changed:
                            verify_shards(prepared.split, changed, cache=prepared.cache)
                    return prepared
                except OSError:
                    pass  # a shard gone since: the foreground preparation says which, in one line
        elif thread is not None:
            self._stop(thread)
        return prepare()

    def start(self, key: object, prepare: Callable[[], _Prepared]) -> None:
        if self._thread is not None and self._key == key:
            return  # already under way (an epoch iterated twice)
        if self._thread is not None:
            self._stop(self._thread)
        result: list[Any] = []

        def run() -> None:
            try:
                result.append(prepare())
            except BaseException as e:  # re-raised, or retried, by take() in the foreground
                result.append(e)

        self.cancelled.clear()
        self._key, self._result = key, result
        self._thread = threading.Thread(target=run, name="alexnet-epoch-ahead", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the background preparation (if any) has finished (benchmarks, tests)."""
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        """Stop preparing (the run is over), without waiting: hashing stops at its next shard, and a plan
        being built is dropped with the (daemon) thread; records are written atomically, so at worst a
        temporary file is left in the cache if the process ends first."""
        self.cancelled.set()
        self._thread, self._key, self._result = None, None, []

    def _stop(self, thread: threading.Thread) -> None:
        self.cancelled.set()
        thread.join()
        self.cancelled.clear()


def _prepare(
    cfg: DataConfig,
    split: Split,
    norm: Normalization,
    *,
    train: bool,
    dp_rank: int,
    dp_size: int,
    seed: int,
    batch_size: int,
    start_batch: int,
    verify_cache: Path | None,
    cancel: threading.Event | None = None,
) -> _Prepared:
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
    try:
        indexes: Path | None = dataset_cache(split.root) / INDEX_CACHE
        indexes.mkdir(exist_ok=True)
    except (UserError, OSError):
        indexes = None  # nowhere writable: parse the index files every epoch
    plan = plan_epoch(split, norm, dp_rank=dp_rank, dp_size=dp_size, seed=seed, train=train, index_cache=indexes)
    bounds = [(lo, hi) for lo, hi in batch_bounds(len(plan), steps, batch_size)[start_batch:] if hi > lo]
    cache, verified = None, None
    if cfg.verify == "full" and bounds:
        cache = Path(verify_cache) if verify_cache is not None else dataset_cache(split.root)
        read = np.unique(plan.shard[bounds[0][0] :]).tolist()  # the shards this rank reads from here on
        verified = verify_shards(split, read, cache=cache, threads=resolve_workers(cfg.workers), cancel=cancel)
    return _Prepared(split, norm, plan, train, batch_size, bounds, steps, start_batch, cache, verified)


def _loader(
    cfg: DataConfig,
    prepared: _Prepared,
    *,
    device: torch.device | str,
    ten_crop: bool,
    after_first_batch: Callable[[], None] | None = None,
) -> Loader:
    import torch

    target = torch.device(device)
    request = EpochRequest(
        split=prepared.split,
        norm=prepared.norm,
        plan=prepared.plan,
        batches=prepared.bounds,
        train=prepared.train,
        ten_crop=ten_crop,
        batch_size=prepared.batch_size,
        device=target,
        workers=resolve_workers(cfg.workers),
        dtype=cfg.dtype,
        channels_last=cfg.channels_last,
    )
    batches = implementation(cfg.loader).batches(request)
    make = batches if after_first_batch is None else _calling_after_first(batches, after_first_batch)
    shape = (0, TEN_CROP_VIEWS, 3, cfg.crop, cfg.crop) if ten_crop else (0, 3, cfg.crop, cfg.crop)

    def empty() -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.zeros(shape, dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32, device=target)
        return images, torch.zeros(0, dtype=torch.int64, device=target)

    return Loader(
        make,
        steps_in_epoch=prepared.steps,
        start_batch=prepared.start_batch,
        samples=len(prepared.plan),
        total=prepared.split.total,
        empty=empty,
    )


def _calling_after_first(batches: Callable[[], Iterator[Any]], then: Callable[[], None]) -> Callable[[], Iterator[Any]]:
    def make() -> Iterator[Any]:
        for i, batch in enumerate(batches()):
            yield batch
            if i == 0:
                then()

    return make
