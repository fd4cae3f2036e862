"""An epoch prepared before its first batch, in the foreground or ahead of time in a background thread.

Preparing an epoch is reading the split's index files and labels, drawing the rank's plan and, with
``--data.verify full``, hashing the shards the rank will read; at ImageNet's size that takes seconds.
:func:`prepare_epoch` does it in the caller's thread; :class:`Ahead` (the background epoch planner) does
the next epoch's while this one trains, so no epoch start waits for a plan or for hashing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from basics.errors import UserError
from pipeline.data.config import DataConfig, resolve_workers
from pipeline.data.dataset import Normalization, Split, open_dataset
from pipeline.data.epoch_plan import (
    Plan,
    batch_bounds,
    epoch_seed,
    lane_batches,
    plan_epoch,
    shard_order,
    steps_per_epoch,
)
from pipeline.data.index_cache import INDEX_CACHE
from pipeline.data.integrity import Verified, dataset_cache, verify_shards


@dataclass(frozen=True)
class PreparedEpoch:
    """An epoch before any batch: the checked split, the plan, its batches, the shards verified for it."""

    split: Split
    norm: Normalization
    plan: Plan
    train: bool
    batch_size: int
    bounds: list[tuple[int, int]]  # the non-empty batches to yield
    epoch_bounds: list[tuple[int, int]]  # every step's batch from the epoch's start (empty ones too)
    steps: int
    start_batch: int
    cache: Path | None  # where the verified shards are recorded (None: --data.verify size)
    verified: Verified | None


@dataclass(frozen=True)
class EpochInputs:
    """What a training epoch's preparation depends on besides the epoch (the key ``Ahead`` matches)."""

    cfg: DataConfig
    dp_rank: int
    dp_size: int
    seed: int
    batch_size: int
    num_classes: int | None
    verify_cache: Path | None

    def prepare(self, epoch: int, start_batch: int, cancel: threading.Event | None = None) -> PreparedEpoch:
        split, norm = open_dataset(self.cfg, "train", num_classes=self.num_classes)
        return prepare_epoch(
            self.cfg,
            split.reordered(shard_order(len(split.shards), self.seed, epoch)),
            norm,
            train=True,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            seed=epoch_seed(self.seed, epoch),
            batch_size=self.batch_size,
            start_batch=start_batch,
            verify_cache=self.verify_cache,
            cancel=cancel,
        )


def prepare_epoch(
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
) -> PreparedEpoch:
    """``split``'s epoch for this rank from ``start_batch`` on: the plan, its non-empty batches and, with
    ``--data.verify full``, the shards it reads verified (``cancel`` stops the hashing: an epoch prepared ahead
    that is not needed)."""
    if batch_size < 1:
        raise UserError(f"batch size per data-parallel rank must be at least 1 (got {batch_size})")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    steps = steps_per_epoch(split.total, dp_size, batch_size)
    if not 0 <= start_batch <= steps:
        raise UserError(
            f"cannot start the epoch at batch {start_batch}: it has {steps} steps of {batch_size} "
            "per rank (was the batch size changed since the checkpoint?)"
        )
    try:
        indexes: Path | None = dataset_cache(split.root) / INDEX_CACHE
        indexes.mkdir(exist_ok=True)
    except (UserError, OSError):
        indexes = None  # nowhere writable: parse the index files every epoch
    # Training: one lane per slot of the global batch, so the global batches do not depend on dp_size.
    lanes = dp_size * batch_size if train else dp_size
    plan = plan_epoch(
        split, norm, dp_rank=dp_rank, dp_size=dp_size, seed=seed, train=train, lanes=lanes, index_cache=indexes
    )
    cut = lane_batches if train else batch_bounds
    epoch_bounds = cut(len(plan), steps, batch_size)
    bounds = [(lo, hi) for lo, hi in epoch_bounds[start_batch:] if hi > lo]
    cache, verified = None, None
    if cfg.verify == "full" and bounds:
        cache = Path(verify_cache) if verify_cache is not None else dataset_cache(split.root)
        read = np.unique(plan.shard[bounds[0][0] :]).tolist()  # the shards this rank reads from here on
        verified = verify_shards(split, read, cache=cache, threads=resolve_workers(cfg.workers), cancel=cancel)
    return PreparedEpoch(
        split, norm, plan, train, batch_size, bounds, epoch_bounds, steps, start_batch, cache, verified
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

    def take(self, key: object, prepare: Callable[[], PreparedEpoch]) -> PreparedEpoch:
        thread, matches, result = self._thread, self._key == key, self._result
        self._thread, self._key, self._result = None, None, []
        if thread is not None and matches:
            thread.join()
            if result and isinstance(result[0], PreparedEpoch):
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

    def start(self, key: object, prepare: Callable[[], PreparedEpoch]) -> None:
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
        """Stop preparing (the run is over) and wait for the thread: hashing stops at its next shard, a plan
        being built is finished and dropped. Not left running: a daemon thread still inside native code when
        the interpreter exits is ended by ``pthread_exit``, whose unwinding through a C++ frame aborts the
        process ("terminate called without an active exception", SIGABRT) after the run has finished."""
        thread = self._thread
        self._thread, self._key, self._result = None, None, []
        if thread is not None:
            self._stop(thread)

    def _stop(self, thread: threading.Thread) -> None:
        self.cancelled.set()
        thread.join()
        self.cancelled.clear()
