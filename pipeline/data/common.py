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
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from basics.errors import UserError
from basics.files import atomic_output
from preprocess import format as fmt
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


@dataclass(frozen=True)
class EpochRequest:
    """What an implementation is asked for: these batches of this plan, augmented, on ``device``."""

    split: Split  # in reading order (training: this epoch's shard order)
    norm: Normalization
    plan: Plan  # the rank's epoch: samples in order, windows, mirrors, lighting offsets
    batches: list[tuple[int, int]]  # plan positions [lo, hi) of each batch to yield, all non-empty
    train: bool  # random windows/mirrors/lighting from the plan, else the centre crop or the 10 views
    ten_crop: bool
    batch_size: int  # the largest batch
    device: torch.device
    workers: int  # DALI threads or DataLoader worker processes
    dtype: str  # "float32" or "bfloat16"
    channels_last: bool


class Implementation(Protocol):
    """An input-pipeline implementation module (``pipeline.data.IMPLEMENTATIONS`` names them)."""

    def batches(self, request: EpochRequest) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """A function that runs the epoch and yields (images, labels) batches, then stops."""
        ...


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
    """Seed of one rank's epoch plan: order, windows, flips, lighting. Shared by a tensor-parallel pair."""
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
# An epoch's plan: which sample each position is and how it is augmented, drawn up front

INDEX_COLUMNS = 4  # jpg offset, jpg size, cls offset, cls size
_LABEL_DIGITS = 18  # longest label parsed in arrays (int64); longer ones go through the exact path
_TOKENS_PER_ROW = 8  # "jpg OFFSET SIZE KEY.jpg cls OFFSET SIZE KEY.cls", the order preprocess writes
_OFFSET_CHUNK = 1 << 14  # plan rows per lighting draw: bounds the float64 temporaries, same stream


def read_index(path: Path, cache: Path | None = None) -> np.ndarray:
    """int64 ``[n, 4]``: jpg offset, jpg size, cls offset, cls size per sample of a DALI index file (v1.2).

    An ImageNet epoch reads ~1,300 of these (1.28M rows), so the rows are parsed column-wise into
    one array (no object per sample); an index in another member order, or a malformed one, goes
    through :func:`index_rows`, which accepts any order and names the bad line. With ``cache`` (a
    directory), the parsed array is kept there as ``.npy``, named by the index file's path, size,
    mtime, ctime and inode, so a rewritten index is parsed again; loading it is ~10x cheaper
    than parsing (0.6 s of an ImageNet epoch's plan at dp 1).
    """
    cached = _index_cache_file(cache, path) if cache is not None else None
    rows = _load_cached(cached, np.int64, 2)
    if rows is not None and rows.shape[1] == INDEX_COLUMNS:
        return rows
    rows = _parse_index_file(path)
    _store_cached(cached, rows)
    return rows


def _index_cache_file(cache: Path, index: Path, kind: str = "") -> Path | None:
    """The cache file of what was read from ``index`` (any file): named by its path and stat, so a
    rewritten file is read again."""
    try:
        st = index.stat()
    except FileNotFoundError:
        return None  # the reader says what is missing
    name = hashlib.sha256(os.path.abspath(index).encode()).hexdigest()[:24]
    return cache / f"{kind}{name}-{st.st_size}-{st.st_mtime_ns}-{st.st_ctime_ns}-{st.st_ino}.npy"


def _load_cached(cached: Path | None, dtype: type, ndim: int) -> np.ndarray | None:
    if cached is None:
        return None
    try:
        array = np.load(cached, allow_pickle=False)
    except (OSError, ValueError):
        return None  # not there yet (or damaged): read again
    return array if array.dtype == dtype and array.ndim == ndim else None


def _store_cached(cached: Path | None, array: np.ndarray) -> None:
    if cached is None:
        return
    try:
        with atomic_output(cached, durable=False) as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    except (OSError, UserError):
        pass  # a cache: reading again next time is fine


def read_labels(shard: Path, spans: np.ndarray, cache: Path | None = None) -> np.ndarray:
    """int32 label of each of a shard's samples (``spans``: their .cls members' offset and size, index order).

    -1 where the member is not a plain decimal number (signs, spaces, junk, past the shard's end): the
    reader parses those one by one and names the sample when it is bad. Read once per dataset: with
    ``cache`` the labels are kept like the parsed index, named by the shard's path and stat. Reading
    them touches a page per sample, so an epoch must not do it (at ImageNet's size 2.8 s and ~1.28M
    page reads at every epoch's start, measured on the replicated set).
    """
    cached = _index_cache_file(cache, shard, "labels-") if cache is not None else None
    labels = _load_cached(cached, np.int32, 1)
    if labels is not None and len(labels) == len(spans):
        return labels
    with open(shard, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            labels = np.full(len(spans), -1, np.int32)
        else:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                data = np.frombuffer(mapped, np.uint8)
                value = decimal_labels(data, spans)
                del data  # the mapping closes only once no array views it
            labels = np.where((value >= 0) & (value < 2**31), value, -1).astype(np.int32)
    _store_cached(cached, labels)
    return labels


def decimal_labels(data: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """int64 values of the ``.cls`` members at ``spans`` (offset, size) in ``data``, -1 where a member is not
    1..18 decimal digits within ``data``: parsed in arrays, nothing per sample."""
    offset, size = spans[:, 0], spans[:, 1]
    labels = np.full(len(spans), -1, np.int64)
    simple = np.flatnonzero((size >= 1) & (size <= _LABEL_DIGITS) & (offset + size <= len(data)))
    if not len(simple):
        return labels
    offset, size = offset[simple], size[simple]
    width = np.arange(int(size.max()))
    valid = width[None, :] < size[:, None]
    digits = data[np.where(valid, offset[:, None] + width[None, :], offset[:, None])].astype(np.int64) - 48
    digits = np.where(valid, digits, 0)
    decimal = ((digits >= 0) & (digits <= 9)).all(axis=1)
    value = np.zeros(len(simple), np.int64)
    for column in range(len(width)):  # Horner, skipping each row's padding
        value = np.where(valid[:, column], value * 10 + digits[:, column], value)
    labels[simple[decimal]] = value[decimal]
    return labels


def _parse_index_file(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: DALI index file is missing; re-run `python -m preprocess shard`") from None
    tokens = data.split()
    n = (len(tokens) - 2) // _TOKENS_PER_ROW
    if (
        len(tokens) == 2 + n * _TOKENS_PER_ROW
        and data.count(b"\n") == n + 1
        and tokens[1] == str(n).encode()
        and tokens[2::_TOKENS_PER_ROW].count(fmt.IMAGE_EXT.encode()) == n
        and tokens[6::_TOKENS_PER_ROW].count(fmt.LABEL_EXT.encode()) == n
    ):
        rows = np.empty((n, INDEX_COLUMNS), np.int64)
        try:
            for column, token in enumerate((3, 4, 7, 8)):
                values = tokens[token::_TOKENS_PER_ROW]
                if not all(map(bytes.isdigit, values)):
                    raise ValueError
                rows[:, column] = np.fromiter(map(int, values), np.int64, n)
            return rows
        except ValueError:
            pass  # the slow path names the line
    parsed = index_rows(path)
    return np.array([row[1:] for row in parsed], np.int64).reshape(len(parsed), INDEX_COLUMNS)


def index_rows(path: Path) -> list[tuple[str, int, int, int, int]]:
    """(key, jpg offset, jpg size, cls offset, cls size) per sample, any member order; errors name the line.

    Python objects per row: for error messages and odd indexes only, never for a whole epoch.
    """
    rows = []
    try:
        with open(path) as f:
            header = f.readline().split()
            for line_no, line in enumerate(f, start=2):
                parts = line.split()
                members = {}
                for i in range(0, len(parts) - 3, 4):  # groups of: ext offset size name
                    offset, size = parts[i + 1], parts[i + 2]
                    if not (offset.isdigit() and size.isdigit()):
                        raise UserError(
                            f"{path}:{line_no}: index row has a non-numeric offset or size "
                            f"({offset!r}, {size!r}); re-run `python -m preprocess shard`"
                        )
                    members[parts[i]] = (int(offset), int(size), parts[i + 3])
                if fmt.IMAGE_EXT not in members or fmt.LABEL_EXT not in members:
                    raise UserError(
                        f"{path}:{line_no}: sample without both .{fmt.IMAGE_EXT} and .{fmt.LABEL_EXT} "
                        "(or an index without member names); re-run `python -m preprocess shard`"
                    )
                jpg, cls = members[fmt.IMAGE_EXT], members[fmt.LABEL_EXT]
                rows.append((jpg[2].split(".", 1)[0], jpg[0], jpg[1], cls[0], cls[1]))
    except FileNotFoundError:
        raise UserError(f"{path}: DALI index file is missing; re-run `python -m preprocess shard`") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text DALI index file; re-run `python -m preprocess shard`") from None
    if len(header) != 2 or not header[1].isdigit() or int(header[1]) != len(rows):
        raise UserError(f"{path}: index header says {header[1:]} samples, it lists {len(rows)}")
    return rows


@dataclass(frozen=True)
class Plan:
    """Per position in this rank's epoch: where the sample is and how to augment it.

    Fixed-size numpy columns only (61 bytes a sample, 78 MB for ImageNet's 1.28M at dp 1): no
    Python object per sample. The sample's key is looked up in its shard's index when a message
    needs it (:meth:`key`).
    """

    shard: np.ndarray  # int32 index into ``Split.shards``
    jpg: np.ndarray  # int64 [n, 2] offset, size of the .jpg member
    cls: np.ndarray  # int64 [n, 2] offset, size of the .cls member
    x: np.ndarray  # int32 window left
    y: np.ndarray  # int32 window top
    mirror: np.ndarray  # bool
    offset: np.ndarray  # float32 [n, 3] lighting offset
    label: np.ndarray  # int32; -1: not a plain decimal number (SampleReader parses it, or names the sample)
    indexes: tuple[Path, ...]  # the index file of each shard, numbered like ``shard``

    def __len__(self) -> int:
        return len(self.shard)

    def key(self, i: int) -> str:
        """The sample key at plan position ``i`` (for error messages): read from its shard's index."""
        index = self.indexes[int(self.shard[i])]
        offset = int(self.jpg[i, 0])
        for key, jpg_offset, *_ in index_rows(index):
            if jpg_offset == offset:
                return key
        return f"at byte {offset}"


def plan_epoch(
    split: Split,
    norm: Normalization,
    *,
    dp_rank: int,
    dp_size: int,
    seed: int,
    train: bool,
    index_cache: Path | None = None,
) -> Plan:
    """This rank's samples (its contiguous range) in epoch order, with their augmentation drawn.

    Everything random about an epoch is drawn here, from the epoch seed, indexed by position: the
    result does not depend on the implementation's threads or workers, and starting at any batch
    needs nothing but this plan (no sample before it is read or decoded). Each shard's index rows
    are scattered straight to their epoch positions, so the only temporaries are two int64
    position arrays. ``index_cache``: see :func:`read_index`.
    """
    start, end = rank_range(split.total, dp_rank, dp_size)
    n = end - start
    rng = np.random.default_rng(seed)
    if train:
        where = np.empty(n, np.int64)  # where[j]: the epoch position of the rank's j-th sample
        where[rng.permutation(n)] = np.arange(n)  # both temporaries are freed before the columns exist
    else:
        where = np.arange(n)
    shard = np.empty(n, np.int32)
    jpg = np.empty((n, 2), np.int64)
    cls = np.empty((n, 2), np.int64)
    label = np.empty(n, np.int32)
    first = 0
    for s, count in enumerate(split.counts):
        lo, hi = max(start, first), min(end, first + count)
        if lo < hi:  # only the shards overlapping this rank's range are read
            rows = read_index(split.indexes[s], index_cache)
            if len(rows) != count:
                raise UserError(f"{split.indexes[s]}: index lists {len(rows)} samples, the manifest {count}")
            positions = where[lo - start : hi - start]
            shard[positions] = s
            jpg[positions] = rows[lo - first : hi - first, 0:2]
            cls[positions] = rows[lo - first : hi - first, 2:4]
            label[positions] = read_labels(split.shards[s], rows[:, 2:4], index_cache)[lo - first : hi - first]
        first += count
    del where
    if train:
        x = rng.integers(0, norm.max_offset + 1, n).astype(np.int32)
        y = rng.integers(0, norm.max_offset + 1, n).astype(np.int32)
        mirror = rng.random(n) < 0.5
        offset = np.zeros((n, 3), np.float32)
        if norm.lighting_std > 0:
            lighting = norm.lighting.T.astype(np.float64)
            for lo in range(0, n, _OFFSET_CHUNK):  # chunked draws continue one stream: equal to one draw
                hi = min(lo + _OFFSET_CHUNK, n)
                offset[lo:hi] = rng.normal(0.0, norm.lighting_std, (hi - lo, 3)) @ lighting
    else:
        x = np.full(n, norm.center_offset(), np.int32)
        y = x.copy()
        mirror = np.zeros(n, bool)
        offset = np.zeros((n, 3), np.float32)
    return Plan(shard, jpg, cls, x, y, mirror, offset, label, split.indexes)


def batch_bounds(samples: int, steps: int, batch_size: int) -> list[tuple[int, int]]:
    """The plan positions ``[lo, hi)`` of each of the epoch's ``steps`` batches on a rank with ``samples``.

    Full batches, then the rest. DDP needs the same step count on every rank, and a rank may hold
    one sample less than the largest: where full batches would leave a step without samples, the
    last non-empty batch is split over the remaining steps (the first pieces one larger), so a
    batch is empty only when a rank holds fewer samples than there are steps (toy datasets).
    """
    bounds = [(lo, min(lo + batch_size, samples)) for lo in range(0, samples, batch_size)][:steps]
    if bounds and len(bounds) < steps:
        lo, hi = bounds.pop()
        pieces = steps - len(bounds)
        size, extra = divmod(hi - lo, pieces)
        for i in range(pieces):
            step = size + (1 if i < extra else 0)
            bounds.append((lo, lo + step))
            lo += step
    bounds += [(samples, samples)] * (steps - len(bounds))
    return bounds


class SampleReader:
    """Reads a plan's samples from the shards: JPEG bytes and labels, checked, errors naming the sample.

    The shards are memory-mapped, once per process: a sample is a view into its shard at the
    index's offsets, so reading a batch makes no system call per sample, and a JPEG handed to DALI
    is not copied on the way (DALI's own webdataset reader maps the shards too). ``jpeg`` checks the
    JPEG's header (not its pixels), so a stored image of the wrong size is reported before a decoder
    sees it; ``jpegs``, the DALI feed's batch read, leaves that check to the pipeline (its shapes are
    checked per batch, and a batch DALI cannot decode is checked here sample by sample to name the
    culprit). Labels are parsed and range-checked here for both loaders.
    """

    def __init__(self, split: Split, plan: Plan, image_size: int):
        self.paths = [str(p) for p in split.shards]
        self.plan = plan
        self.num_classes = split.num_classes
        self.image_size = image_size
        self._maps: dict[int, mmap.mmap] = {}  # shard -> its mapping, per process
        self._arrays: dict[int, np.ndarray] = {}  # shard -> uint8 view of the mapping

    def __getstate__(self) -> dict[str, Any]:  # worker processes map the shards themselves
        return {**self.__dict__, "_maps": {}, "_arrays": {}}

    def where(self, i: int) -> str:
        return f"{self.paths[int(self.plan.shard[i])]}: sample {self.plan.key(i)}"

    def _shard(self, shard: int) -> np.ndarray:
        data = self._arrays.get(shard)
        if data is None:
            with open(self.paths[shard], "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:  # mmap refuses empty files; every read then runs past the end
                    data = np.empty(0, np.uint8)
                else:
                    self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    data = np.frombuffer(self._maps[shard], np.uint8)
            self._arrays[shard] = data
        return data

    def _truncated(self, shard: int, offset: int, size: int) -> UserError:
        return UserError(f"{self.paths[shard]}: shard ends before byte {offset + size} (truncated)")

    def _member(self, i: int, spans: np.ndarray) -> np.ndarray:
        shard, offset, size = int(self.plan.shard[i]), int(spans[i, 0]), int(spans[i, 1])
        data = self._shard(shard)[offset : offset + size]
        if len(data) != size:
            raise self._truncated(shard, offset, size)
        return data

    def label(self, i: int) -> int:
        raw = self._member(i, self.plan.cls).tobytes()
        try:
            label = fmt.decode_label(raw)
        except (ValueError, UnicodeDecodeError):
            raise FormatError(f"{self.where(i)}: .{fmt.LABEL_EXT} is not a decimal number ({raw[:20]!r})") from None
        if not 0 <= label < self.num_classes:
            raise FormatError(
                f"{self.where(i)}: label {label} is outside the manifest's {self.num_classes} "
                "classes; the shards and the manifest do not belong together"
            )
        return label

    def labels(self, lo: int, hi: int) -> np.ndarray:
        """int64 labels of positions ``[lo, hi)``, checked; an error names the first bad sample.

        The plan's label column (read once per dataset, :func:`read_labels`), sliced: what it could not
        parse in arrays, or what lies outside the classes, goes through :meth:`label`, which parses
        like ``format.decode_label`` and names the sample when it is not a valid label.
        """
        labels = self.plan.label[lo:hi].astype(np.int64)
        for k in np.flatnonzero((labels < 0) | (labels >= self.num_classes)).tolist():
            labels[k] = self.label(lo + k)
        return labels

    def jpeg(self, i: int) -> np.ndarray:
        """The JPEG's bytes (a view into the shard), its header checked: decodable, and the stored size."""
        import simplejpeg

        data = self._member(i, self.plan.jpg)
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as e:
            raise UserError(f"{self.where(i)}: cannot decode its JPEG ({str(e).splitlines()[0]})") from None
        size = self.image_size
        if (height, width) != (size, size):
            raise FormatError(
                f"{self.where(i)}: image is {height}x{width}, the format stores {size}x{size}; "
                "re-run `python -m preprocess shard`"
            )
        return data

    def jpegs(self, lo: int, hi: int) -> list[np.ndarray]:
        """The JPEG bytes of positions ``[lo, hi)`` as views into the shards, unchecked (see the class notes)."""
        p = self.plan
        spans = p.jpg[lo:hi]
        views = [self._shard(s)[o : o + n] for s, (o, n) in zip(p.shard[lo:hi].tolist(), spans.tolist())]
        if sum(map(len, views)) != int(spans[:, 1].sum()):  # a slice past a shard's end comes back short
            for i in range(lo, hi):
                self._member(i, p.jpg)
        return views

    def check(self, lo: int, hi: int) -> None:
        """Raise the named error of the first sample in ``[lo, hi)`` that cannot be read, labelled or decoded."""
        for i in range(lo, hi):
            self.label(i)
            self.jpeg(i)

    def close(self) -> None:
        """Drop the mappings; a view still held elsewhere (a batch DALI has not released) keeps its own alive."""
        self._arrays.clear()
        self._maps.clear()


class MeanWindows:
    """Windows of the mean image as views (no copies): subtracted from the cropped window, not the full image.

    Subtracting the 256x256 mean image before cropping costs a full-image float pass; the crop's
    window of it (of its mirror image for mirrored views, so the slice stays a view) is all that
    is needed, and gives the same numbers within float rounding.
    """

    def __init__(self, norm: Normalization, device: torch.device | None = None, *, channels_last: bool = False):
        import torch

        assert norm.mean_image is not None
        hwc = norm.mean_image
        # Logical CHW; stored like the images it is subtracted from (HWC memory for channels_last).
        mean, mirrored = (torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1) for a in (hwc, hwc[:, ::-1]))
        if not channels_last:
            mean, mirrored = mean.contiguous(), mirrored.contiguous()
        self.crop, self.width = norm.crop, hwc.shape[1]
        self.mean, self.mirrored = mean.to(device), mirrored.to(device)

    def window(self, top: int, left: int, mirror: bool) -> torch.Tensor:
        """[3, crop, crop]: the mean under the (mirrored) window at ``top``, ``left``."""
        c = self.crop
        if mirror:  # the mirrored window of the mean = a window of the mirrored mean
            return self.mirrored[:, top : top + c, self.width - left - c : self.width - left]
        return self.mean[:, top : top + c, left : left + c]

    def ten_views(self, max_offset: int, center: int) -> torch.Tensor:
        """[10, 3, crop, crop]: the mean under the 10 validation views, in ``ten_view_windows`` order."""
        import torch

        return torch.stack(
            [self.window(top, left, mirror) for mirror, top, left in ten_view_windows(max_offset, center)]
        )


def ten_view_windows(max_offset: int, center: int) -> list[tuple[bool, int, int]]:
    """(mirror, top, left) of the paper's 10 views: tl, tr, bl, br, centre, then the same mirrored."""
    m, c = max_offset, center
    return [(mirror, top, left) for mirror in (False, True) for top, left in ((0, 0), (0, m), (m, 0), (m, m), (c, c))]


# --------------------------------------------------------------------------------------------
# Batches: layout, dtype and the equal step count, shared by both implementations


def finish_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    device: torch.device,
    dtype: str,
    channels_last: bool,
    input_channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move to ``device``, cast, and give NCHW logical shape (NHWC storage when ``channels_last``).

    ``images`` arrive [B, 3, H, W] / [B, V, 3, H, W], or with ``input_channels_last`` (DALI wrote
    HWC) [B, H, W, 3] / [B, V, H, W, 3]; ``labels`` int64 on the CPU (checked when read).
    """
    import torch

    images = images.to(device, non_blocking=True)
    if dtype == "bfloat16":
        images = images.to(torch.bfloat16)  # keeps the strides
    if input_channels_last:
        images = images.movedim(-1, -3)  # a view: logical NCHW over NHWC storage, no copy
    elif channels_last:
        images = images.movedim(-3, -1).contiguous().movedim(-1, -3)  # one copy, on the device
    return images, labels.to(device, non_blocking=True)


class Loader:
    """One rank's epoch from batch ``start_batch`` on; iterating again replays it.

    ``len()`` is the number of batches it yields (``steps_in_epoch - start_batch``, equal on all
    dp ranks); ``samples`` is how many real samples this rank has in the whole epoch, ``total``
    the split's size. ``make`` yields the non-empty batches; the rest are empty ones.
    """

    def __init__(
        self,
        make: Callable[[], Iterator[tuple[Any, Any]]],
        *,
        steps_in_epoch: int,
        start_batch: int,
        samples: int,
        total: int,
        empty: Callable[[], tuple[Any, Any]],
    ):
        self._make = make
        self._empty = empty
        self.steps_in_epoch = steps_in_epoch
        self.start_batch = start_batch
        self.samples = samples
        self.total = total

    def __len__(self) -> int:
        return self.steps_in_epoch - self.start_batch

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        given = 0
        for batch in self._make():
            given += 1
            yield batch
        # A rank with fewer samples than steps (only in toy setups) still takes every step.
        for _ in range(len(self) - given):
            yield self._empty()
