"""The loaders the training loop and the evaluator call: one epoch of a split, on a device, for one dp rank.

:func:`train_loader` and :func:`val_loader` prepare the epoch (``planner``), hand the implementation that
``--data.loader`` names (:data:`IMPLEMENTATIONS`) one :class:`~pipeline.data.batches.EpochRequest`, and
wrap what it yields in a :class:`~pipeline.data.batches.Loader`. The contract is in ``pipeline/data/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.data.batches import EpochRequest, Implementation, Loader
from pipeline.data.config import DataConfig, resolve_workers
from pipeline.data.dali_pipeline import batches as dali_batches
from pipeline.data.dataset import open_dataset
from pipeline.data.planner import Ahead, EpochInputs, PreparedEpoch, prepare_epoch
from pipeline.data.torch_loader import batches as torch_batches
from pipeline.data.views import TEN_CROP_VIEWS

if TYPE_CHECKING:
    import torch

IMPLEMENTATIONS: dict[str, Implementation] = {"dali": dali_batches, "torch": torch_batches}
"""``--data.loader`` name (``config.LOADERS``) -> its ``batches``. Both modules import DALI and torch only when an
epoch runs, so naming them here costs nothing where DALI is missing."""


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
    inputs = EpochInputs(cfg, dp_rank, dp_size, seed, batch_size, num_classes, verify_cache)
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
    prepared = prepare_epoch(
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


def _loader(
    cfg: DataConfig,
    prepared: PreparedEpoch,
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
    batches = IMPLEMENTATIONS[cfg.loader](request)
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
        keys=lambda i: _batch_keys(prepared, i),
    )


def _batch_keys(prepared: PreparedEpoch, i: int) -> list[str]:
    k = i - prepared.start_batch
    if not 0 <= k < len(prepared.bounds):
        return []  # an empty batch (a rank with fewer samples than steps)
    lo, hi = prepared.bounds[k]
    return [prepared.plan.key(j) for j in range(lo, hi)]


def _calling_after_first(batches: Callable[[], Iterator[Any]], then: Callable[[], None]) -> Callable[[], Iterator[Any]]:
    def make() -> Iterator[Any]:
        for i, batch in enumerate(batches()):
            yield batch
            if i == 0:
                then()

    return make
