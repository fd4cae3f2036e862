"""The ``[checkpoint]`` section of a run's config (``--checkpoint.*``), each range beside its field; imports
nothing of the project but ``pipeline.options``, so ``pipeline.config`` can gather it without a cycle."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.options import FloatOrAuto, Section, at_least, finite, option, or_auto


@dataclass
class CheckpointConfig(Section):
    every_epochs: int = option(1, at_least(1))
    """save at the end of every this many epochs (and whenever validation finds a new best)"""
    every_minutes: FloatOrAuto = option(30.0, or_auto(finite(0, note=" (0 = never by time)")))
    """also save every this many minutes; 0 = never by time; auto = Young/Daly's interval sqrt(2 x save stall x
    MTBF) from this run's measured save stalls (the first save at 30 minutes) and --checkpoint.mtbf-hours"""
    mtbf_hours: float = option(0.0, finite(0, note=" (0 = from this run's goodput ledger)"))
    """with --checkpoint.every-minutes auto: the job's mean time between failures in hours; 0 = this run's
    own: its wall-clock over its failed attempts in RUN_DIR/goodput/ledger.jsonl (24 h before any failure)"""
    every_steps: int = option(0, at_least(0, " (0 = never by step count)"))
    """also save every this many optimizer steps; 0 = never by step count"""
    keep_last: int = option(3, at_least(1))
    """keep this many newest checkpoints of the current lineage (plus best and the one latest names)"""
    keep_best: bool = True
    """keep the checkpoint with the best validation top-1 error"""
    async_save: bool = False
    """write checkpoints in the background (training blocks only for the copy to host memory); worth it
    when epochs are short (many GPUs), see docs/BENCHMARKS.md"""
    allow_world_writable: bool = False
    """resume even from a checkpoint directory anyone may write to (its files could be swapped)"""
