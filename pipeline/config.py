"""One config tree for a run: defaults are the paper's recipe; a file and the command line override.

Every field of every section is a command-line option (``--optim.lr 0.02``); the most used have
short aliases (``--lr``, ``--batch-size``, ``--tp`` ...). The docstring under a field is its
``--help`` text. Precedence: defaults < ``--config FILE`` (TOML or JSON, sections as tables) <
command line. The resolved config is written to ``RUN_DIR/config.json`` at start and into every
checkpoint's meta.json.

Batch size is *global* (the paper's 128 images per step, split over two GPUs); each data-parallel
rank gets ``batch_size / dp_size`` and both tensor-parallel ranks of a pair see the same batch.
If you change it, the usual linear rule (Goyal et al., 2017) keeps training comparable:
``lr = 0.01 * batch_size / 128``, with a few epochs of warm-up (``--schedule.warmup-epochs``)
for large batches. Nothing scales the rate automatically.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basics.errors import UserError
from pipeline.checkpoint.config import CheckpointConfig
from pipeline.data import DataConfig
from pipeline.faults.config import FaultsConfig
from pipeline.model import ModelConfig
from pipeline.options import (
    Check,
    Rule,
    Section,
    at_least,
    build,
    default_of,
    finite,
    flag,
    leaves,
    metavar,
    name_places,
    one_of,
    option,
    show,
    text_parser,
)
from pipeline.schedule import ScheduleConfig


@dataclass
class OptimConfig(Section):
    lr: float = option(0.01, finite(0, above=True))
    """initial learning rate (the paper: 0.01)"""
    momentum: float = option(0.9, Check(lambda x: 0 <= x < 1, "in [0, 1)"))
    """SGD momentum (the paper: 0.9)"""
    weight_decay: float = option(5e-4, finite(0))
    """L2 weight decay (the paper: 0.0005)"""
    batch_size: int = option(128, at_least(1))
    """global batch size per step, split evenly over data-parallel ranks (the paper: 128)"""


@dataclass
class TrainConfig(Section):
    epochs: int = option(90, at_least(1))
    """epochs to train (the paper: roughly 90 passes)"""
    max_steps: int = option(0, at_least(0, " (0 = no limit)"))
    """stop after this many optimizer steps in total (0 = no limit); for smoke tests and demos"""
    seed: int = option(0, Check(lambda x: 0 <= x < 2**63, "an integer >= 0"))
    """run seed: data order, augmentation, init and dropout derive from it"""
    tp: int = option(2, one_of(1, 2))
    """tensor-parallel degree: 2 = the paper's split over two GPUs, 1 = one device per replica"""
    amp: str = option("none", one_of("none", "bf16"))
    """mixed precision: none (the paper) or bf16 autocast"""
    log_every: int = option(20, at_least(1))
    """steps between console/TensorBoard scalars (each costs a device sync)"""
    control_every: int = option(10, at_least(1))
    """steps between the collective checks for signals, LR-drop requests and timed checkpoints"""
    val_every: int = option(1, at_least(1))
    """validate every this many epochs"""
    ten_crop: bool = True
    """validate with the paper's 10-crop test (else the centre crop)"""
    histogram_every: int = option(1000, at_least(0, " (0 = never)"))
    """steps between weight histograms in TensorBoard (0 = never)"""
    device: str = option("auto", one_of("auto", "cuda", "cpu"))
    """auto (this rank's GPU if CUDA is usable; an error if the machine has GPUs torch cannot use), cuda or cpu"""
    grad_compression: str = option("none", one_of("none", "bf16"))
    """data-parallel gradient all-reduce: none (fp32) or bf16 (DDP's bf16_compress_hook: half the bytes)"""
    record_samples: bool = False
    """write each step's sample keys to RUN_DIR/samples/rank-N.jsonl (the consumed-samples ledger)"""


@dataclass
class ProfileConfig(Section):
    steps: str = option("", Check(lambda s: not s or ProfileConfig.window_of(s) is not None, "A:B with 0 <= A < B"))
    """A:B: every rank records steps A+1..B (from A steps done to B done) with torch.profiler and writes a
    trace per rank to RUN_DIR/profiles/<time>/ ('' = none; a running job: python -m launch.profile)"""
    shapes: bool = False
    """record operator input shapes in the trace (larger traces)"""
    stacks: bool = False
    """record Python stacks of operators in the trace (larger traces, more overhead in the window)"""
    peak_tflops: float = option(0.0, finite(0))
    """a device's peak TFLOP/s for MFU; 0 = from the table in pipeline/perf.py (A100, H100, H200; no MFU on
    CPU: give the pre-flight's matmul GFLOP/s / 1000 here to get one)"""
    memory_history: int = option(10000, at_least(0, " (0 = no history)"))
    """CUDA allocations kept for the memory snapshot written on an out-of-memory error (torch's
    _record_memory_history max_entries; 0 = no history, no snapshot). Each entry holds ~1.5-2 KB of host
    memory (its Python stack, measured: docs/BENCHMARKS.md), so 10,000 (the last few steps) cost ~15-20 MB
    per rank; the 100,000 of before cost ~150-220 MB per rank"""

    def window(self) -> tuple[int, int] | None:
        """(A, B) of --profile.steps, None when empty."""
        return self.window_of(self.steps)

    @staticmethod
    def window_of(steps: str) -> tuple[int, int] | None:
        """(A, B) of an ``A:B`` text; None when it is empty or not of that form."""
        a, sep, b = steps.partition(":")
        try:
            first, last = int(a), int(b)
        except ValueError:
            return None
        return (first, last) if sep and 0 <= first < last else None


@dataclass
class RunConfig(Section):
    run_dir: str = option("runs/alexnet", Check(bool, "a directory path, not empty"))
    """run directory: config.json, checkpoints/, tensorboard/, logs"""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    RULES = (
        Rule(
            ("model.towers", "train.tp"),
            lambda towers, tp: not (towers == 1 and tp == 2),
            "{model.towers} 1 (one full-width column) has nothing to split: use it with {train.tp} 1",
        ),
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


name_places(RunConfig)

# The issue-level flags users type most; each maps onto one field of the tree.
ALIASES = {
    "--data": "data.data",
    "--run-dir": "run_dir",
    "--epochs": "train.epochs",
    "--batch-size": "optim.batch_size",
    "--lr": "optim.lr",
    "--tp": "train.tp",
    "--loader": "data.loader",
    "--seed": "train.seed",
    "--max-steps": "train.max_steps",
    "--num-classes": "model.num_classes",
}

# Options that moved: the old dotted name -> the new one. The old flags still parse (with a note), and config
# files, run directories' config.json and checkpoints' meta.json written before load through ``upgrade``.
RENAMED = {
    "train.lease_minutes": "faults.lease.minutes",
    "train.hang_timeout": "faults.hang.timeout",
    "train.slow_phase_timeout": "faults.hang.slow_phase_timeout",
    "train.collective_timeout_min": "faults.hang.collective_timeout_min",
    "train.straggler_threshold": "faults.stragglers.threshold",
    "train.straggler_window": "faults.stragglers.window",
    "train.on_divergence": "faults.divergence.action",
    "train.rollback_lr_factor": "faults.divergence.rollback_lr_factor",
    "train.max_rollbacks": "faults.divergence.max_rollbacks",
    "train.spike_sigma": "faults.divergence.spike_sigma",
    "train.spike_window": "faults.divergence.spike_window",
    "train.spike_warmup": "faults.divergence.spike_warmup",
    "train.spike_factor": "faults.divergence.spike_factor",
}


def upgrade(saved: dict[str, Any]) -> dict[str, Any]:
    """A config mapping in today's layout: every option of ``RENAMED`` moved to its new place (a new key, where
    both are given, wins). For every reader of a saved config: config.json, a checkpoint's meta.json, a file."""
    out = copy.deepcopy(saved)
    for old, new in RENAMED.items():
        *parents, leaf = old.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        spelled = [key for key in (leaf, leaf.replace("_", "-")) if isinstance(node, dict) and key in node]
        if not spelled:
            continue
        value = node.pop(spelled[0])
        *parents, leaf = new.split(".")
        target = out
        for part in parents:
            target = target.setdefault(part, {})
        target.setdefault(leaf, value)
    return out


class _Renamed(argparse.Action):
    """An old flag: its value goes to the new option, with a one-line note naming it."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        print(f"note: {option_string} is now --{flag(self.dest)}; the old name still works", file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_parser(prog: str = "python -m launch.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="TOML or JSON file with config sections (e.g. configs/demo.toml)")
    parser.add_argument("--resume", help="checkpoint directory to start from (default: RUN_DIR's latest, if any)")
    reverse = {v: k for k, v in ALIASES.items()}
    was = {new: old for old, new in RENAMED.items()}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for leaf in leaves(RunConfig):
        path = leaf.path
        section = path.rsplit(".", 1)[0] if "." in path else "run"
        group = groups.setdefault(section, parser.add_argument_group(section))
        flags = [f"--{flag(path)}"]
        if path in reverse and reverse[path] not in flags:
            flags.insert(0, reverse[path])
        notes = [f"default: {show(default_of(leaf.field))}"]
        notes += [leaf.check.want] if leaf.check else []
        notes += [f"was --{flag(was[path])}"] if path in was else []
        common = {"dest": path, "type": text_parser(leaf.kind), "default": argparse.SUPPRESS}
        group.add_argument(*flags, **common, metavar=metavar(leaf.kind), help=f"{leaf.help} ({'; '.join(notes)})")
        if path in was:
            group.add_argument(f"--{flag(was[path])}", **common, action=_Renamed, help=argparse.SUPPRESS)
    return parser


def read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read config file ({e.strerror or e})") from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        return tomllib.loads(text)
    except Exception as e:
        raise UserError(f"{path}: not valid {path.suffix[1:].upper() or 'TOML'} ({e})") from None


def from_dict(data: dict[str, Any], base: RunConfig | None = None, source: str = "config") -> RunConfig:
    """Apply a nested mapping (a file's, a saved config in today's layout or an older one) onto ``base``
    (default: the paper's recipe), checking every key."""
    flat: dict[str, Any] = {}

    def walk(obj: dict[str, Any], prefix: str) -> None:
        for key, value in obj.items():
            path = f"{prefix}{key.replace('-', '_')}"
            if isinstance(value, dict):
                walk(value, path + ".")
            else:
                flat[path] = value

    walk(upgrade(data), "")
    return _apply(base or RunConfig(), flat, source)


def _apply(base: RunConfig, flat: dict[str, Any], source: str) -> RunConfig:
    known = {leaf.path for leaf in leaves(RunConfig)}
    tree = base.to_dict()
    for path, value in flat.items():
        if path not in known:
            raise UserError(f"{source}: unknown option {path!r} (see --help for the list)")
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    try:
        return build(RunConfig, tree)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: {e}") from None


def validate(cfg: RunConfig) -> RunConfig:
    """Every option's check (``pipeline.options.check_section`` on every section); a one-line error naming the
    option. Returns ``cfg``."""
    build(RunConfig, cfg.to_dict())
    return cfg


def check_paths(cfg: RunConfig) -> None:
    """The dataset is a preprocessed directory and the run dir can be one; nothing is created here."""
    data = Path(cfg.data.data) if cfg.data.data else None
    if data is None:
        raise UserError("--data is required: the preprocessed dataset directory (with manifest.json)")
    if not data.is_dir():
        raise UserError(f"--data {data}: not a directory; pass the directory `python -m preprocess shard --out` wrote")
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir}: exists and is not a directory; pass a directory")
    ancestor = run_dir.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"--run-dir {run_dir}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"--run-dir {run_dir}: {ancestor} is not writable")


def resolve_num_classes(cfg: RunConfig, manifest_classes: int) -> None:
    """``--num-classes 0`` (the default) takes the dataset's count; fewer classes than labels is an error."""
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = manifest_classes
    elif cfg.model.num_classes < manifest_classes:
        raise UserError(
            f"--num-classes {cfg.model.num_classes} is fewer than the dataset's {manifest_classes} "
            "classes; leave it out to use the dataset's count"
        )


def parse(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """Defaults < --config file < command line; returns the config and the raw namespace."""
    args = build_parser().parse_args(argv)
    cfg = RunConfig()
    if args.config is not None:
        cfg = from_dict(read_file(args.config), cfg, str(args.config))
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "resume")}
    cfg = _apply(cfg, overrides, "command line")
    return validate(cfg), args


def save(cfg: RunConfig, run_dir: Path) -> Path:
    from basics.files import write_json_atomic
    from pipeline.run_dir import RunDir

    path = RunDir(run_dir).config
    write_json_atomic(path, cfg.to_dict())
    return path


def changes(was: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """``option was -> now`` for every option whose value differs between two resolved configs (a checkpoint's
    and this run's, ``was`` in an older layout too: see ``upgrade``); options one side lacks show as ``?``."""
    if not prefix:
        was = upgrade(was)
    out = []
    for key in sorted(set(was) | set(now)):
        a, b = was.get(key, "?"), now.get(key, "?")
        if isinstance(a, dict) and isinstance(b, dict):
            out += changes(a, b, f"{prefix}{key}.")
        elif _comparable(a) != _comparable(b):
            out.append(f"--{flag(prefix + key)} {show(a)} -> {show(b)}")
    return out


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
