"""The training state and its checkpoints: atomic, verified, lineage-safe, reshardable over (dp, tp).

Layout::

    RUN/checkpoints/step-00001234/   torch.distributed.checkpoint (DCP) files + meta.json (written last)
    RUN/checkpoints/latest           name of the checkpoint a restart resumes from (replaced atomically)
    RUN/checkpoints/best             name of the checkpoint with the best val top-1

``meta.json`` holds the progress, schedule, config and layout, the sha256 and size of every file, and an
index of where each tensor lies (file, offset, length). Loading reads tensors through that index with
``torch.load(weights_only=True)``: nothing from a run directory is ever unpickled by this project (DCP's
own ``.metadata`` is a pickle, so it is not read here). Every load verifies the checksums first; an
automatic resume walks back from ``latest`` to the newest checkpoint that verifies.

The model is always stored in tower form (``tower{t}.model.*``, ``tower{t}.momentum.*``) whatever tp the
run used, so a checkpoint loads into tp=1 or tp=2 and any number of dp replicas. Per-rank RNG states
(tensors, ``rng.rank{r}.*``) are restored only when the layout is unchanged.

A checkpoint is *good* once the state it holds has produced a finite, unspiked step (``pipeline.faults.divergence``):
meta.json's ``health`` is ``unverified`` when written, and the trainer rewrites it to ``good`` at the control
step that sees the step after it was finite, or to ``diverged`` when that step diverged. A diverged checkpoint
is never resumed automatically; after a divergence ``latest`` names the newest good one. ``best`` is moved by
validation only: a best checkpoint later marked diverged still holds the weights whose validation made it best
(evaluation uses them), but no automatic resume starts from it. Checkpoints written before this field existed
count as good.

Retention never deletes the checkpoint just written, the one ``latest`` names, ``best``, or the newest good
one (so keep-last never leaves only the states of a diverging run). A resume from
a checkpoint that is not the newest of its lineage starts a new lineage; the abandoned one is kept until
the new one has ``keep_last`` checkpoints. Names are never reused: re-saving a step writes a new
directory and only then moves ``latest``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import stat
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from basics.errors import UserError
from basics.files import fsync_dir, write_bytes_atomic, write_json_atomic
from pipeline import model as model_lib
from pipeline.phases import PhaseMarks

log = logging.getLogger("alexnet")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
META = "meta.json"
LINEAGE = "lineage"
FORMAT_VERSION = 2
# RNG states a checkpoint may lack in the same layout: a CPU run never initialises CUDA, so saves none.
OPTIONAL_RNG = (".cuda",)
UNVERIFIED, GOOD, DIVERGED = "unverified", "good", "diverged"  # meta.json's ``health``
_TMP = ".tmp"
_HASH_CHUNK = 8 << 20

# A one-process run writes its checkpoint alone on purpose (``no_dist`` below); PyTorch still warns on every
# save that it is "assuming the intent", which users read as something being wrong. Only that message is
# silenced (a filter, not catch_warnings: background saves run in another thread).
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to save"
)


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


class CheckpointError(UserError):
    """A checkpoint that cannot be saved or loaded; the message names it and what to do."""


class NonFiniteState(UserError):
    """Training diverged: weights or loss are NaN/inf; nothing non-finite is saved."""


# ---------------------------------------------------------------------------------------------- state


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress (or the next one, at an epoch boundary)
    step: int = 0  # optimizer steps taken since the start of training
    step_in_epoch: int = 0  # steps of ``epoch`` already taken


class TrainState:
    """Everything a restart needs: model towers, SGD momentum, RNG, progress, schedule, config, layout.

    ``state_dict()`` gives ``{"tensors": ..., "meta": ...}``: tensors (this rank's towers and RNG) go to DCP,
    the JSON-able rest to meta.json. The trainer owns the live objects; this class only translates.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Any,
        config: Any,
        layout: dict[str, int],
        rank: int,
        tp_rank: int,
        towers: int = 2,
    ):
        self.model, self.optimizer, self.schedule, self.config = model, optimizer, schedule, config
        self.layout, self.rank, self.tp_rank = layout, rank, tp_rank
        self.towers = towers  # 1: a one-column model (no split), stored as a single tower
        self.progress = Progress()
        self.best_top1_error: float | None = None
        self.rng_restored: set[str] = set()  # the RNG states the last load applied ("torch", "cuda", ...)
        self.dataset: dict[str, Any] = {}  # what the run trains on (path, manifest sha256): shown when it changes
        self.divergence: Any = None  # pipeline.faults.divergence.DivergenceGuard (state_dict/load_state_dict), if any

    # -- tower form: under tp=2 a rank holds its own tower; under tp=1 all of them (model.to_towers)

    def _to_towers(self, full: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
        if self.layout["tp_size"] == 2:
            return {self.tp_rank: full}
        return model_lib.to_towers(full, self.towers)

    def _from_towers(self, towers: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if self.layout["tp_size"] == 2:
            return towers[self.tp_rank]
        return model_lib.from_towers(towers)

    def _model_and_momentum(self, copy: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """On the host; ``copy``: always a copy (a CPU tensor's ``.cpu()`` is the live tensor itself)."""
        model_sd = {k: v.detach().to("cpu", copy=copy) for k, v in model_lib.unwrap(self.model).state_dict().items()}
        momentum = {}
        for name, p in self.model.named_parameters():
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            momentum[name] = (buf if buf is not None else torch.zeros_like(p)).detach().to("cpu", copy=copy)
        return model_sd, momentum

    def tensors(self, copy: bool = False) -> dict[str, torch.Tensor]:
        """This rank's tensors; ``copy`` for a background save, which must not see later updates."""
        model_sd, momentum = self._model_and_momentum(copy)
        out: dict[str, torch.Tensor] = {}
        for part, full in (("model", model_sd), ("momentum", momentum)):
            for t, sd in self._to_towers(full).items():
                out.update({f"tower{t}.{part}.{k}": v for k, v in sd.items()})
        out.update({f"rng.rank{self.rank}.{k}": v for k, v in rng_tensors().items()})
        return out

    def tensor_templates(self, with_rng: bool) -> dict[str, torch.Tensor]:
        """The keys (and shapes) a load into this layout needs."""
        wanted = {k: v for k, v in self.tensors().items() if with_rng or not k.startswith("rng.")}
        return wanted

    def meta(self) -> dict[str, Any]:
        return {
            "progress": vars(self.progress).copy(),
            "layout": dict(self.layout),
            "schedule": self.schedule.state_dict(),
            "best_top1_error": self.best_top1_error,
            "config": self.config.to_dict(),
            "dataset": dict(self.dataset),
            **({"divergence": self.divergence.state_dict()} if self.divergence is not None else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors(), "meta": self.meta()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load ``{"tensors", "meta"}``; RNG tensors are applied when present (same layout only)."""
        tensors, meta = state["tensors"], state["meta"]
        parts: dict[str, dict[int, dict[str, torch.Tensor]]] = {"model": {}, "momentum": {}}
        for key, value in tensors.items():
            if key.startswith("tower"):
                head, part, name = key.split(".", 2)
                parts[part].setdefault(int(head[len("tower") :]), {})[name] = value
        model_lib.unwrap(self.model).load_state_dict(self._from_towers(parts["model"]))
        momentum = self._from_towers(parts["momentum"])
        for name, p in self.model.named_parameters():
            self.optimizer.state[p]["momentum_buffer"] = momentum[name].to(p.device, p.dtype).clone()
        prefix = f"rng.rank{self.rank}."
        rng = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if rng:
            set_rng_tensors(rng)
        self.rng_restored = set(rng)
        self.schedule.load_state_dict(meta["schedule"])
        self.best_top1_error = meta["best_top1_error"]
        self.progress = Progress(**meta["progress"])
        if self.divergence is not None and "divergence" in meta:
            self.divergence.load_state_dict(meta["divergence"])

    def all_finite(self, device: torch.device, group: Any = None) -> bool:
        """Weights and momentum finite on every rank (collective when distributed)."""
        bad = torch.zeros((), device=device)
        for p in self.model.parameters():
            if not torch.isfinite(p.detach()).all():
                bad.fill_(1)
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None and not torch.isfinite(buf).all():
                bad.fill_(1)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
        return not bool(bad)


def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states as plain tensors (no pickle): torch, CUDA, Python, NumPy."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([version, *words], dtype=torch.int64),
        "python_gauss": torch.tensor([math.nan if gauss is None else gauss], dtype=torch.float64),
        "numpy": torch.tensor([*keys.tolist(), pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_tensors(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"].tolist()
    gauss = float(state["python_gauss"][0])
    random.setstate((py[0], tuple(py[1:]), None if math.isnan(gauss) else gauss))
    npy = state["numpy"].tolist()
    np.random.set_state(
        ("MT19937", np.array(npy[:624], dtype=np.uint32), npy[624], npy[625], float(state["numpy_gauss"][0]))
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------- finding


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a complete checkpoint (no {META}); pass another one") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/{META}: unreadable ({e}); pass another checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: not a checkpoint of format {FORMAT_VERSION} (written by another version "
            "or damaged); pass another one"
        )
    return meta


def health(meta: dict[str, Any]) -> str:
    """good, unverified or diverged; a checkpoint from before the field counts as good."""
    return meta.get("health", GOOD)


def newest_good(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose state is known to have trained on without diverging."""
    good = [p for p, m in complete(run_dir) if health(m) == GOOD]
    return good[-1] if good else None


def complete(run_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Checkpoints whose meta.json reads, oldest save first."""
    root = checkpoints_dir(run_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("step-") and not p.name.endswith(_TMP) and p.is_dir():
                try:
                    found.append((p, read_meta(p)))
                except CheckpointError:
                    continue
    return sorted(found, key=lambda item: item[1]["seq"])


def _pointer(run_dir: str | Path, name: str) -> Path | None:
    root = checkpoints_dir(run_dir)
    try:
        target = (root / name).read_text().strip()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    if not target or "/" in target or target in (".", ".."):
        return None
    return root / target


def latest(run_dir: str | Path) -> Path | None:
    """What ``latest`` names when it reads complete, else the newest complete checkpoint, else None."""
    pointed = _pointer(run_dir, LATEST)
    if pointed is not None and (pointed / META).is_file():
        return pointed
    found = [p for p, m in complete(run_dir) if health(m) != DIVERGED]
    return found[-1] if found else None


def resolve(run_dir: str | Path | None, which: str) -> Path:
    """``best`` / ``latest`` of a run dir, or a checkpoint directory path; a one-line error when absent."""
    if which in (BEST, LATEST):
        if run_dir is None:
            raise CheckpointError(f"--checkpoint {which} needs a --run-dir")
        path = latest(run_dir) if which == LATEST else _pointer(run_dir, BEST)
        if path is None or not path.is_dir():
            raise CheckpointError(
                f"{checkpoints_dir(run_dir)}: no {which} checkpoint yet (has the run finished an epoch?)"
            )
        return path
    path = Path(which)
    if not path.is_dir() and run_dir is not None and (checkpoints_dir(run_dir) / which).is_dir():
        path = checkpoints_dir(run_dir) / which
    if not path.is_dir():
        raise CheckpointError(f"{which}: no such checkpoint directory; pass best, latest or a step-N directory")
    return path


def _current_lineage(run_dir: str | Path) -> int | None:
    try:
        return int((checkpoints_dir(run_dir) / LINEAGE).read_text())
    except (OSError, ValueError):
        return None


def candidates(run_dir: str | Path) -> list[Path]:
    """Where an automatic resume looks, newest intended state first.

    The checkpoint ``latest`` names, preceded by its child when a save was killed between renaming its
    directory and moving ``latest`` (the newest checkpoint, of the current lineage, whose parent ``latest``
    names); then its ancestors (the same lineage, walking back); then every other checkpoint, newest first.
    A checkpoint marked diverged is never among them.
    """
    found = complete(run_dir)
    by_name = {p.name: (p, m) for p, m in found}
    order: list[Path] = []
    pointed = _pointer(run_dir, LATEST)
    if pointed is not None:
        if found:
            newest, meta = found[-1]
            if (
                newest != pointed
                and meta.get("parent") == pointed.name
                and meta.get("lineage") == _current_lineage(run_dir)
            ):
                order.append(newest)
        order.append(pointed)
        name = pointed.name
        while name in by_name and (parent := by_name[name][1].get("parent")) in by_name:
            if by_name[parent][0] in order:
                break
            order.append(by_name[parent][0])
            name = parent
    order += [p for p, _ in reversed(found) if p not in order]
    diverged = {p for p, m in found if health(m) == DIVERGED}
    return [p for p in order if p not in diverged]


# ---------------------------------------------------------------------------------------------- integrity


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify(path: str | Path) -> str | None:
    """None if every file listed in meta.json is present with its size and sha256; else why not."""
    path = Path(path)
    if not path.is_dir():
        return "missing"
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        return str(e).split(": ", 1)[-1]
    for name, want in meta["files"].items():
        f = path / name
        try:
            size = f.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} were written (truncated or damaged)"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its sha256 (damaged)"
    return None


def check_permissions(path: Path, allow_world_writable: bool) -> None:
    """Refuse a checkpoint anyone could have replaced, as ssh refuses a loose key."""
    if allow_world_writable:
        return
    for p in (path, path.parent):
        mode = p.stat().st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise CheckpointError(
                f"{p} is world-writable (mode {stat.S_IMODE(mode):o}): anyone could swap its files; "
                f"`chmod o-w {p}` or pass --checkpoint.allow-world-writable true"
            )


def read_tensors(path: str | Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint through meta.json's index, with ``torch.load(weights_only=True)`` (no pickle)."""
    path = Path(path)
    index = read_meta(path)["tensors"]
    wanted = list(index) if keys is None else keys
    out = {}
    handles: dict[str, Any] = {}
    try:
        for key in wanted:
            if key not in index:
                raise CheckpointError(f"{path}: has no tensor {key!r}; it was saved by another model or layout")
            where = index[key]
            f = handles.get(where["file"]) or handles.setdefault(where["file"], open(path / where["file"], "rb"))
            f.seek(where["offset"])
            blob = f.read(where["length"])
            try:
                out[key] = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(
                    f"{path}: tensor {key} does not load ({str(e).splitlines()[0][:200]}); pass another checkpoint"
                ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e}); pass another checkpoint") from None
    finally:
        for f in handles.values():
            f.close()
    return out


def read_towers(path: str | Path) -> dict[int, dict[str, torch.Tensor]]:
    """All tower tensors of a checkpoint, offline: ``{tower: {"model.x": t, "momentum.x": t}}``."""
    towers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in read_tensors(path, [k for k in read_meta(path)["tensors"] if k.startswith("tower")]).items():
        head, rest = key.split(".", 1)
        towers.setdefault(int(head[len("tower") :]), {})[rest] = value
    return towers


def export_model(path: str | Path) -> dict[str, torch.Tensor]:
    """The single-device AlexNet state dict of a checkpoint (verified first), for ``AlexNet.load_state_dict``."""
    reason = verify(path)
    if reason:
        raise CheckpointError(f"{path}: {reason}; pass another checkpoint")
    towers = read_towers(path)
    return model_lib.from_towers(
        {
            t: {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
            for t, tensors in towers.items()
        }
    )


# ---------------------------------------------------------------------------------------------- save/load


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = next((ln for ln in text if "Error" in ln or "error" in ln), text[0] if text else type(e).__name__)
    return line.strip()[:300]


def _space_hint(directory: Path, needed: int) -> str:
    """torch.save reports a full disk as an opaque stream error; say what the file system says."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return ""
    if free < 2 * needed:
        return f" (no space left on the device: {free / 2**20:.1f} MiB free in {directory})"
    return ""


@dataclass
class _PendingSave:
    step: int
    name: str
    thread: threading.Thread | None = None
    error: str | None = None
    phase: str = "checkpoint"  # the background writer's phase, shown as the rank's own while it waits for it


# A phase change for the progress watchdog: (phase, alone). ``alone``: only this rank does it (rank 0's
# commit), so it moves the rank's phase on without a marker of its own (tick) (pipeline.phases).
Phase = Callable[[str, bool], None]


class _MarkedWriter(dcp.FileSystemWriter):
    """DCP's file writer, telling the watchdog which parts of a save are disk work ("checkpoint", the
    slow allowance) and which wait for the other ranks ("checkpoint-sync": DCP's plan gather and scatter,
    the gather of every rank's write results, the broadcast of the metadata). Every rank enters the same
    markers; the coordinator's metadata write only ticks into its phase."""

    def __init__(self, path: str, phase: Phase):
        super().__init__(path, sync_files=True)
        self._phase = phase

    def prepare_local_plan(self, plan: Any) -> Any:
        self._phase("checkpoint", False)  # creates the directory
        plan = super().prepare_local_plan(plan)
        self._phase("checkpoint-sync", False)  # then the plan's gather and scatter
        return plan

    def write_data(self, plan: Any, planner: Any) -> Any:
        self._phase("checkpoint", False)
        written = super().write_data(plan, planner)  # synchronous: the future returned is done
        self._phase("checkpoint-sync", False)  # then the results' gather and the metadata's broadcast
        return written

    def finish(self, metadata: Any, results: Any) -> None:
        self._phase("checkpoint", True)  # the coordinator only: .metadata written while the others wait
        super().finish(metadata, results)
        self._phase("checkpoint-sync", True)


class Checkpointer:
    """Collective save and restore of a :class:`TrainState` in ``RUN/checkpoints``."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: CheckpointConfig,
        rank: int,
        process_group: Any = None,
        marks: PhaseMarks | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.marks = marks  # where this rank is (pipeline.phases), or None
        self.dir = checkpoints_dir(run_dir)
        self.cfg = cfg
        self.rank = rank
        self.group = process_group
        self.lineage: int | None = None  # set by restore(); None: a fresh lineage at the first save
        self.parent: str | None = None  # the checkpoint the live state descends from
        self.last_saved_step: int | None = None
        self.unverified: list[tuple[int, str]] = []  # (step, name): this process's saves not yet judged
        self._last_save = time.monotonic()
        self._pending: _PendingSave | None = None
        # Collective (every rank builds its Checkpointer at the same point): a CPU group for background saves.
        self._save_group = dist.new_group(backend="gloo") if cfg.async_save and dist.is_initialized() else None

    # -- when

    def time_due(self) -> bool:
        """Global rank 0's clock decides; the trainer shares the decision with every rank."""
        return self.cfg.every_minutes > 0 and time.monotonic() - self._last_save >= 60 * self.cfg.every_minutes

    def epoch_due(self, epochs_done: int) -> bool:
        return epochs_done % self.cfg.every_epochs == 0

    def step_due(self, step: int) -> bool:
        """Every rank computes the same answer from the step count alone."""
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    # -- collectives (no-ops in one process)

    def _broadcast(self, obj: Any) -> Any:
        if not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.group)

    def _mark(self, phase: str, alone: bool = False) -> None:
        """The training thread's phase (the watchdog judges "checkpoint-sync" by the step allowance)."""
        if self.marks is not None:
            (self.marks.tick if alone else self.marks.enter)(phase)

    # -- save

    def save(self, state: TrainState, device: torch.device, *, is_best: bool = False) -> Path:
        """Collective: every rank calls it at the same step. Raises a one-line error, never half-saves.

        With ``async_save`` the state is copied to host memory here and written by a background thread;
        the checkpoint becomes visible (``latest`` moves) only once every rank's files are written.
        ``wait()`` settles it; the next save, a stop and the end of training call it.
        """
        self.wait()  # at most one save in flight
        self._mark("checkpoint-sync")  # the finite check and the name's broadcast
        step = state.progress.step
        if not state.all_finite(device, self.group):
            raise NonFiniteState(
                f"weights became NaN/inf by step {step}; not saved, the last good checkpoint "
                f"{latest(self.run_dir)} is kept; lower --lr or check the data"
            )
        name = None
        error = None
        if self.rank == 0:
            try:
                name = self._prepare(step)
            except OSError as e:
                error = f"cannot create a checkpoint in {self.dir} ({e.strerror or e})"
        name, error = self._broadcast((name, error))
        if error:
            raise CheckpointError(f"{error}; nothing was written, free space or fix permissions and re-run")
        self._mark("checkpoint")  # the copy to host memory, then the write's own markers
        tensors = state.tensors(copy=self.cfg.async_save)
        meta = {**state.meta(), "step": step, "health": UNVERIFIED}
        self._last_save = time.monotonic()
        self.last_saved_step = step
        if not self.cfg.async_save:
            self._conclude(step, name, self._write(name, tensors, meta, is_best, self.group, self._mark))
            return self.dir / name
        pending = _PendingSave(step, name)

        def write() -> None:
            # Only the training thread marks phases: the writer's go to `pending.phase`, which wait() shows.
            pending.error = self._write(
                name, tensors, meta, is_best, self._async_group(), lambda phase, alone: setattr(pending, "phase", phase)
            )

        pending.thread = threading.Thread(target=write, name=f"checkpoint-{name}", daemon=True)
        pending.thread.start()
        self._pending = pending
        return self.dir / name

    def failed(self) -> bool:
        """This rank's save in flight has failed (the trainer shares it at its control step)."""
        return self._pending is not None and not self._pending.thread.is_alive() and self._pending.error is not None

    def wait(self) -> None:
        """Collective: finish the save in flight, if any; raises its error on every rank."""
        pending, self._pending = self._pending, None
        if pending is not None:
            shown = None
            while pending.thread.is_alive():  # a hung background collective is judged as a hung collective
                if pending.phase != shown:
                    shown = pending.phase
                    self._mark(shown, alone=True)  # ranks see different numbers of changes: no markers
                pending.thread.join(timeout=0.2)
            self._conclude(pending.step, pending.name, pending.error)

    def _write(
        self,
        name: str,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        is_best: bool,
        group: Any,
        phase: Phase,
    ) -> str | None:
        """Every rank writes its files; rank 0 then checksums, commits and prunes. The error, or None."""
        tmp = self.dir / (name + _TMP)
        try:
            written = dcp.save(
                tensors,
                storage_writer=_MarkedWriter(str(tmp), phase),
                process_group=group,
                no_dist=not dist.is_initialized(),
            )
            error = None
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            written, error = None, _first_line(e) + _space_hint(self.dir, sum(t.nbytes for t in tensors.values()))
        if self.rank == 0:
            if error is None:
                phase("checkpoint", True)  # checksums and commit, while the others wait in _conclude
                try:
                    self._finish(tmp, name, meta, written, is_best)
                except OSError as e:
                    error = f"{e.strerror or e} ({getattr(e, 'filename', '') or tmp})"
            if error is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return error

    def _conclude(self, step: int, name: str, error: str | None) -> None:
        """Collective: every rank learns of a failure on any rank."""
        self._mark("checkpoint-sync")
        if dist.is_initialized():
            errors: list[str | None] = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(errors, error, group=self.group)
            error = next((e for e in errors if e), None)
        if error is not None:
            raise CheckpointError(
                f"checkpoint at step {step} failed: {error}; the previous checkpoint "
                f"{latest(self.run_dir)} is intact; fix it and re-run the same command"
            )
        self.parent = name
        self.unverified.append((step, name))

    def _async_group(self) -> Any:
        """Background saves talk over a gloo group of their own: never interleaved with training's collectives."""
        if dist.is_initialized() and self._save_group is None:
            raise RuntimeError("Checkpointer built without its save group")
        return self._save_group

    def _prepare(self, step: int) -> str:
        """Rank 0: remove leftovers of killed saves, pick an unused name, create its temporary directory."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in self.dir.glob("*" + _TMP):
            shutil.rmtree(p, ignore_errors=True)
        name, n = step_name(step), 0
        while (self.dir / name).exists():
            n += 1
            name = f"{step_name(step)}-{n}"
        (self.dir / (name + _TMP)).mkdir()
        return name

    def _finish(self, tmp: Path, name: str, meta: dict[str, Any], written: Any, is_best: bool) -> None:
        """Rank 0, after every rank's data is on disk: checksums + index, rename, move the pointers, prune."""
        existing = complete(self.run_dir)
        if self.lineage is None:
            self._start_lineage(existing)
        files = {
            p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file() and p.name != META
        }
        index = {
            item.fqn: {"file": info.relative_path, "offset": info.offset, "length": info.length}
            for item, info in written.storage_data.items()
        }
        meta = {
            "format": FORMAT_VERSION,
            "saved_at": time.time(),
            "seq": 1 + max((m["seq"] for _, m in existing), default=-1),
            "lineage": self.lineage,
            "parent": self.parent,
            **meta,
            "files": files,
            "tensors": index,
        }
        write_json_atomic(tmp / META, meta)
        final = self.dir / name
        os.replace(tmp, final)
        fsync_dir(self.dir)
        write_bytes_atomic(self.dir / LATEST, name.encode())
        if is_best and self.cfg.keep_best:
            write_bytes_atomic(self.dir / BEST, name.encode())
        self._prune(final)
        self.parent = name

    def _prune(self, just_written: Path) -> None:
        protected = {just_written.name}
        for pointer in (LATEST, BEST):
            target = _pointer(self.run_dir, pointer)
            if target is not None:
                protected.add(target.name)
        found = complete(self.run_dir)
        good = [p.name for p, m in found if health(m) == GOOD]
        protected.update(good[-1:])  # keep-last never leaves only states that have not been seen to train on
        mine = [p for p, m in found if m.get("lineage") == self.lineage]
        keep = {p.name for p in mine[-max(self.cfg.keep_last, 1) :]} | protected
        others_expired = len(mine) >= self.cfg.keep_last
        for p, m in found:
            if p.name in keep or (m.get("lineage") != self.lineage and not others_expired):
                continue
            shutil.rmtree(p, ignore_errors=True)
            log.info("pruned checkpoint %s (step %d, lineage %d)", p.name, m["step"], m.get("lineage", 0))

    # -- health (decided at control steps, the same on every rank; rank 0 writes)

    def judge(self, first_bad: int, step: int) -> None:
        """After the steps up to ``step``: a save at step s is good when step s + 1 was done and was not the
        first divergent one (``first_bad``, 0: none); with a divergence, the saves after it are diverged."""
        keep = []
        for saved, name in self.unverified:
            if saved < step and (not first_bad or saved + 1 < first_bad):
                self._set_health(name, GOOD)
            elif first_bad:
                self._set_health(name, DIVERGED)
            else:
                keep.append((saved, name))
        self.unverified = keep

    def diverged(self, first_bad: int, step: int) -> Path | None:
        """Collective: judge this process's saves against the divergence at ``first_bad``; ``latest`` then names
        the newest good checkpoint (removed when there is none: a resume never starts from a diverged one).
        Returns that checkpoint, or None."""
        self.judge(first_bad, step)
        good = None
        if self.rank == 0:
            good = newest_good(self.run_dir)
            try:
                if good is not None:
                    write_bytes_atomic(self.dir / LATEST, good.name.encode())
                else:
                    (self.dir / LATEST).unlink(missing_ok=True)
            except OSError as e:
                log.warning("could not move %s to the last good checkpoint (%s)", self.dir / LATEST, e)
        good = self._broadcast(good and str(good))
        return Path(good) if good else None

    def _set_health(self, name: str, value: str) -> None:
        if self.rank != 0:
            return
        path = self.dir / name
        try:
            meta = read_meta(path)
            meta["health"] = value
            write_json_atomic(path / META, meta)  # meta.json is not among the checksummed files
        except (CheckpointError, OSError) as e:  # pruned meanwhile, or unwritable: the others still hold
            log.warning("could not mark checkpoint %s %s (%s)", name, value, e)

    # -- restore

    def restore(self, state: TrainState, resume: str | None) -> Path | None:
        """Collective: load ``resume`` (best, latest or a path; must verify) or, without it, the newest
        checkpoint that verifies, walking back from ``latest`` with a warning for each one skipped.
        Returns the checkpoint loaded, or None for a fresh start."""
        chosen, error = None, None
        if self.rank == 0:
            try:
                chosen = self._choose(resume)
            except UserError as e:
                error = str(e)
        chosen, error = self._broadcast((chosen and str(chosen), error))
        if error:
            raise CheckpointError(error)
        if chosen is None:
            return None
        path = Path(chosen)
        meta = read_meta(path)
        _check_classes(path, meta, state.config)
        same_layout = meta["layout"] == state.layout
        templates = state.tensor_templates(with_rng=same_layout)
        for key in [k for k in templates if k.startswith("rng.") and k.endswith(OPTIONAL_RNG)]:
            if key not in meta["tensors"]:
                del templates[key]  # a CPU run's checkpoint resumed on a GPU: the trainer reseeds the GPU's RNG
        tensors = read_tensors(path, list(templates))
        for key, want in templates.items():
            got = tensors[key]
            if got.shape != want.shape or got.dtype != want.dtype:
                raise CheckpointError(
                    f"{path}: {key} is {tuple(got.shape)} {got.dtype}, this run needs "
                    f"{tuple(want.shape)} {want.dtype}; use the checkpoint's model config "
                    "(--num-classes, widths) or a new --run-dir"
                )
        state.load_state_dict({"tensors": tensors, "meta": meta})
        if not same_layout and state.progress.step_in_epoch:
            # The epoch's sample order depends on dp_size: replaying the rest of a half-done epoch under
            # another layout would not be the same samples, so start the next epoch cleanly.
            log.warning(
                "layout changed (%s -> %s): resuming at the start of epoch %d",
                meta["layout"],
                state.layout,
                state.progress.epoch + 1,
            )
            state.progress = Progress(state.progress.epoch + 1, state.progress.step, 0)
        self._continue_lineage(path, meta)
        self.unverified = [(meta["step"], path.name)] if health(meta) == UNVERIFIED else []
        return path

    def _choose(self, resume: str | None) -> Path | None:
        if resume:
            path = resolve(self.run_dir, resume)
            check_permissions(path, self.cfg.allow_world_writable)
            reason = verify(path)
            if reason:
                raise CheckpointError(f"--resume {resume}: {path.name} {reason}; pass another checkpoint")
            if health(read_meta(path)) == DIVERGED:
                log.warning("--resume %s: %s is marked diverged (the step after it diverged)", resume, path.name)
            return path
        for path in candidates(self.run_dir):
            reason = verify(path)
            if reason is None:
                check_permissions(path, self.cfg.allow_world_writable)
                return path
            log.warning("skipping checkpoint %s: %s", path.name, reason)
        return None

    def _continue_lineage(self, path: Path, meta: dict[str, Any]) -> None:
        """Resuming from the newest checkpoint of a lineage continues it; from an older one starts a new one,
        recorded at once (with ``latest`` naming the checkpoint resumed) so a crash before the first save
        comes back here, not to the abandoned lineage."""
        self.parent = path.name
        found = complete(self.run_dir)
        same = [m["seq"] for _, m in found if m.get("lineage") == meta.get("lineage")]
        if same and meta["seq"] == max(same):
            self.lineage = meta.get("lineage", 0)
            return
        if self.rank == 0:
            self._start_lineage(found)
            write_bytes_atomic(self.dir / LATEST, path.name.encode())
            log.info(
                "resumed from %s, not the newest of its lineage: new lineage %d (the old one is kept "
                "until this one has %d checkpoints)",
                path.name,
                self.lineage,
                self.cfg.keep_last,
            )
        else:
            self.lineage = -1  # only rank 0 names lineages; other ranks never prune

    def _start_lineage(self, existing: list[tuple[Path, dict[str, Any]]]) -> None:
        self.lineage = 1 + max([m.get("lineage", 0) for _, m in existing] + [_current_lineage(self.run_dir) or 0])
        write_bytes_atomic(self.dir / LINEAGE, str(self.lineage).encode())


def _check_classes(path: Path, meta: dict[str, Any], config: Any) -> None:
    """A resume with another class count (another dataset) cannot load fc8: say what to do instead."""
    was = meta.get("config", {}).get("model", {}).get("num_classes")
    now = config.model.num_classes
    if was and now and was != now:
        data = meta.get("config", {}).get("data", {}).get("data")
        raise CheckpointError(
            f"{path}: its model has {was} classes and this run {now} (the dataset's count or --num-classes): a run "
            f"directory resumes only with the classes it was trained on; pass its dataset (--data {data}) or "
            "start a new --run-dir"
        )
