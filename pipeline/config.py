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
import ast
import dataclasses
import functools
import inspect
import json
import math
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basics.errors import UserError
from pipeline.checkpoint import CheckpointConfig
from pipeline.data import DataConfig
from pipeline.model import ModelConfig
from pipeline.schedule import ScheduleConfig


@dataclass
class OptimConfig:
    lr: float = 0.01
    """initial learning rate (the paper: 0.01)"""
    momentum: float = 0.9
    """SGD momentum (the paper: 0.9)"""
    weight_decay: float = 5e-4
    """L2 weight decay (the paper: 0.0005)"""
    batch_size: int = 128
    """global batch size per step, split evenly over data-parallel ranks (the paper: 128)"""


@dataclass
class TrainConfig:
    epochs: int = 90
    """epochs to train (the paper: roughly 90 passes)"""
    max_steps: int = 0
    """stop after this many optimizer steps in total (0 = no limit); for smoke tests and demos"""
    seed: int = 0
    """run seed: data order, augmentation, init and dropout derive from it"""
    tp: int = 2
    """tensor-parallel degree: 2 = the paper's split over two GPUs, 1 = one device per replica"""
    amp: str = "none"
    """mixed precision: none (the paper) or bf16 autocast"""
    log_every: int = 20
    """steps between console/TensorBoard scalars (each costs a device sync)"""
    control_every: int = 10
    """steps between the collective checks for signals, LR-drop requests and timed checkpoints"""
    val_every: int = 1
    """validate every this many epochs"""
    ten_crop: bool = True
    """validate with the paper's 10-crop test (else the centre crop)"""
    histogram_every: int = 1000
    """steps between weight histograms in TensorBoard (0 = never)"""
    device: str = "auto"
    """auto (this rank's GPU if CUDA is usable; an error if the machine has GPUs torch cannot use), cuda or cpu"""
    lease_minutes: float = 30.0
    """minutes without a heartbeat (refreshed at control steps, at most once a minute) after which this
    run's lease on RUN_DIR (writer.lease) is stale and another job may take the run directory over;
    keep it above the longest validation"""
    grad_compression: str = "none"
    """data-parallel gradient all-reduce: none (fp32) or bf16 (DDP's bf16_compress_hook: half the bytes)"""
    hang_timeout: float = 120.0
    """seconds without progress on every rank after which the progress watchdog names the rank the others
    wait for, writes every rank's stacks to RUN_DIR/hangs/ and ends the attempt with exit code 75 so the
    launcher restarts it from the last checkpoint (0 = no watchdog)"""
    slow_phase_timeout: float = 480.0
    """the same allowance for the phases whose single steps may take long: start-up and resume, an epoch's
    input pipeline set-up, a checkpoint's disk writes (its collectives get --train.hang-timeout; a rank
    whose process stopped running is judged by --train.hang-timeout whatever its phase)"""
    collective_timeout_min: float = 10.0
    """minutes a collective may wait before the process group fails it (the watchdog acts first)"""
    straggler_threshold: float = 1.5
    """a rank whose own work per step (step time less its waits for other ranks) exceeds this multiple of
    the other ranks' median at --train.straggler-window control steps in a row is named in one log line"""
    straggler_window: int = 5
    """consecutive control steps a rank must be slow before it is named a straggler"""
    on_divergence: str = "stop"
    """what a divergence does (a non-finite loss or gradient norm on any rank, or a loss spike; its update is
    never applied): stop (one line naming the good checkpoint, exit 2) or rollback (return to the newest good
    checkpoint, skip the batches since, train on)"""
    rollback_lr_factor: float = 1.0
    """rollback: multiply the learning rate by this at each rollback (1 = unchanged)"""
    max_rollbacks: int = 3
    """rollback: stop as --train.on-divergence stop does once a run has rolled back this many times"""
    spike_sigma: float = 6.0
    """a loss more than this many standard deviations above the mean of the last --train.spike-window steps is
    a spike (OLMo's rule); 0 = off"""
    spike_window: int = 128
    """steps in the spike rule's rolling window; the rule arms once it is full"""
    spike_warmup: int = 200
    """steps before the spike rule arms (the first steps' loss moves fast)"""
    spike_factor: float = 10.0
    """a loss above this multiple of the largest loss seen so far is a spike at any step (Megatron's check);
    0 = off"""

    def __post_init__(self) -> None:
        if self.amp not in ("none", "bf16"):
            raise UserError(f"--train.amp must be none or bf16 (got {self.amp!r})")
        if self.device not in ("auto", "cuda", "cpu"):
            raise UserError(f"--train.device must be auto, cuda or cpu (got {self.device!r})")
        if self.grad_compression not in ("none", "bf16"):
            raise UserError(f"--train.grad-compression must be none or bf16 (got {self.grad_compression!r})")
        if not self.collective_timeout_min > 0:
            raise UserError(f"--train.collective-timeout-min must be > 0 (got {self.collective_timeout_min})")
        if self.hang_timeout < 0 or (self.hang_timeout and not self.hang_timeout <= self.slow_phase_timeout):
            raise UserError(
                f"--train.hang-timeout must be 0 (off) or > 0 and at most --train.slow-phase-timeout "
                f"(got {self.hang_timeout} and {self.slow_phase_timeout})"
            )
        if self.hang_timeout and self.slow_phase_timeout >= 60 * self.collective_timeout_min:
            raise UserError(
                f"--train.slow-phase-timeout {self.slow_phase_timeout} s must be below --train.collective-timeout-min "
                f"{self.collective_timeout_min} min, or the collective fails first and names no rank"
            )
        if self.on_divergence not in ("stop", "rollback"):
            raise UserError(f"--train.on-divergence must be stop or rollback (got {self.on_divergence!r})")
        if not self.straggler_threshold > 1 or self.straggler_window < 1:
            raise UserError(
                f"--train.straggler-threshold must be > 1 and --train.straggler-window >= 1 "
                f"(got {self.straggler_threshold} and {self.straggler_window})"
            )


@dataclass
class ProfileConfig:
    steps: str = ""
    """A:B: every rank records steps A+1..B (from A steps done to B done) with torch.profiler and writes a
    trace per rank to RUN_DIR/profiles/<time>/ ('' = none; a running job: python -m launch.profile)"""
    shapes: bool = False
    """record operator input shapes in the trace (larger traces)"""
    stacks: bool = False
    """record Python stacks of operators in the trace (larger traces, more overhead in the window)"""
    peak_tflops: float = 0.0
    """a device's peak TFLOP/s for MFU; 0 = from the table in pipeline/perf.py (A100, H100, H200; no MFU on
    CPU: give the pre-flight's matmul GFLOP/s / 1000 here to get one)"""
    memory_history: int = 100000
    """CUDA allocations kept for the memory snapshot written on an out-of-memory error (torch's
    _record_memory_history max_entries; 0 = no history, no snapshot)"""

    def __post_init__(self) -> None:
        self.window()
        if not (math.isfinite(self.peak_tflops) and self.peak_tflops >= 0) or self.memory_history < 0:
            raise UserError(
                f"--profile.peak-tflops must be a finite number >= 0 and --profile.memory-history >= 0 "
                f"(got {self.peak_tflops} and {self.memory_history})"
            )

    def window(self) -> tuple[int, int] | None:
        """(A, B) of --profile.steps, None when empty."""
        if not self.steps:
            return None
        a, sep, b = self.steps.partition(":")
        try:
            first, last = int(a), int(b)
        except ValueError:
            first = last = -1
        if not sep or not 0 <= first < last:
            raise UserError(f"--profile.steps must be A:B with 0 <= A < B (got {self.steps!r})")
        return first, last


@dataclass
class RunConfig:
    run_dir: str = "runs/alexnet"
    """run directory: config.json, checkpoints/, tensorboard/, logs"""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its help text)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, type, str]]:
    """(dotted path, field, resolved type, help) for every scalar field of the tree."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(kind):
            out += _leaves(kind, path + ".")
        else:
            out.append((path, f, kind, field_docs(cls).get(f.name, "")))
    return out


def _parser_for(kind: Any) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union or (origin is not None and type(None) in args):  # X | None
        inner = [a for a in args if a is not type(None)][0]
        base = _parser_for(inner)
        return lambda s: None if s.lower() in ("none", "null", "") else base(s)
    if kind is bool:
        return parse_bool
    if origin in (list, tuple):
        item = _parser_for(args[0]) if args else str
        return lambda s: [item(x) for x in s.split(",") if x.strip()]
    if kind in (int, float, str):
        return kind
    return str


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def build_parser(prog: str = "python -m launch.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="TOML or JSON file with config sections (e.g. configs/demo.toml)")
    parser.add_argument("--resume", help="checkpoint directory to start from (default: RUN_DIR's latest, if any)")
    reverse = {v: k for k, v in ALIASES.items()}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for path, f, kind, help_text in _leaves(RunConfig):
        section = path.split(".")[0] if "." in path else "run"
        group = groups.setdefault(section, parser.add_argument_group(section))
        flags = [f"--{path.replace('_', '-')}"]
        if path in reverse and reverse[path] not in flags:
            flags.insert(0, reverse[path])
        default = _default_of(f)
        group.add_argument(
            *flags,
            dest=path,
            type=_parser_for(kind),
            default=argparse.SUPPRESS,
            metavar=_metavar(kind),
            help=f"{help_text} (default: {_show(default)})",
        )
    return parser


def _metavar(kind: Any) -> str:
    if kind is bool:
        return "BOOL"
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        return "A,B,..."
    return getattr(kind, "__name__", "VALUE").upper().replace("NONETYPE", "")


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


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
    """Apply a nested mapping onto ``base`` (default: the paper's recipe), checking every key."""
    flat: dict[str, Any] = {}

    def walk(obj: dict[str, Any], prefix: str) -> None:
        for key, value in obj.items():
            path = f"{prefix}{key.replace('-', '_')}"
            if isinstance(value, dict):
                walk(value, path + ".")
            else:
                flat[path] = value

    walk(data, "")
    return _apply(base or RunConfig(), flat, source)


def _apply(base: RunConfig, flat: dict[str, Any], source: str) -> RunConfig:
    known = {path: (f, kind) for path, f, kind, _ in _leaves(RunConfig)}
    tree = base.to_dict()
    for path, value in flat.items():
        if path not in known:
            raise UserError(f"{source}: unknown option {path!r} (see --help for the list)")
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    _check_ranges(tree)  # before the sections' own checks, so the message names the option
    try:
        return _build(RunConfig, tree)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: {e}") from None


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        kind, value = hints[f.name], values[f.name]
        path = f"{prefix}{f.name}"
        kwargs[f.name] = (
            _build(kind, value, path + ".") if dataclasses.is_dataclass(kind) else _coerce(kind, value, path)
        )
    return cls(**kwargs)


def _coerce(kind: Any, value: Any, path: str) -> Any:
    """Check a file's value against the field's type; ints pass as floats, lists as tuples."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if value is None and type(None) in args:
        return None
    if origin is typing.Union or (origin is not None and type(None) in args):
        kind = [a for a in args if a is not type(None)][0]
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"--{_flag(path)}: expected a list, got {value!r}")
        items = [_coerce(args[0], v, path) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in (int, str, bool) and type(value) is kind:
        return value
    if kind in (int, float, str, bool):
        want = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]
        raise TypeError(f"--{_flag(path)}: expected {want}, got {value!r}")
    return value


def _flag(path: str) -> str:
    return path.replace("_", "-")


def _finite(x: float) -> bool:
    return math.isfinite(x)


# Ranges of every numeric option: (test, what the user must give). Checked before anything is written.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "optim.lr": (lambda x: _finite(x) and x > 0, "a finite number > 0"),
    "optim.momentum": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "optim.weight_decay": (lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    "optim.batch_size": (lambda x: x >= 1, "at least 1"),
    "train.epochs": (lambda x: x >= 1, "at least 1"),
    "train.max_steps": (lambda x: x >= 0, ">= 0 (0 = no limit)"),
    "train.seed": (lambda x: 0 <= x < 2**63, "an integer >= 0"),
    "train.tp": (lambda x: x in (1, 2), "1 or 2"),
    "train.log_every": (lambda x: x >= 1, "at least 1"),
    "train.control_every": (lambda x: x >= 1, "at least 1"),
    "train.val_every": (lambda x: x >= 1, "at least 1"),
    "train.histogram_every": (lambda x: x >= 0, ">= 0 (0 = never)"),
    "train.lease_minutes": (lambda x: _finite(x) and x > 0, "a finite number of minutes > 0"),
    "train.rollback_lr_factor": (lambda x: 0 < x <= 1, "in (0, 1]"),
    "train.max_rollbacks": (lambda x: x >= 1, "at least 1"),
    "train.spike_sigma": (lambda x: _finite(x) and x >= 0, "a finite number >= 0 (0 = off)"),
    "train.spike_window": (lambda x: x >= 2, "at least 2"),
    "train.spike_warmup": (lambda x: x >= 0, ">= 0"),
    "train.spike_factor": (lambda x: x == 0 or (_finite(x) and x > 1), "0 (off) or a finite number > 1"),
    "model.num_classes": (lambda x: x == 0 or x >= 2, "at least 2, or 0 for the dataset's class count"),
    "model.widths": (lambda x: len(x) == 5 and all(w >= 2 and w % 2 == 0 for w in x), "five even widths >= 2"),
    "model.fc_width": (lambda x: x >= 2 and x % 2 == 0, "even and at least 2"),
    "model.dropout": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "model.towers": (lambda x: x in (1, 2), "1 or 2"),
    "schedule.factor": (lambda x: 0 < x < 1, "in (0, 1)"),
    "schedule.max_drops": (lambda x: x >= 0, ">= 0"),
    "schedule.patience": (lambda x: x >= 1, "at least 1"),
    "schedule.threshold": (lambda x: _finite(x) and 0 <= x < 1, "in [0, 1)"),
    "schedule.milestones": (lambda x: all(m >= 0 for m in x), "epochs >= 0"),
    "schedule.warmup_epochs": (lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    "checkpoint.every_epochs": (lambda x: x >= 1, "at least 1"),
    "checkpoint.every_minutes": (lambda x: _finite(x) and x >= 0, "a finite number >= 0 (0 = never by time)"),
    "checkpoint.every_steps": (lambda x: x >= 0, ">= 0 (0 = never by step count)"),
    "checkpoint.keep_last": (lambda x: x >= 1, "at least 1"),
    "data.lighting_std": (lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
}


def validate(cfg: RunConfig) -> RunConfig:
    """Every range in RANGES; a one-line error naming the option. Returns ``cfg``."""
    _check_ranges(cfg.to_dict())
    if not cfg.run_dir:
        raise UserError("--run-dir must not be empty")
    if cfg.model.towers == 1 and cfg.train.tp == 2:
        raise UserError("--model.towers 1 (one full-width column) has nothing to split: use it with --tp 1")
    return cfg


def _check_ranges(tree: dict[str, Any]) -> None:
    for path, (ok, want) in RANGES.items():
        node: Any = tree
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            continue
        try:
            good = ok(node)
        except TypeError:  # a value of the wrong type: the type check names it
            continue
        if not good:
            raise UserError(f"--{_flag(path)} must be {want} (got {_show(node)})")


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
    and this run's); options one side lacks (another version) show as ``?``."""
    out = []
    for key in sorted(set(was) | set(now)):
        a, b = was.get(key, "?"), now.get(key, "?")
        if isinstance(a, dict) and isinstance(b, dict):
            out += changes(a, b, f"{prefix}{key}.")
        elif _comparable(a) != _comparable(b):
            out.append(f"--{_flag(prefix + key)} {_show(a)} -> {_show(b)}")
    return out


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
