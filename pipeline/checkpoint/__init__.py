"""The training state and its checkpoints: atomic, verified, lineage-safe, reshardable over (dp, tp).

    state.py         what a checkpoint holds (TrainState: towers, momentum, RNG, progress, schedule, config)
    catalogue.py     the run's checkpoints: names, meta.json, health, lineage, ``latest``/``best``, resolution
    integrity.py     verification (sha256, sizes), permissions, reading tensors without unpickling, export
    checkpointer.py  when to save, the collective save (async or not), health, retention, restore
    writer.py        DCP's file writer, marking the save's phases for the watchdog
    config.py        CheckpointConfig, the ``--checkpoint.*`` options
    errors.py        the one-line errors

This file only re-exports: ``from pipeline.checkpoint import Checkpointer`` is the way in.
"""

from pipeline.checkpoint.catalogue import (
    BEST,
    DIVERGED,
    FORMAT_VERSION,
    GOOD,
    LATEST,
    LINEAGE,
    META,
    UNVERIFIED,
    candidates,
    health,
    latest,
    newest_good,
    pointed_to,
    read_meta,
    readable,
    recorded_lineage,
    resolve,
    step_name,
)
from pipeline.checkpoint.checkpointer import Checkpointer
from pipeline.checkpoint.config import CheckpointConfig
from pipeline.checkpoint.errors import CheckpointError, NonFiniteState
from pipeline.checkpoint.integrity import check_permissions, export_model, read_tensors, read_towers, verify
from pipeline.checkpoint.state import DatasetIdentity, Layout, Progress, TrainState, rng_tensors, set_rng_tensors
from pipeline.checkpoint.writer import MarkPhase

__all__ = [
    "BEST",
    "DIVERGED",
    "FORMAT_VERSION",
    "GOOD",
    "LATEST",
    "LINEAGE",
    "META",
    "UNVERIFIED",
    "CheckpointConfig",
    "CheckpointError",
    "Checkpointer",
    "DatasetIdentity",
    "Layout",
    "MarkPhase",
    "NonFiniteState",
    "Progress",
    "TrainState",
    "candidates",
    "check_permissions",
    "export_model",
    "health",
    "latest",
    "newest_good",
    "pointed_to",
    "read_meta",
    "read_tensors",
    "read_towers",
    "readable",
    "recorded_lineage",
    "resolve",
    "rng_tensors",
    "set_rng_tensors",
    "step_name",
    "verify",
]
