"""The input pipeline: AlexNet's augmentation from the preprocessed WebDataset shards.

Interface (all the training loop and the evaluator need)::

    loader = train_loader(cfg, dp_rank=r, dp_size=n, epoch=e, seed=run_seed, device=device,
                          batch_size=per_rank_batch, num_classes=classes,
                          start_batch=k, ahead=ahead)      # ahead = Ahead(): next epoch prepared meanwhile
    loader.steps_in_epoch                # the epoch's steps: the same on every dp rank and dp size
    loader.batch_keys(step)              # the sample keys of this rank's batch at that step
    len(loader)                          # the batches it yields: steps_in_epoch - start_batch
    for images, labels in loader: ...    # images [B, 3, crop, crop] on ``device``, labels int64
    val_loader(cfg, dp_rank=r, dp_size=n, device=device, batch_size=b, ten_crop=True)  # [B, 10, 3, crop, crop]

Contract: every sample is seen exactly once per epoch across the dp ranks (nothing dropped or
padded; ranks take equal step counts); order and augmentation derive from ``(seed, epoch)`` and the
global batch only, never from the dp rank or size: the epoch's global batches (samples, crops,
flips, lighting) are the same on any dp size that divides the global batch, so a run resumes
mid-epoch on another dp size at the next step; both ranks of a tensor-parallel pair get identical
batches, an epoch is reproducible, and it can resume at any batch without reading the batches
before it; each rank reads a contiguous run of the shards; the shards
read are checked against the manifest's sha256; errors the user can fix are one-line
``UserError``s naming the file and sample. The implementation is picked by ``DataConfig.loader``
from :data:`IMPLEMENTATIONS` (DALI, or a PyTorch DataLoader where DALI is missing). Design and
measurements: ``docs/data-pipeline.md``, ``docs/BENCHMARKS.md``.

The package's modules, in the order an epoch meets them (this file only re-exports)::

    config         DataConfig (the run's ``data`` section), resolve_workers
    dataset        the split on disk, checked against the manifest, and its normalisation constants
    integrity      the shards' sha256, verified once per dataset until a shard changes
    index_cache    the DALI index files and labels, parsed in arrays, cached per dataset
    epoch_plan     seeds, shard order, lanes, step counts; the Plan; its batches
    planner        an epoch prepared before its first batch; Ahead, the background epoch planner
    loader         train_loader, val_loader, IMPLEMENTATIONS
    batches        EpochRequest (what an implementation is asked for), finish_batch, Loader
    sample_reader  a plan's JPEG bytes and labels from the memory-mapped shards
    views          the 10 validation views; the mean image under a window
    dali_pipeline  the DALI implementation
    sample_ledger  RUN_DIR/samples/: each step's sample keys per rank (--train.record-samples)
    torch_loader   the PyTorch DataLoader implementation
"""

from pipeline.data.batches import Loader
from pipeline.data.config import DataConfig, resolve_workers
from pipeline.data.dataset import open_dataset
from pipeline.data.loader import IMPLEMENTATIONS, train_loader, val_loader
from pipeline.data.planner import Ahead

__all__ = [
    "Ahead",
    "DataConfig",
    "IMPLEMENTATIONS",
    "Loader",
    "open_dataset",
    "resolve_workers",
    "train_loader",
    "val_loader",
]
