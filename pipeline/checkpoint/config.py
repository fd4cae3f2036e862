"""The ``[checkpoint]`` section of a run's config (``--checkpoint.*``); imports nothing of the project, so
``pipeline.config`` can gather it without a cycle."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    """save at the end of every this many epochs (and whenever validation finds a new best)"""
    every_minutes: float = 30.0
    """also save every this many minutes; 0 = never by time"""
    every_steps: int = 0
    """also save every this many optimizer steps; 0 = never by step count"""
    keep_last: int = 3
    """keep this many newest checkpoints of the current lineage (plus best and the one latest names)"""
    keep_best: bool = True
    """keep the checkpoint with the best validation top-1 error"""
    async_save: bool = False
    """write checkpoints in the background (training blocks only for the copy to host memory); worth it
    when epochs are short (many GPUs), see docs/BENCHMARKS.md"""
    allow_world_writable: bool = False
    """resume even from a checkpoint directory anyone may write to (its files could be swapped)"""
