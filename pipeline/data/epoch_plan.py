"""An epoch's plan: which sample each position of a rank's epoch is and how it is augmented, drawn up front.

Everything here is a pure function of its arguments: every dp rank (and both ranks of a tensor-parallel
pair) evaluates it identically, which is what makes the split exactly-once and the pair's batches
identical. A training epoch is laid out in lanes (:class:`LaneOrder`), one per slot of the global batch,
so its global batches, and every sample's augmentation, are the same on any number of dp ranks: a run
resumes mid-epoch on another dp size at the next step. The seeds, the shard order, the lanes and the step
count come first; then the :class:`Plan` and how it is cut into the epoch's batches.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from basics.errors import UserError
from pipeline.data.dataset import Normalization, Split
from pipeline.data.index_cache import index_rows, read_index, read_labels

SAMPLE_ORDER = "lanes"
"""The name of this module's epoch order, kept in a checkpoint's progress: a mid-epoch checkpoint whose order
is another one (or none: written before the order was dp-independent) cannot go on in this one."""
_OFFSET_CHUNK = 1 << 14  # plan rows per lighting draw: bounds the float64 temporaries, same stream


def derive_seed(*parts: int | str) -> int:
    """A 31-bit seed from its parts (stable across processes and Python versions, unlike hash())."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Training's shard order for an epoch: from (seed, epoch) only, so all dp ranks agree on it."""
    return np.random.default_rng(derive_seed("shard-order", seed, epoch)).permutation(num_shards).tolist()


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of an epoch's plan (order, windows, flips, lighting): the same on every rank, whatever the dp size."""
    return derive_seed("augment", seed, epoch)


def rank_range(total: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """The contiguous sample range DALI's readers give shard ``dp_rank`` of ``dp_size``."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    return total * dp_rank // dp_size, total * (dp_rank + 1) // dp_size


def steps_per_epoch(total: int, dp_size: int, batch_size: int) -> int:
    """Steps every rank takes: enough for the largest rank's samples (ranks differ by at most one).

    Equal to ``ceil(total / (dp_size * batch_size))``: for a training epoch, one step per row of lanes.
    """
    return math.ceil(math.ceil(total / dp_size) / batch_size)


def lanes_per_rank(lanes: int, dp_size: int) -> int:
    """How many of the epoch's lanes one of ``dp_size`` ranks takes; the dp size must divide the lanes."""
    if dp_size < 1 or lanes % dp_size:
        raise UserError(
            f"the data-parallel size {dp_size} does not divide the epoch's {lanes} lanes (the global batch): "
            "use a dp size that divides --batch-size"
        )
    return lanes // dp_size


@dataclass(frozen=True)
class LaneOrder:
    """A rank's part of an epoch laid out in lanes: which samples it holds and where each goes.

    The epoch's samples (in shard order) are cut into ``lanes`` contiguous runs; lane ``j`` yields
    one sample per step, so step ``b``'s global batch is lane 0's ``b``-th sample, lane 1's, ... A
    rank of ``dp_size`` takes a contiguous block of ``lanes / dp_size`` lanes: its slice of every
    global batch is a contiguous slice of it, and its samples a contiguous run of the shards. The
    order within a lane and each sample's augmentation come from ``(seed, lane)``, indexed by the
    sample's row: from its global position ``row * lanes + lane``, never from the rank. Training
    runs ``lanes`` = the global batch, so the batches are the same on any dp size that divides it.
    """

    start: int  # the rank's samples are [start, end) of the epoch's shard order
    end: int
    where: np.ndarray  # int64 [end - start]: the rank's epoch position of sample start + j
    per_batch: int  # lanes per rank: the positions of step b are [b * per_batch, (b + 1) * per_batch)
    draws: list[tuple[np.ndarray, np.random.Generator]]  # per lane: its positions by row, its generator

    @classmethod
    def build(cls, total: int, lanes: int, dp_rank: int, dp_size: int, seed: int, shuffle: bool) -> LaneOrder:
        k = lanes_per_rank(lanes, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        bounds = [total * j // lanes for j in range(lanes + 1)]
        first = dp_rank * k
        start, end = bounds[first], bounds[first + k]
        rows = -(-total // lanes)  # every lane holds rows or rows - 1 samples: only the last row may be short
        sizes = [bounds[first + c + 1] - bounds[first + c] for c in range(k)]
        where = np.empty(end - start, np.int64)
        draws = []
        last_row = 0  # the rank's lanes that reach the last row fill it in lane order
        for c, size in enumerate(sizes):
            positions = np.arange(size, dtype=np.int64) * k + c
            if size == rows and size:
                positions[-1] = (rows - 1) * k + last_row
                last_row += 1
            rng = np.random.default_rng(derive_seed("lane", seed, first + c)) if shuffle else None
            samples = rng.permutation(size) if rng is not None else np.arange(size)
            where[bounds[first + c] - start + samples] = positions
            if rng is not None:
                draws.append((positions, rng))
        return cls(start, end, where, k, draws)


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
        return self.keys(i, i + 1)[0]

    def keys(self, lo: int, hi: int) -> list[str]:
        """The sample keys at positions ``[lo, hi)`` (messages, the consumed-samples ledger); each shard's
        index is parsed once while it is unchanged."""
        shards, offsets = self.shard[lo:hi].tolist(), self.jpg[lo:hi, 0].tolist()
        found = {s: _keys_by_offset(self.indexes[s], _stamp(self.indexes[s])) for s in set(shards)}
        return [found[s].get(o, f"at byte {o}") for s, o in zip(shards, offsets)]


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return 0, 0  # reading it raises the one-line error
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=64)
def _keys_by_offset(index: Path, stamp: tuple[int, int]) -> dict[int, str]:
    """jpg offset -> sample key of one shard's index (``stamp``: the file's mtime and size, so a rewrite is read)."""
    return {jpg_offset: key for key, jpg_offset, *_ in index_rows(index)}


def plan_epoch(
    split: Split,
    norm: Normalization,
    *,
    dp_rank: int,
    dp_size: int,
    seed: int,
    train: bool,
    lanes: int | None = None,
    index_cache: Path | None = None,
) -> Plan:
    """This rank's samples (its lanes' contiguous run of the shards) in epoch order, with their augmentation.

    ``lanes``: training's global batch (default ``dp_size``: one lane per rank, the rank's range in
    order, which is what validation reads). Everything random about an epoch is drawn here, per lane
    from ``(seed, lane)``, indexed by row: the result does not depend on the dp size, the
    implementation's threads or workers, and starting at any batch needs nothing but this plan (no
    sample before it is read or decoded). Each shard's index rows are scattered straight to their
    epoch positions, so the only temporaries are int64 position arrays. ``index_cache``: see
    :func:`read_index`.
    """
    order = LaneOrder.build(split.total, lanes or dp_size, dp_rank, dp_size, seed, shuffle=train)
    start, end, where = order.start, order.end, order.where
    n = end - start
    shard = np.empty(n, np.int32)
    jpg = np.empty((n, 2), np.int64)
    cls = np.empty((n, 2), np.int64)
    label = np.empty(n, np.int32)
    first = 0
    for s, count in enumerate(split.counts):
        lo, hi = max(start, first), min(end, first + count)
        if lo < hi:  # only the shards overlapping this rank's lanes are read
            rows = read_index(split.indexes[s], index_cache)
            if len(rows) != count:
                raise UserError(f"{split.indexes[s]}: index lists {len(rows)} samples, the manifest {count}")
            positions = where[lo - start : hi - start]
            shard[positions] = s
            jpg[positions] = rows[lo - first : hi - first, 0:2]
            cls[positions] = rows[lo - first : hi - first, 2:4]
            label[positions] = read_labels(split.shards[s], rows[:, 2:4], index_cache)[lo - first : hi - first]
        first += count
    x = np.full(n, norm.center_offset(), np.int32)
    y = x.copy()
    mirror = np.zeros(n, bool)
    offset = np.zeros((n, 3), np.float32)
    if train:  # each lane's generator goes on from its order: windows, mirrors, lighting, by row
        for positions, rng in order.draws:
            x[positions] = rng.integers(0, norm.max_offset + 1, len(positions))
            y[positions] = rng.integers(0, norm.max_offset + 1, len(positions))
            mirror[positions] = rng.random(len(positions)) < 0.5
            offset[positions] = lighting(rng, len(positions), norm)
    return Plan(shard, jpg, cls, x, y, mirror, offset, label, split.indexes)


def lighting(rng: np.random.Generator, n: int, norm: Normalization) -> np.ndarray:
    """float32 [n, 3]: the PCA lighting offsets of ``n`` samples, drawn in chunks that continue one stream."""
    offset = np.zeros((n, 3), np.float32)
    if norm.lighting_std > 0:
        eig = norm.lighting.T.astype(np.float64)
        for lo in range(0, n, _OFFSET_CHUNK):  # bounds the float64 temporaries: equal to one draw
            hi = min(lo + _OFFSET_CHUNK, n)
            offset[lo:hi] = rng.normal(0.0, norm.lighting_std, (hi - lo, 3)) @ eig
    return offset


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


def lane_batches(samples: int, steps: int, per_batch: int) -> list[tuple[int, int]]:
    """The plan positions ``[lo, hi)`` of a training epoch's ``steps`` batches: ``per_batch`` each (the rank's
    lanes), the last one short or empty where the rank's lanes do not reach the epoch's last row."""
    return [(min(b * per_batch, samples), min((b + 1) * per_batch, samples)) for b in range(steps)]
