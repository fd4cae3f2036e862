"""The checkpointer: when to save, the collective save (atomic, async or not), health, retention, restore.

Every rank writes its own files with torch.distributed.checkpoint; rank 0 then checksums them, writes
meta.json, renames the directory into place and only then moves ``latest``: a checkpoint appears whole or
not at all. An automatic resume walks back from ``latest`` to the newest checkpoint that verifies.

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

import logging
import os
import shutil
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from basics.errors import UserError
from basics.files import fsync_dir, write_bytes_atomic, write_json_atomic
from pipeline.checkpoint.catalogue import (
    BEST,
    DIVERGED,
    FORMAT_VERSION,
    GOOD,
    LATEST,
    LINEAGE,
    META,
    UNFINISHED,
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
from pipeline.checkpoint.config import CheckpointConfig
from pipeline.checkpoint.errors import CheckpointError, NonFiniteState
from pipeline.checkpoint.integrity import check_permissions, file_sha256, read_tensors, verify
from pipeline.checkpoint.state import OPTIONAL_RNG, Progress, TrainState
from pipeline.checkpoint.writer import MarkPhase, PhaseMarkingWriter
from pipeline.data.epoch_plan import SAMPLE_ORDER
from pipeline.goodput.interval import AutoInterval, history
from pipeline.goodput.ledger import read_records
from pipeline.options import AUTO
from pipeline.phases import PhaseMarks
from pipeline.run_dir import RunDir

if TYPE_CHECKING:
    from pipeline.config import RunConfig

log = logging.getLogger("alexnet")

# A one-process run writes its checkpoint alone on purpose (``no_dist`` below); PyTorch still warns on every
# save that it is "assuming the intent", which users read as something being wrong. Only that message is
# silenced (a filter, not catch_warnings: background saves run in another thread).
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to save"
)


def _first_line(e: BaseException) -> str:
    """The error's line. DCP's CheckpointException holds every failed rank's traceback, whose source lines
    may say "Error" before the error does: it is named by its first failed rank's own exception instead
    (a full disk: "rank 0: OSError: [Errno 28] No space left on device: '.../__0_0.distcp'")."""
    if isinstance(e, CheckpointException) and e.failures:
        rank = min(e.failures)
        inner = e.failures[rank][0] if isinstance(e.failures[rank], tuple) else e.failures[rank]
        return f"rank {rank}: {traceback.format_exception_only(type(inner), inner)[-1].strip()[:300]}"
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
        self.dir = RunDir(run_dir).checkpoints
        self.cfg = cfg
        self.rank = rank
        self.group = process_group
        self.lineage: int | None = None  # set by restore(); None: a fresh lineage at the first save
        self.parent: str | None = None  # the checkpoint the live state descends from
        self.last_saved_step: int | None = None
        self.unverified: list[tuple[int, str]] = []  # (step, name): this process's saves of unknown health
        self.clock = time.monotonic  # the time decision's clock (a test drives it)
        self._last_save = self.clock()
        self._pending: _PendingSave | None = None
        self.restore_s = 0.0  # the last restore's seconds, and the background saves' (pipeline.goodput reads them)
        self.background_s = 0.0
        self.saves, self.save_stall_s = 0, 0.0  # this attempt's saves and the loop's stall in them (pipeline.goodput)
        self.auto = auto_interval(self.run_dir, cfg) if cfg.every_minutes == AUTO and rank == 0 else None
        if self.auto is not None:
            self.auto.minutes()  # says the interval and why in the log, at start
        # Collective (every rank builds its Checkpointer at the same point): a CPU group for background saves.
        self._save_group = dist.new_group(backend="gloo") if cfg.async_save and dist.is_initialized() else None

    # -- when

    def time_due(self) -> bool:
        """Global rank 0's clock decides; the trainer shares the decision with every rank."""
        minutes = self.interval_minutes()
        return minutes > 0 and self.clock() - self._last_save >= 60 * minutes

    def interval_minutes(self) -> float:
        """``--checkpoint.every-minutes``, or under ``auto`` the interval it picks now (0 on the ranks that do
        not decide)."""
        if self.cfg.every_minutes != AUTO:
            return self.cfg.every_minutes
        return self.auto.minutes() if self.auto is not None else 0.0

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
        began = self.clock()
        path = self._save(state, device, is_best)
        stall = self.clock() - began  # what the loop waited (under async_save: the copy, and the previous write)
        self.saves, self.save_stall_s = self.saves + 1, self.save_stall_s + stall
        if self.auto is not None:
            self.auto.saved(stall)
        return path

    def _save(self, state: TrainState, device: torch.device, is_best: bool) -> Path:
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
                name = self._reserve_name(step)
            except OSError as e:
                error = f"cannot create a checkpoint in {self.dir} ({e.strerror or e})"
        name, error = self._broadcast((name, error))
        if error:
            raise CheckpointError(f"{error}; nothing was written, free space or fix permissions and re-run")
        self._mark("checkpoint")  # the copy to host memory, then the write's own markers
        tensors = state.tensors(copy=self.cfg.async_save)
        meta = {**state.meta(), "step": step, "health": UNVERIFIED}
        self._last_save = self.clock()
        self.last_saved_step = step
        if not self.cfg.async_save:
            self._settle_save(step, name, self._write(name, tensors, meta, is_best, self.group, self._mark))
            return self.dir / name
        pending = _PendingSave(step, name)

        def write() -> None:
            # Only the training thread marks phases: the writer's go to `pending.phase`, which wait() shows.
            began = time.monotonic()
            pending.error = self._write(
                name, tensors, meta, is_best, self._async_group(), lambda phase, alone: setattr(pending, "phase", phase)
            )
            self.background_s += time.monotonic() - began

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
            self._settle_save(pending.step, pending.name, pending.error)

    def _write(
        self,
        name: str,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        is_best: bool,
        group: dist.ProcessGroup | None,
        phase: MarkPhase,
    ) -> str | None:
        """Every rank writes its files; rank 0 then checksums, commits and prunes. The error, or None."""
        tmp = self.dir / (name + UNFINISHED)
        try:
            written = dcp.save(
                tensors,
                storage_writer=PhaseMarkingWriter(str(tmp), phase),
                process_group=group,
                no_dist=not dist.is_initialized(),
            )
            error = None
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            written, error = None, _first_line(e) + _space_hint(self.dir, sum(t.nbytes for t in tensors.values()))
        if self.rank == 0:
            if error is None:
                phase("checkpoint", True)  # checksums and commit, while the others wait in _settle_save
                try:
                    self._commit(tmp, name, meta, written, is_best)
                except OSError as e:
                    error = f"{e.strerror or e} ({getattr(e, 'filename', '') or tmp})"
            if error is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return error

    def _settle_save(self, step: int, name: str, error: str | None) -> None:
        """Collective: every rank learns of a failure on any rank (and raises it); a save that succeeded
        everywhere becomes the live state's parent and waits for its health (:meth:`mark_health`)."""
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

    def _async_group(self) -> dist.ProcessGroup | None:
        """Background saves talk over a gloo group of their own: never interleaved with training's collectives."""
        if dist.is_initialized() and self._save_group is None:
            raise RuntimeError("Checkpointer built without its save group")
        return self._save_group

    def _reserve_name(self, step: int) -> str:
        """Rank 0: remove leftovers of killed saves, pick an unused name, create its temporary directory."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in self.dir.glob("*" + UNFINISHED):
            shutil.rmtree(p, ignore_errors=True)
        name, n = step_name(step), 0
        while (self.dir / name).exists():
            n += 1
            name = f"{step_name(step)}-{n}"
        (self.dir / (name + UNFINISHED)).mkdir()
        return name

    def _commit(self, tmp: Path, name: str, meta: dict[str, Any], written: Metadata, is_best: bool) -> None:
        """Rank 0, after every rank's data is on disk: checksums + index, rename, move the pointers, prune."""
        existing = readable(self.run_dir)
        if self.lineage is None:
            self._start_lineage(existing)
        files = {
            p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
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
            target = pointed_to(self.run_dir, pointer)
            if target is not None:
                protected.add(target.name)
        found = readable(self.run_dir)
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

    def mark_health(self, first_bad: int, step: int) -> None:
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

    def fall_back_to_good(self, first_bad: int, step: int) -> Path | None:
        """Collective: mark this process's saves against the divergence at ``first_bad``; ``latest`` then names
        the newest good checkpoint (removed when there is none: a resume never starts from a diverged one).
        Returns that checkpoint, or None."""
        self.mark_health(first_bad, step)
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
        began = time.monotonic()
        chosen, error = None, None
        if self.rank == 0:
            try:
                chosen = self._choose_resume(resume)
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
        if state.progress.step_in_epoch:
            self._continue_epoch(meta, state)
        self._continue_lineage(path, meta)
        self.unverified = [(meta["step"], path.name)] if health(meta) == UNVERIFIED else []
        self.restore_s = time.monotonic() - began
        return path

    def _continue_epoch(self, meta: dict[str, Any], state: TrainState) -> None:
        """A mid-epoch checkpoint goes on at its next global step, on any dp size: the epoch's order does not
        depend on it. What the order cannot continue (an order from before, another global batch) starts
        the next epoch, saying why."""
        was = meta.get("sample_order")
        batch = meta.get("config", {}).get("optim", {}).get("batch_size")
        why = None
        if was != SAMPLE_ORDER:
            why = f"the checkpoint's epoch order ({was or 'per dp rank: an earlier version'}) is not {SAMPLE_ORDER}"
        elif batch != state.config.optim.batch_size:
            why = f"the global batch changed ({batch} -> {state.config.optim.batch_size})"
        if why is None:
            if meta["layout"] != state.layout:
                log.info(
                    "layout changed (%s -> %s): epoch %d goes on at step %d, sample %d",
                    meta["layout"],
                    state.layout,
                    state.progress.epoch,
                    state.progress.step_in_epoch,
                    state.progress.step_in_epoch * state.config.optim.batch_size,
                )
            return
        log.warning("%s: resuming at the start of epoch %d", why, state.progress.epoch + 1)
        state.progress = Progress(state.progress.epoch + 1, state.progress.step, 0)

    def _choose_resume(self, resume: str | None) -> Path | None:
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
        found = readable(self.run_dir)
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
        self.lineage = 1 + max([m.get("lineage", 0) for _, m in existing] + [recorded_lineage(self.run_dir) or 0])
        write_bytes_atomic(self.dir / LINEAGE, str(self.lineage).encode())


def auto_interval(run_dir: Path, cfg: CheckpointConfig) -> AutoInterval:
    """``--checkpoint.every-minutes auto``'s interval, with what this run's ledger says of earlier attempts."""
    return AutoInterval(cfg.mtbf_hours, history(read_records(RunDir(run_dir).goodput_ledger), os.getpid()))


def _check_classes(path: Path, meta: dict[str, Any], config: RunConfig) -> None:
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
