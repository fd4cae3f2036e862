"""An epoch's plan: which sample each position of a rank's epoch is and how it is augmented, drawn up front.

Everything here is a pure function of its arguments: every dp rank (and both ranks of a tensor-parallel
pair) evaluates it identically, which is what makes the split exactly-once and the pair's batches
identical. The seeds, the shard order, the rank's range and the step count come first; then the
:class:`Plan` and how it is cut into the epoch's batches.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from basics.errors import UserError
from pipeline.data.dataset import Normalization, Split
from pipeline.data.index_cache import index_rows, read_index, read_labels

_OFFSET_CHUNK = 1 << 14  # plan rows per lighting draw: bounds the float64 temporaries, same stream


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
