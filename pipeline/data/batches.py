"""What an implementation is asked for and what it hands back: the epoch request, the batch's layout and
dtype, and the :class:`Loader` that gives every dp rank the same step count.

``pipeline.data.loader`` hands an implementation (``dali_pipeline``, ``torch_loader``) one
:class:`EpochRequest`; the implementations import only the package's named modules (this one, the
dataset, the plan, the sample reader, the views), so neither knows about the other or about the
user-facing config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.data.dataset import Normalization, Split
from pipeline.data.epoch_plan import Plan

if TYPE_CHECKING:
    import torch


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


Implementation = Callable[[EpochRequest], Callable[[], Iterator[tuple["torch.Tensor", "torch.Tensor"]]]]
"""An implementation's ``batches``: given the request, a function that runs the epoch and yields (images, labels)
batches, then stops (``pipeline.data.loader.IMPLEMENTATIONS`` names them)."""


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
        keys: Callable[[int], list[str]] | None = None,
    ):
        self._make = make
        self._keys = keys
        self._empty = empty
        self.steps_in_epoch = steps_in_epoch
        self.start_batch = start_batch
        self.samples = samples
        self.total = total

    def __len__(self) -> int:
        return self.steps_in_epoch - self.start_batch

    def batch_keys(self, i: int) -> list[str]:
        """The sample keys of the epoch's batch ``i`` on this rank (a bad batch is recorded by them)."""
        return self._keys(i) if self._keys is not None else []

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        given = 0
        for batch in self._make():
            given += 1
            yield batch
        # A rank with fewer samples than steps (only in toy setups) still takes every step.
        for _ in range(len(self) - given):
            yield self._empty()
