"""What both input-pipeline implementations share: the checked dataset, seeds, rank ranges, batches.

``pipeline.data`` (the interface) opens a split here and hands an implementation one
:class:`EpochRequest`; the implementations (``dali_pipeline``, ``torch_loader``) import only this
module, so neither knows about the other or about the user-facing config. Everything here is a pure
function of its arguments: every dp rank (and both ranks of a tensor-parallel pair) evaluates it
identically, which is what makes the split exactly-once and the pair's batches identical.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from preprocess import format as fmt
from preprocess.errors import UserError
from preprocess.format import FormatError

if TYPE_CHECKING:
    import torch

TEN_CROP_VIEWS = 10


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


@dataclass(frozen=True)
class EpochRequest:
    """What an implementation is asked for: one dp rank's epoch of one split, fully determined."""

    split: Split  # in reading order (training: this epoch's shard order)
    norm: Normalization
    train: bool  # random crop/mirror/lighting and shuffling, else the centre crop or the 10 views
    dp_rank: int
    dp_size: int
    seed: int  # the rank's epoch seed (``augment_seed``); 0 for validation
    device: torch.device
    batch_size: int  # per dp rank
    ten_crop: bool
    workers: int  # DALI threads or DataLoader worker processes
    shuffle_buffer: int  # DALI's reader shuffle buffer (encoded images)
    dtype: str  # "float32" or "bfloat16"
    channels_last: bool


class Implementation(Protocol):
    """An input-pipeline implementation module (``pipeline.data.IMPLEMENTATIONS`` names them)."""

    def batches(self, request: EpochRequest) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """A function that runs the epoch and yields (images, labels) batches, then stops."""
        ...


def open_split(data: str | Path, split: str, *, crop: int, mean: str, lighting_std: float,
               num_classes: int | None = None) -> tuple[Split, Normalization]:
    """Read the manifest and check everything a loader relies on; raise UserError naming what is wrong.

    ``mean`` is ``"image"`` (the paper's mean image) or ``"channel"`` (per-channel mean/std).
    """
    root = Path(data)
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
    return Split(root, split, tuple(shards), tuple(indexes), tuple(counts), manifest.num_classes), \
        _normalization(manifest, root, crop=crop, mean=mean, lighting_std=lighting_std)


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


def _normalization(manifest: fmt.Manifest, root: Path, *, crop: int, mean: str, lighting_std: float) -> Normalization:
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
    if mean == "image":
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
        return Normalization(size, crop, np.ascontiguousarray(mean_image, np.float32), (0.0, 0.0, 0.0),
                             (1.0, 1.0, 1.0), lighting, lighting_std)
    if len(stats.mean) != 3 or len(stats.std) != 3 or min(stats.std) <= 0:
        raise UserError(f"{fmt.manifest_path(root)}: manifest's channel mean/std are malformed "
                        f"({stats.mean}, {stats.std}); re-run `python -m preprocess finalize`")
    return Normalization(size, crop, None, tuple(map(float, stats.mean)), tuple(map(float, stats.std)),
                         lighting, lighting_std)


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
