"""The run directory's layout, named once: every module that reads or writes a run's files asks :class:`RunDir`.

::

    RUN_DIR/
      config.json              the resolved config of the newest start (pipeline.config.save_config)
      writer.lease             one writer per run directory (pipeline.faults.lease)
      checkpoints/             step-NNNNNNNN/, latest, best, lineage (pipeline.checkpoint)
      tensorboard/             event files (pipeline.metrics)
      progress/rank-N.json     each rank's last phase mark, for the watchdog (pipeline.faults.watchdog)
      samples/rank-N.jsonl     each step's sample keys, --train.record-samples (pipeline.data.sample_ledger)
      hangs/<time>/            stacks and hang.json of a hang (pipeline.faults.watchdog)
      crashes.jsonl            each attempt's start and each rank's crash (pipeline.faults.crashes)
      bad_batches.jsonl        batches that diverged again when re-run, skipped (pipeline.faults.divergence)
      profiles/<time>/         traces on demand (pipeline.profiling)
      memory/                  CUDA out-of-memory snapshots (pipeline.perf)
      goodput/ledger.jsonl     every attempt's time: kept steps and badput by cause (pipeline.goodput)
      compile-cache/           torch.compile's caches, kept across restarts (launch.train)
      analysis/ figures/ report/   the tools' output (pipeline.tools)
      eval-<checkpoint>.json   evaluation results (pipeline.tools.evaluate)
      <name>.request.<...>     an operator's request to the running job (lr_drop, profile, preempt)
    RUN_DIR/../.alexnet-nodes.jsonl   the node ledger beside the run directories (pipeline.faults.nodes)

The layout is a file format: a run directory written by an earlier version must still read, so a name
here changes only with a migration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.json"
LEASE = "writer.lease"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
PROGRESS = "progress"
SAMPLES = "samples"
HANGS = "hangs"
PROFILES = "profiles"
MEMORY = "memory"
ANALYSIS = "analysis"
FIGURES = "figures"
REPORT = "report"
GOODPUT = "goodput"
GOODPUT_LEDGER = "ledger.jsonl"
COMPILE_CACHE = "compile-cache"
CRASHES = "crashes.jsonl"
BAD_BATCHES = "bad_batches.jsonl"
NODE_LEDGER = ".alexnet-nodes.jsonl"  # beside the run directories: later jobs read it

# operator requests (pipeline.schedule.write_request): the request's name, a time and a pid follow
LR_DROP_REQUEST = "lr_drop.request"
PROFILE_REQUEST = "profile.request"
PREEMPT_REQUEST = "preempt.request"


@dataclass(frozen=True)
class RunDir:
    """One run directory's paths (nothing is created here: the owner of each file creates it)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def lease(self) -> Path:
        return self.root / LEASE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def progress(self) -> Path:
        return self.root / PROGRESS

    @property
    def samples(self) -> Path:
        """The consumed-samples ledger (``pipeline.data.sample_ledger``), written with --train.record-samples."""
        return self.root / SAMPLES

    def samples_of(self, rank: int) -> Path:
        return self.samples / f"rank-{rank}.jsonl"

    @property
    def hangs(self) -> Path:
        return self.root / HANGS

    @property
    def profiles(self) -> Path:
        return self.root / PROFILES

    @property
    def memory(self) -> Path:
        return self.root / MEMORY

    @property
    def analysis(self) -> Path:
        return self.root / ANALYSIS

    @property
    def figures(self) -> Path:
        return self.root / FIGURES

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def goodput(self) -> Path:
        return self.root / GOODPUT

    @property
    def goodput_ledger(self) -> Path:
        """Every attempt's records, appended (pipeline.goodput)."""
        return self.goodput / GOODPUT_LEDGER

    @property
    def compile_cache(self) -> Path:
        """torch.compile's caches (TORCHINDUCTOR_CACHE_DIR): a restart or requeue does not compile again."""
        return self.root / COMPILE_CACHE

    @property
    def crashes(self) -> Path:
        """Each attempt's start and each rank's crash, appended (pipeline.faults.crashes)."""
        return self.root / CRASHES

    @property
    def bad_batches(self) -> Path:
        """The sample keys of batches that diverged again when re-run in place, appended; skipped by every rank."""
        return self.root / BAD_BATCHES

    @property
    def node_ledger(self) -> Path:
        """The ledger of nodes that failed, beside the run directories (``$ALEXNET_NODE_LEDGER`` overrides it:
        pipeline.faults.nodes)."""
        return self.root.resolve().parent / NODE_LEDGER

    @property
    def preempt_request(self) -> Path:
        """An operator's stop (slurm/train.sh's signal trap writes it): checkpoint at the next control step."""
        return self.root / PREEMPT_REQUEST

    def eval_result(self, checkpoint: str, *, ten_crop: bool = True) -> Path:
        """Where ``pipeline.tools.evaluate`` writes a checkpoint's result (``eval-step-N.json`` / ``-centre``)."""
        return self.root / f"eval-{checkpoint}{'' if ten_crop else '-centre'}.json"

    @property
    def eval_ensemble(self) -> Path:
        """Where ``pipeline.tools.evaluate`` writes an ensemble's result (in its first member's run)."""
        return self.root / "eval-ensemble.json"

    def eval_results(self) -> list[Path]:
        """Every evaluation result written here (checkpoints and ensembles), by name."""
        return sorted(self.root.glob("eval-*.json"))

    def neighbours_figure(self, checkpoint: str) -> Path:
        """Figure 4 of a checkpoint (``pipeline.tools.analysis neighbours``; the report shows it)."""
        return self.figures / f"neighbours-{checkpoint}.png"

    def is_run(self) -> bool:
        """Has a training run started here (its config was written)?"""
        return self.config.is_file()
