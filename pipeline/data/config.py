"""The ``data`` section of a run's config: which dataset, which loader, the augmentation's constants and the checks.

Validated once, when built (``pipeline.config`` builds it from the file and the command line); the threads
or worker processes ``workers = 0`` stands for are resolved by :func:`resolve_workers` where a loader is made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from basics.errors import UserError
from preprocess import format as fmt

LOADERS = ("dali", "torch")
"""``--data.loader`` names; ``pipeline.data.loader.IMPLEMENTATIONS`` maps each to its implementation."""
MEANS = ("image", "channel")
DTYPES = ("float32", "bfloat16")
VERIFY = ("full", "size")


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
        if self.verify not in VERIFY:
            raise UserError(f"--data.verify must be one of {', '.join(VERIFY)} (got {self.verify!r})")
        if self.workers < 0:
            raise UserError(f"--data.workers must be >= 0 (got {self.workers})")


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
