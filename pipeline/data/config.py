"""The ``data`` section of a run's config: which dataset, which loader, the augmentation's constants and the checks.

Validated once, when built (``pipeline.config`` builds it from the file and the command line); the threads
or worker processes ``workers = 0`` stands for are resolved by :func:`resolve_workers` where a loader is made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.options import Check, Section, at_least, finite, one_of, option
from preprocess import format as fmt

LOADERS = ("dali", "torch")
"""``--data.loader`` names; ``pipeline.data.loader.IMPLEMENTATIONS`` maps each to its implementation."""
MEANS = ("image", "channel")
DTYPES = ("float32", "bfloat16")
VERIFY = ("full", "size")


@dataclass
class DataConfig(Section):
    data: str = "demo/shards"
    """preprocessed dataset directory (manifest.json + shards), from `python -m preprocess shard`"""
    loader: str = option("dali", one_of(*LOADERS))
    """input pipeline: dali (GPU decode on CUDA, CPU threads otherwise) or torch (DataLoader fallback)"""
    crop: int = option(227, Check(lambda x: 1 <= x <= fmt.IMAGE_SIZE, f"in 1..{fmt.IMAGE_SIZE}"))
    """side of the square training/validation crop taken from the 256x256 stored images"""
    mean: str = option("image", one_of(*MEANS))
    """mean subtraction: image (the paper: the 256x256 train mean image, 0..255 scale) or channel (mean/std)"""
    lighting_std: float = option(0.1, finite(0))
    """std of the PCA lighting coefficients alpha (the paper: 0.1; 0 = off)"""
    verify: str = option("full", one_of(*VERIFY))
    """shard check before reading: full (sha256 against the manifest, remembered per dataset until changed) or size"""
    workers: int = option(0, at_least(0))
    """CPU threads (dali) or worker processes (torch) per rank; 0 = this process's CPUs / local ranks"""
    dtype: str = option("float32", one_of(*DTYPES))
    """image dtype handed to the model: float32 or bfloat16"""
    channels_last: bool = False
    """hand images over in NHWC memory (torch.channels_last) instead of NCHW"""


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
