"""The input pipeline: AlexNet's augmentation from the preprocessed WebDataset shards.

Two interchangeable implementations behind one interface, chosen by ``DataConfig.loader``:

- ``"dali"`` (``pipeline.data_dali``): NVIDIA DALI reads the shards through their ``.idx`` files,
  decodes on the GPU (``device="mixed"``) when the training device is CUDA and on CPU threads
  otherwise (laptops, tests), and does crop, flip, lighting and per-channel normalisation in one
  fused ``crop_mirror_normalize`` per view (the mean image is subtracted just before it).
- ``"torch"`` (``pipeline.data_torch``): a ``torch.utils.data.DataLoader`` over the same shards
  (read through the same index files), decoding with libjpeg-turbo (``simplejpeg``) in worker
  processes, for machines without DALI (macOS) and as the reference the tests compare DALI with.

Interface (all the training loop needs)::

    cfg = DataConfig(data="/data/shards")            # a section of pipeline.config.RunConfig
    for epoch in range(start_epoch, epochs):
        loader = train_loader(cfg, dp_rank=r, dp_size=n, epoch=epoch, seed=run_seed,
                              device=device, batch_size=per_rank_batch)
        len(loader)                                   # steps this epoch: the same on every rank
        for images, labels in loader: ...             # images [B, 3, crop, crop] on ``device``
    for images, labels in val_loader(cfg, dp_rank=r, dp_size=n, device=device, batch_size=b,
                                     ten_crop=True): # images [B, 10, 3, crop, crop]
        ...

``batch_size`` is per data-parallel rank (``pipeline.config``'s global batch divided by the dp
size). Images are float32 (or bfloat16 with ``dtype``) with logical shape NCHW; with
``channels_last`` the same logical shape is stored NHWC (``torch.channels_last``). Labels are
int64 class indices on ``device``.

What a training sample is (the paper, section 4.1): a random ``crop``x``crop`` window of the
256x256 stored image (offsets uniform over all integer positions), mirrored with probability
1/2, plus PCA lighting: ``offset = eigvec @ (alpha * sqrt(eigval))`` with ``alpha ~ N(0,
lighting_std)`` per image and principal component, added to every pixel; then the mean is
subtracted. ``mean="image"`` subtracts the 256x256 train mean image (the paper; its crop, taken
with the same window and mirror, is what is subtracted) and leaves the 0..255 scale;
``mean="channel"`` subtracts the per-channel mean and divides by the per-channel std (the usual
modern normalisation). Lighting scale: the manifest's ``eigval`` are variances on the 0..255
scale (about 9000 for ImageNet's first component), so the formula with the raw eigenvalues would
shift pixels by ~900 levels; like Krizhevsky's own data provider (cuda-convnet2 multiplies
N(0, 0.1) by the per-component *standard deviations*), we use ``sqrt(eigval)``, a shift of a few
intensity levels. Validation takes the centre crop, or the paper's 10 views: views 0..4 are the
top-left, top-right, bottom-left, bottom-right and centre windows and view ``5 + i`` is view ``i``
mirrored; the evaluator averages the 10 softmaxes.

Splitting, epochs and the remainder policy. A rank's samples are DALI's: the split's shards are
concatenated (training: in an order permuted per epoch from ``(seed, epoch)`` only, so every rank
agrees) and dp rank ``r`` of ``n`` takes the contiguous sample range
``[floor(r*N/n), floor((r+1)*N/n))``. Every sample is seen exactly once per epoch across the dp
ranks (training and validation alike): nothing is dropped and nothing is padded into the output.
Ranks differ by at most one sample, but DDP needs the same number of steps everywhere, so
``len(loader) = ceil(ceil(N/n) / batch_size)`` on every rank; the last step's batch is partial,
and where a rank would run out one step early its last full batch is split in two (so a batch is
empty only when a rank holds fewer samples than there are steps: toy datasets, or batch size 1).
Validation follows the same rules, so summing correct counts over ranks counts each image once.

Randomness. Augmentation and shuffling derive from ``(seed, dp_rank, epoch)`` only, never from
the global rank, so the two tensor-parallel ranks of a pair build identical pipelines and see
identical batches (same samples, order, crops, flips and lighting); another epoch gives another
order. (Tested bit-identical with CPU decoding. On GPUs the pair decodes with nvJPEG on the same
node's GPU model; we expect, but could not check here, bit-identical output there too.) Each epoch is a fresh pipeline, so an epoch is reproducible from its seed: a resume at an
epoch boundary continues exactly. A resume mid-epoch rebuilds the same epoch and skips its first
``k`` batches (they are decoded and discarded; the remaining batches are the same ones); the
reader shuffles through a buffer of ``shuffle_buffer`` encoded images on top of the shard order
permutation and the cross-class shuffle the shards were written with.

Errors the user can fix raise ``preprocess.format.UserError`` with one line: a missing or
truncated shard or index (named), a manifest without statistics, a class count that differs from
the model's (``num_classes``) or a label beyond it, an image or label that cannot be decoded
(the torch loader names the sample; DALI's error names the operator and points to it).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from preprocess import format as fmt
from preprocess.errors import UserError
from preprocess.format import FormatError

LOADERS = ("dali", "torch")
MEANS = ("image", "channel")
DTYPES = ("float32", "bfloat16")
TEN_CROP_VIEWS = 10


@dataclass
class DataConfig:
    data: str = "demo/shards"
    """preprocessed dataset directory (manifest.json + shards), from `python -m preprocess shard`"""
    loader: str = "dali"
    """input pipeline: dali (GPU decode on CUDA, CPU threads otherwise) or torch (DataLoader fallback)"""
    crop: int = 227
    """side of the square training/validation crop taken from the 256x256 stored images"""
    mean: str = "image"
    """mean subtraction: image (the paper: the 256x256 train mean image, 0..255 scale) or channel (mean/std per channel)"""
    lighting_std: float = 0.1
    """std of the PCA lighting coefficients alpha (the paper: 0.1; 0 = off)"""
    shuffle_buffer: int = 4096
    """encoded images in the reader's shuffle buffer (on top of the per-epoch shard order)"""
    workers: int = 0
    """CPU threads (dali) or worker processes (torch) per rank; 0 = this process's CPUs / local ranks"""
    dtype: str = "float32"
    """image dtype handed to the model: float32 or bfloat16"""
    channels_last: bool = False
    """hand images over in NHWC memory (torch.channels_last) instead of NCHW"""

    def __post_init__(self) -> None:
        if self.loader not in LOADERS:
            raise UserError(f"--data.loader must be one of {', '.join(LOADERS)} (got {self.loader!r})")
        if self.mean not in MEANS:
            raise UserError(f"--data.mean must be one of {', '.join(MEANS)} (got {self.mean!r})")
        if self.dtype not in DTYPES:
            raise UserError(f"--data.dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if not 1 <= self.crop <= fmt.IMAGE_SIZE:
            raise UserError(f"--data.crop must be in 1..{fmt.IMAGE_SIZE} (got {self.crop})")
        if self.lighting_std < 0:
            raise UserError(f"--data.lighting-std must be >= 0 (got {self.lighting_std})")
        if self.shuffle_buffer < 1:
            raise UserError(f"--data.shuffle-buffer must be at least 1 (got {self.shuffle_buffer})")
        if self.workers < 0:
            raise UserError(f"--data.workers must be >= 0 (got {self.workers})")


# --------------------------------------------------------------------------------------------
# The dataset on disk: checked once per loader, in Python, before any pipeline runs


@dataclass(frozen=True)
class Split:
    """One split's shards, in reading order, with their sample counts (from the manifest)."""

    root: Path
    name: str
    shards: tuple[Path, ...]
    indexes: tuple[Path, ...]
    counts: tuple[int, ...]
    num_classes: int

    @property
    def total(self) -> int:
        return sum(self.counts)

    def reordered(self, order: Sequence[int]) -> "Split":
        return Split(self.root, self.name, tuple(self.shards[i] for i in order),
                     tuple(self.indexes[i] for i in order), tuple(self.counts[i] for i in order), self.num_classes)

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


def open_split(cfg: DataConfig, split: str, *, num_classes: int | None = None) -> tuple[Split, Normalization]:
    """Read the manifest and check everything a loader relies on; raise UserError naming what is wrong."""
    root = Path(cfg.data)
    manifest = fmt.read_manifest(root)
    info = manifest.split(split)
    if num_classes is not None and num_classes != manifest.num_classes:
        raise UserError(f"{fmt.manifest_path(root)}: the dataset has {manifest.num_classes} classes but the "
                        f"model has {num_classes}; set --num-classes {manifest.num_classes} or use another dataset")
    if not info.shards or info.samples == 0:
        raise FormatError(f"{root / split}: the {split} split has no samples")
    shards, indexes, counts = [], [], []
    for shard in info.shards:
        path, index = root / shard.path, root / shard.index
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise UserError(f"{path}: shard listed in the manifest is missing; copy it back or re-run "
                            f"`python -m preprocess shard --split {split}`") from None
        if size != shard.bytes:
            raise UserError(f"{path}: shard is {size} bytes, the manifest says {shard.bytes} (truncated or "
                            f"corrupt copy); copy it again or re-run `python -m preprocess shard --split {split}`")
        indexed = _index_count(index)
        if indexed != shard.samples:
            raise UserError(f"{index}: index lists {indexed} samples, the manifest {shard.samples} for {path.name}; "
                            f"re-run `python -m preprocess shard --split {split}`")
        shards.append(path)
        indexes.append(index)
        counts.append(shard.samples)
    if sum(counts) != info.samples:
        raise FormatError(f"{fmt.manifest_path(root)}: {split} shards hold {sum(counts)} samples but the split "
                          f"says {info.samples}; re-run `python -m preprocess finalize`")
    return Split(root, split, tuple(shards), tuple(indexes), tuple(counts), manifest.num_classes), _normalization(cfg, manifest, root)


def _index_count(index: Path) -> int:
    """Sample count from a DALI index header (``v1.2 N``); only the first line is read."""
    try:
        with open(index, "rb") as f:
            header = f.readline(100).split()
    except FileNotFoundError:
        raise UserError(f"{index}: DALI index file is missing; re-run `python -m preprocess shard` "
                        "(or create it with DALI's wds2idx)") from None
    if len(header) != 2 or not header[0].startswith(b"v1.") or not header[1].isdigit():
        raise UserError(f"{index}: not a DALI index file (bad header {b' '.join(header)[:40]!r})")
    return int(header[1])


def _normalization(cfg: DataConfig, manifest: fmt.Manifest, root: Path) -> Normalization:
    stats = manifest.stats
    if stats is None:
        raise UserError(f"{fmt.manifest_path(root)}: manifest has no train statistics (mean, PCA eigval/eigvec); "
                        "run `python -m preprocess finalize` after sharding the train split")
    eigval, eigvec = np.asarray(stats.eigval, np.float64), np.asarray(stats.eigvec, np.float64)
    if eigval.shape != (3,) or eigvec.shape != (3, 3) or not np.all(np.isfinite(eigvec)) or np.any(eigval < 0):
        raise UserError(f"{fmt.manifest_path(root)}: manifest's PCA statistics are malformed "
                        f"(eigval {stats.eigval}, eigvec {stats.eigvec}); re-run `python -m preprocess finalize`")
    lighting = (eigvec * np.sqrt(eigval)[None, :]).astype(np.float32)
    size = fmt.IMAGE_SIZE
    if cfg.mean == "image":
        path = root / stats.mean_image
        try:
            mean_image = np.load(path)
        except FileNotFoundError:
            raise UserError(f"{path}: mean image listed in the manifest is missing; "
                            "re-run `python -m preprocess finalize`") from None
        except ValueError as e:
            raise UserError(f"{path}: not a readable .npy mean image ({e})") from None
        if mean_image.shape != (size, size, 3):
            raise UserError(f"{path}: mean image has shape {mean_image.shape}, expected ({size}, {size}, 3)")
        return Normalization(size, cfg.crop, np.ascontiguousarray(mean_image, np.float32), (0.0, 0.0, 0.0),
                             (1.0, 1.0, 1.0), lighting, cfg.lighting_std)
    if len(stats.mean) != 3 or len(stats.std) != 3 or min(stats.std) <= 0:
        raise UserError(f"{fmt.manifest_path(root)}: manifest's channel mean/std are malformed "
                        f"({stats.mean}, {stats.std}); re-run `python -m preprocess finalize`")
    return Normalization(size, cfg.crop, None, tuple(map(float, stats.mean)), tuple(map(float, stats.std)),
                         lighting, cfg.lighting_std)


# --------------------------------------------------------------------------------------------
# Seeds, shard order, rank ranges, step counts: pure functions every rank evaluates identically


def derive_seed(*parts: int | str) -> int:
    """A 31-bit seed from its parts (stable across processes and Python versions, unlike hash())."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Training's shard order for an epoch: from (seed, epoch) only, so all dp ranks agree on it."""
    return np.random.default_rng(derive_seed("shard-order", seed, epoch)).permutation(num_shards).tolist()


def augment_seed(seed: int, dp_rank: int, epoch: int) -> int:
    """Seed of one rank's epoch: shuffle buffer, crops, flips, lighting. Shared by a tensor-parallel pair."""
    return derive_seed("augment", seed, dp_rank, epoch)


def rank_range(total: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """The contiguous sample range DALI's readers give shard ``dp_rank`` of ``dp_size``."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    return total * dp_rank // dp_size, total * (dp_rank + 1) // dp_size


def steps_per_epoch(total: int, dp_size: int, batch_size: int) -> int:
    """Steps every rank takes: enough for the largest rank's samples (ranks differ by at most one)."""
    return math.ceil(math.ceil(total / dp_size) / batch_size)


def resolve_workers(workers: int) -> int:
    """0 = the CPUs this process may use, shared among the local ranks (torchrun's LOCAL_WORLD_SIZE)."""
    if workers > 0:
        return workers
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cpus // max(local, 1))


# --------------------------------------------------------------------------------------------
# Batches: labels, layout, dtype and the equal step count, shared by both implementations


def parse_labels(raw: Any) -> Any:
    """Class indices from ``.cls`` payloads: uint8 [B, L] ASCII digits, zero-padded on the right."""
    import torch

    raw = torch.as_tensor(raw).to(torch.int64)
    if raw.ndim == 1:
        raw = raw[:, None]
    digits = raw - ord("0")
    is_digit = (digits >= 0) & (digits <= 9)
    ignored = (raw == 0) | (raw == ord(" ")) | (raw == ord("\n")) | (raw == ord("\r")) | (raw == ord("\t"))
    if raw.numel() and (not bool((is_digit | ignored).all()) or not bool(is_digit.any(dim=1).all())):
        bad = raw[~(is_digit.any(dim=1) & (is_digit | ignored).all(dim=1))][0]
        text = bytes(int(v) for v in bad.tolist() if v).decode("ascii", "replace")
        raise FormatError(f"a .cls label is not a decimal number ({text!r}); the shards do not follow the format")
    value = torch.zeros(raw.shape[0], dtype=torch.int64)
    for i in range(raw.shape[1]):
        value = torch.where(is_digit[:, i], value * 10 + digits[:, i], value)
    return value


def finish_batch(images: Any, labels: Any, split: Split, *, device: Any, dtype: str, channels_last: bool,
                 input_channels_last: bool = False) -> tuple[Any, Any]:
    """Check the labels, move to ``device``, cast, and give NCHW logical shape (NHWC storage when ``channels_last``).

    ``images`` arrive [B, 3, H, W] / [B, V, 3, H, W], or with ``input_channels_last`` (DALI wrote
    HWC) [B, H, W, 3] / [B, V, H, W, 3]. ``labels`` are int64 on the CPU: checking them there costs
    no device sync, and an out-of-range label would otherwise be a device-side assert in the loss.
    """
    import torch

    if labels.numel() and int(labels.max()) >= split.num_classes:
        raise FormatError(f"{split.describe()}: a sample has label {int(labels.max())} but the manifest lists "
                          f"{split.num_classes} classes; the shards and the manifest do not belong together")
    images = images.to(device, non_blocking=True)
    if dtype == "bfloat16":
        images = images.to(torch.bfloat16)  # keeps the strides
    if input_channels_last:
        images = images.movedim(-1, -3)  # a view: logical NCHW over NHWC storage, no copy
    elif channels_last:
        images = images.movedim(-3, -1).contiguous().movedim(-1, -3)  # one copy, on the device
    return images, labels.to(device, non_blocking=True)


def even_steps(batches: Iterable[tuple[Any, Any]], steps: int) -> Iterator[tuple[Any, Any]]:
    """Exactly ``steps`` batches: where the source runs out early, split its last batch.

    The source yields full batches, then a partial or empty one and possibly more empty ones (the
    DALI iterator pads every rank to the same length with empty batches). We hold one batch back;
    once the source has nothing more, the held batch is split into as many pieces as steps remain,
    so DDP never gets an empty batch while a rank still has two samples left to give.
    """
    import torch

    held = None
    given = 0
    for images, labels in batches:
        if labels.shape[0] == 0:
            break
        if held is not None:
            yield held
            given += 1
        held = (images, labels)
    if held is None:
        return
    remaining = steps - given
    if remaining <= 1:
        yield held
        return
    images, labels = held
    for part_images, part_labels in zip(torch.tensor_split(images, remaining), torch.tensor_split(labels, remaining)):
        yield part_images, part_labels


class Loader:
    """An epoch of batches: ``len()`` is the step count (equal on all dp ranks); iterating again replays it.

    ``samples`` is how many real samples this rank yields, ``total`` the split's size.
    """

    def __init__(self, make: Callable[[], Iterator[tuple[Any, Any]]], *, steps: int, samples: int, total: int,
                 empty: Callable[[], tuple[Any, Any]]):
        self._make = make
        self._empty = empty
        self.steps = steps
        self.samples = samples
        self.total = total

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        given = 0
        for batch in even_steps(self._make(), self.steps):
            given += 1
            yield batch
        # A rank with fewer samples than steps (only in toy setups) still takes every step.
        for _ in range(self.steps - given):
            yield self._empty()


# --------------------------------------------------------------------------------------------
# The factories


def train_loader(cfg: DataConfig, *, dp_rank: int, dp_size: int, epoch: int, seed: int, device: Any,
                 batch_size: int, num_classes: int | None = None) -> Loader:
    """One epoch of augmented training batches for data-parallel rank ``dp_rank`` of ``dp_size``.

    ``batch_size`` is per dp rank. Both tensor-parallel ranks of a pair pass the same ``dp_rank``
    and get identical batches. ``num_classes`` (the model's) is checked against the manifest.
    """
    split, norm = open_split(cfg, "train", num_classes=num_classes)
    split = split.reordered(shard_order(len(split.shards), seed, epoch))
    return _build(cfg, split, norm, train=True, dp_rank=dp_rank, dp_size=dp_size,
                  seed=augment_seed(seed, dp_rank, epoch), device=device, batch_size=batch_size, ten_crop=False)


def val_loader(cfg: DataConfig, *, dp_rank: int, dp_size: int, device: Any, batch_size: int,
               ten_crop: bool = False, num_classes: int | None = None) -> Loader:
    """Every validation image once across the dp ranks: centre crop, or the 10 views [B, 10, 3, crop, crop]."""
    split, norm = open_split(cfg, "val", num_classes=num_classes)
    return _build(cfg, split, norm, train=False, dp_rank=dp_rank, dp_size=dp_size, seed=0, device=device,
                  batch_size=batch_size, ten_crop=ten_crop)


def _build(cfg: DataConfig, split: Split, norm: Normalization, *, train: bool, dp_rank: int, dp_size: int,
           seed: int, device: Any, batch_size: int, ten_crop: bool) -> Loader:
    import torch

    if batch_size < 1:
        raise UserError(f"batch size per data-parallel rank must be at least 1 (got {batch_size})")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    device = torch.device(device)
    start, end = rank_range(split.total, dp_rank, dp_size)
    steps = steps_per_epoch(split.total, dp_size, batch_size)
    if cfg.loader == "dali":
        from pipeline import data_dali as impl
    else:
        from pipeline import data_torch as impl  # type: ignore[no-redef]
    make = impl.batches(cfg, split, norm, train=train, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                        device=device, batch_size=batch_size, ten_crop=ten_crop, workers=resolve_workers(cfg.workers))
    shape = (0, TEN_CROP_VIEWS, 3, cfg.crop, cfg.crop) if ten_crop else (0, 3, cfg.crop, cfg.crop)

    def empty() -> tuple[Any, Any]:
        images = torch.zeros(shape, dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32, device=device)
        return images, torch.zeros(0, dtype=torch.int64, device=device)

    return Loader(make, steps=steps, samples=end - start, total=split.total, empty=empty)
