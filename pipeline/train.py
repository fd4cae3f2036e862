"""The training loop: AlexNet on DALI batches, DDP over data-parallel ranks x the paper's tower split.

Read ``Trainer.fit`` top to bottom: resume, then per epoch build the input pipeline for
(seed, epoch; this rank's lanes), step (``pipeline.train_step``: one batch's update, top to bottom), validate, let
the schedule react, checkpoint. ``build_trainer`` builds the parts, in the order the seeds need.
Everything that must happen on all ranks at once (a preemption signal, an operator's LR-drop or profile
request, a timed checkpoint, a divergence) is decided in one small all-reduce every ``control_every``
steps, so every rank acts at the same step boundary. A divergent update (non-finite or spiking loss or
gradient norm) is never applied: ``pipeline.faults.divergence`` decides on the device each step and fused
SGD skips it.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from basics.errors import UserError
from pipeline import config, data, model, perf, seeds
from pipeline.checkpoint import Checkpointer, NonFiniteState, Progress, TrainState, read_meta
from pipeline.config import RunConfig
from pipeline.data.sample_ledger import SampleLedger
from pipeline.faults import divergence, rerun
from pipeline.faults.stragglers import StragglerWatch
from pipeline.mesh import Mesh
from pipeline.metrics import EvalCounts, MetricWriter, StepTimer, count
from pipeline.phases import PhaseMarks
from pipeline.profiling import Profiler
from pipeline.run_dir import RunDir
from pipeline.schedule import LRSchedule, ManualRequests
from pipeline.train_log import StepRecord, TrainLog
from pipeline.train_step import FirstCompile, TrainStep, build_optimizer, wrap_ddp

log = logging.getLogger("alexnet")


@dataclass(frozen=True)
class Loaders:
    """Where batches come from: ``pipeline.data`` by default; tests pass their own (same signatures)."""

    train: Callable[..., Any] = data.train_loader
    val: Callable[..., Any] = data.val_loader


class Flag(IntEnum):
    """The control all-reduce's slots (MAX over ranks: any rank's request counts); straggler figures follow."""

    STOP = 0  # a signal, an interrupt or RUN_DIR/preempt.request: checkpoint and stop
    LR_DROP = 1  # an operator's LR-drop request is pending
    SAVE = 2  # a step or timed checkpoint is due
    NONFINITE = 3  # the first divergent step since the last control step (0: none; pipeline.faults.divergence)
    SAVE_FAILED = 4  # a background save failed on some rank
    PROFILE = 5  # an operator's profile request is pending (launch.profile)


class EpochEnd(Enum):
    """Why ``_train_epoch`` returned."""

    DONE = "done"  # every batch of the epoch
    STOPPED = "stopped"  # a stop request: checkpointed, the run ends here
    BUDGET = "budget"  # --max-steps reached
    ROLLBACK = "rollback"  # a divergence rolled the state back: the epoch's loader starts again where data goes on


@dataclass
class Outcome:
    progress: Progress
    preempted: bool
    val_top1_error: float | None
    lr_drops: list[dict[str, Any]]
    checkpoint: Path | None = None


class Trainer:
    """The loop around the step: epochs, validation, the control all-reduce, checkpoints (built by
    :func:`build_trainer`)."""

    def __init__(
        self,
        cfg: RunConfig,
        mesh: Mesh,
        device: torch.device,
        stop: threading.Event,
        *,
        train_step: TrainStep,
        state: TrainState,
        checkpointer: Checkpointer,
        writer: MetricWriter,
        train_log: TrainLog,
        stragglers: StragglerWatch,
        profiler: Profiler,
        local_batch: int,
        loaders: Loaders = Loaders(),
        heartbeat: Callable[[], None] | None = None,
    ):
        self.cfg, self.mesh, self.dims, self.device, self.stop = cfg, mesh, mesh.dims, device, stop
        self.train_step = train_step
        self.model, self.ddp, self.guard = train_step.model, train_step.ddp, train_step.guard
        self.marks = train_step.marks  # where this rank is (pipeline.phases): the watchdog, profiler, log read it
        self.state, self.schedule = state, state.schedule
        self.checkpointer, self.writer, self.train_log = checkpointer, writer, train_log
        self.stragglers, self.profiler = stragglers, profiler
        self.local_batch = local_batch
        self.loaders = loaders
        self.heartbeat = heartbeat  # the run dir's writer lease, refreshed by the main rank at each control step
        self.run_dir = RunDir(cfg.run_dir)
        self.requests = ManualRequests(self.run_dir.root)
        self.ahead = data.Ahead()  # the next epoch's plan and shard hashing, prepared during this one
        self.last_checkpoint: Path | None = None
        self.ledger: SampleLedger | None = None  # --train.record-samples: each step's sample keys
        self.bad_batches = rerun.BadBatches()  # batches skipped for diverging again when re-run (read at resume)
        self._control_step = 0  # the step of the last control all-reduce (the straggler figures are per step)

    @property
    def progress(self) -> Progress:
        return self.state.progress

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: str | None = None) -> Outcome:
        self._resume(resume)
        self.bad_batches = rerun.BadBatches.load(self.run_dir, self.guard)
        if self.bad_batches and self.dims.is_main:
            log.info(
                "%d batches skipped before are skipped again here (%s)", len(self.bad_batches), self.run_dir.bad_batches
            )
        cfg = self.cfg.train
        if cfg.record_samples:
            d = self.dims
            self.ledger = SampleLedger.open(
                self.run_dir,
                rank=d.rank,
                dp_rank=d.dp_rank,
                dp_size=d.dp_size,
                tp_rank=d.tp_rank,
                from_step=self.progress.step,
            )
        val_error = None
        self.train_log.start(self.progress.step)
        self.profiler.step(self.progress.step)  # a --profile.steps window may open at once
        while self.progress.epoch < cfg.epochs and not self._step_budget_spent():
            epoch = self.progress.epoch
            if self.schedule.on_epoch_start(epoch=epoch, step=self.progress.step):
                self._log_drop()
            # A mid-epoch resume starts the epoch's order at the next batch, without decoding the ones before.
            self.marks.enter("loader", self.progress.step)
            loader = self.loaders.train(
                self.cfg.data,
                dp_rank=self.dims.dp_rank,
                dp_size=self.dims.dp_size,
                epoch=epoch,
                seed=cfg.seed,
                device=self.device,
                batch_size=self.local_batch,
                num_classes=self.cfg.model.num_classes,
                start_batch=self.progress.step_in_epoch,
                ahead=self.ahead,
            )
            steps_in_epoch = loader.steps_in_epoch
            end = self._train_epoch(loader, steps_in_epoch)
            if end is EpochEnd.STOPPED:
                return self._outcome(True, val_error)
            if end is EpochEnd.BUDGET:
                break
            if end is EpochEnd.ROLLBACK:
                continue
            self.state.progress = Progress(epoch + 1, self.progress.step, 0)
            if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
                val_error = self.validate(epoch)
                if self.schedule.on_validation(top1_error=val_error, epoch=epoch, step=self.progress.step):
                    self._log_drop()
            is_best = self._is_best(val_error)
            if is_best or self.checkpointer.epoch_due(epoch + 1):  # a new best is always kept
                self._save(is_best=is_best)
        if self.checkpointer.last_saved_step != self.progress.step:  # stopped by --max-steps: keep the state
            self._save(is_best=False)
        self.marks.enter("checkpoint")
        self.checkpointer.wait()  # a background save is on disk before the run says it is done
        self.writer.hparams(
            _flat_hparams(self.cfg), {"hparam/val_top1_error": val_error if val_error is not None else -1}
        )
        self.writer.close()
        return self._outcome(False, val_error)

    def _outcome(self, preempted: bool, val_error: float | None) -> Outcome:
        self.ahead.close()
        if self.ledger is not None:
            self.ledger.close()
        self.profiler.close(self.progress.step)
        self.writer.close()  # a stopped run too: no thread of the run outlives it (launch.train names one)
        return Outcome(self.progress, preempted, val_error, self.schedule.drops, self.last_checkpoint)

    def _train_epoch(self, loader: Any, steps_in_epoch: int) -> EpochEnd:
        self.ddp.train()
        timer = StepTimer()
        batches = self.marks.iterate(loader, "data", first="loader")  # the first batch waits for the pipeline's start
        for i, (images, labels) in enumerate(batches, start=self.progress.step_in_epoch):
            timer.data_ready()
            step = self.progress.step  # the steps done before this batch
            lr = self.schedule.lr(self.progress.epoch + i / max(steps_in_epoch, 1)) * self.guard.lr_scale
            batch = (self.progress.epoch, i, self.cfg.optim.batch_size)
            known_bad, skips = batch in self.bad_batches, len(self.guard.skipped)
            weight = _loss_weight(loader, i, images.shape[0], self.dims.dp_size, self.cfg.optim.batch_size)
            loss, logits = self.train_step(images, labels, lr=lr, step=step, known_bad=known_bad, loss_weight=weight)
            if self.ledger is not None:
                self.ledger.record(epoch=self.progress.epoch, step=step, step_in_epoch=i, keys=loader.batch_keys(i))
            self._settle_skips(loader, batch, step + 1, known_bad, skips)
            self.progress.step, self.progress.step_in_epoch = step + 1, i + 1
            timer.step_done(images.shape[0] * self.dims.dp_size)
            if self.train_log.due(step):
                self._log_step(loss, logits, labels, images, lr, steps_in_epoch, timer)
            end = self._between_steps(last=i + 1 == steps_in_epoch)
            if end is not None:
                return end
        return EpochEnd.DONE

    def _between_steps(self, last: bool) -> EpochEnd | None:
        """What each step boundary may hold: the control all-reduce (saves go through it, so a divergence is
        never checkpointed), a profiler window's start or end, the step budget."""
        step = self.progress.step
        save_due = self.checkpointer.step_due(step) and not last  # the epoch end saves anyway
        control_due = step % self.cfg.train.control_every == 0 or last or self._step_budget_spent()
        if control_due or save_due:
            end = self._control(save_now=save_due)
            if end is not None:
                return end
        self.profiler.step(step)  # opens or closes a profiler window; nothing otherwise
        return EpochEnd.BUDGET if self._step_budget_spent() else None

    def _control(self, save_now: bool = False) -> EpochEnd | None:
        """One all-reduce decides for every rank: stop (signal), LR drop (request), save (timer), divergence.

        Returns STOPPED when the run must stop (checkpointed) for preemption or an interrupt, ROLLBACK after a
        divergence rolled the state back.
        """
        main = self.dims.is_main
        if main and self.heartbeat is not None:
            self.heartbeat()
        pending = self.requests.pending() if main else []
        profile_pending = self.profiler.requests.pending() if main else []
        self.marks.enter("control", self.progress.step)
        n = len(Flag)
        flags = torch.zeros(n + self.stragglers.slots(), device=self.device)
        self.stragglers.fill(flags[n:], self.marks.take_seconds(), self.progress.step - self._control_step)
        self._control_step = self.progress.step
        flags[Flag.STOP] = float(self.stop.is_set() or (main and self.run_dir.preempt_request.exists()))
        flags[Flag.LR_DROP] = float(bool(pending))
        flags[Flag.SAVE] = float(save_now or (main and self.checkpointer.time_due()))
        flags[Flag.NONFINITE] = self.guard.pending
        flags[Flag.SAVE_FAILED] = float(self.checkpointer.failed())  # a background save failed on this rank
        flags[Flag.PROFILE] = float(bool(profile_pending))
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        values = flags.tolist()
        stop, drop, save_due, bad, save_failed, profile = (bool(values[f]) for f in Flag)
        self.writer.scalars(self.stragglers.observe(values[n:]), self.progress.step)
        if save_failed or bad:
            self.checkpointer.wait()  # raises a failed save's error on every rank; lets a good one finish
        if bad:  # acted on from the first step of a streak of skips, if one led to it (the state is at fault)
            self._diverged(self.guard.streak_first or int(values[Flag.NONFINITE]))  # raises, unless it rolled back
            return EpochEnd.ROLLBACK
        if not self.guard.streak_first:  # during a streak of skips the state is not yet known to be good
            self.checkpointer.mark_health(0, self.progress.step)  # the saves before this step have trained on
        if drop:
            self._manual_drop(pending)
        if profile:
            self.profiler.begin(self.progress.step, profile_pending)
        if stop:
            self._save(is_best=False)
            self.checkpointer.wait()
            if main:
                self.run_dir.preempt_request.unlink(missing_ok=True)
                log.warning(
                    "stopped at epoch %d, step %d (%d steps into the epoch): checkpoint %s; run the same "
                    "command to continue",
                    self.progress.epoch,
                    self.progress.step,
                    self.progress.step_in_epoch,
                    self.last_checkpoint,
                )
            return EpochEnd.STOPPED
        if save_due:
            self._save(is_best=False)
        return None

    def _manual_drop(self, pending: list[Path]) -> None:
        """Apply an operator's request on every rank; rank 0 records what became of each request file."""
        step, epoch = self.progress.step, self.progress.epoch
        applied = self.schedule.drop(step=step, epoch=epoch, reason="manual")
        if applied:
            self._log_drop()
        if not self.dims.is_main:
            return
        note = self.requests.settle(pending, step=step, applied=applied, max_drops=self.cfg.schedule.max_drops)
        if note:
            log.warning("%s", note)
            self.writer.text("lr_drop_requests", note, step)

    def _settle_skips(self, loader: Any, batch: rerun.BatchId, step: int, known_bad: bool, skips: int) -> None:
        """After a step (``step`` counts it): a batch skipped before is skipped again (a resume from before its
        skip), counted again; a divergent step's re-run in place is acted on (pipeline.faults.rerun)."""
        epoch, index, batch_size = batch
        if known_bad:
            self.guard.skip(step=step, epoch=epoch, batch=index, batch_size=batch_size, known=True)
            if self.dims.is_main:
                log.warning(
                    "step %d: batch %d of epoch %d skipped, as before (it diverged again when re-run; %s)",
                    step,
                    index,
                    epoch,
                    self.run_dir.bad_batches,
                )
        elif self.train_step.rerun is not None:
            keys = _batch_keys_or_none(loader, index)
            rank = self.dims.rank
            rerun.settle(
                self.train_step.rerun,
                self.guard,
                self.bad_batches,
                self.run_dir,
                keys,
                rank=rank,
                epoch=epoch,
                batch=index,
                batch_size=batch_size,
            )
        if len(self.guard.skipped) != skips:
            self.writer.scalars({"train/batches_skipped": len(self.guard.skipped)}, step)

    def _step_budget_spent(self) -> bool:
        return 0 < self.cfg.train.max_steps <= self.progress.step

    # ------------------------------------------------------------------ evaluation

    def validate(self, epoch: int) -> float:
        """Top-1/top-5 error over every val image exactly once (counts all-reduced over dp ranks)."""
        ten_crop = self.cfg.train.ten_crop
        self.marks.enter("loader", self.progress.step)  # until the first batch: the pipeline's start
        loader = self.loaders.val(
            self.cfg.data,
            dp_rank=self.dims.dp_rank,
            dp_size=self.dims.dp_size,
            device=self.device,
            ten_crop=ten_crop,
            batch_size=self.local_batch,
            num_classes=self.cfg.model.num_classes,
        )
        # The towers compute collectively, so both tp ranks run the model; their counts are equal.
        amp = self.cfg.train.amp == "bf16"
        first = "compile" if self.train_step.compiles.take("validation") else None  # eval mode recompiles
        batches = self.marks.ticking(loader, "validation", first=first)
        totals = count(self.model, batches, ten_crop=ten_crop, amp=amp)
        totals_t = totals.as_tensor(self.device)
        if self.mesh.dp_group is not None and self.dims.dp_size > 1:
            self.marks.enter("validation-sync")  # every rank, whatever its number of batches
            dist.all_reduce(totals_t, group=self.mesh.dp_group)
        result = EvalCounts.from_tensor(totals_t).summary()
        self.train_log.validation(epoch, self.progress.step, result, ten_crop)
        return result["top1_error"]

    def _is_best(self, val_error: float | None) -> bool:
        best = self.state.best_top1_error
        if val_error is None or (best is not None and val_error >= best):
            return False
        self.state.best_top1_error = val_error
        return True

    # ------------------------------------------------------------------ checkpoints

    def _save(self, is_best: bool) -> None:
        self.marks.enter("checkpoint", self.progress.step)
        path = self.checkpointer.save(self.state, self.device, is_best=is_best)
        self.last_checkpoint = path
        if self.dims.is_main:
            log.info("checkpoint %s (epoch %d, step %d)", path, self.progress.epoch, self.progress.step)

    def _resume(self, resume: str | None) -> None:
        path = self.checkpointer.restore(self.state, resume)
        if path is None:
            return
        self.last_checkpoint = path
        restored, cuda = self.state.rng_restored, self.device.type == "cuda"
        seeds.after_resume(self.cfg.train.seed, self.dims.dp_rank, self.progress.step, restored, cuda)
        meta = read_meta(path)
        was_lr = config.upgrade(meta["config"]).get("optim", {}).get("lr")
        why_lr = divergence.lr_scale_on_resume(self.guard, was_lr=was_lr, now_lr=self.cfg.optim.lr)
        if self.dims.is_main:
            log.info(
                "resumed from %s: epoch %d, step %d, lr drops %d, rollbacks %d",
                path,
                self.progress.epoch,
                self.progress.step,
                len(self.schedule.drops),
                len(self.guard.rollbacks),
            )
            lr = self.schedule.lr(self.progress.epoch) * self.guard.lr_scale
            log.info(
                "training at learning rate %g: --optim.lr %g, the schedule's drops, %s", lr, self.cfg.optim.lr, why_lr
            )
            changed = config.changes(meta["config"], self.cfg.to_dict())
            was, now = meta.get("dataset", {}).get("manifest_sha256"), self.state.dataset["manifest_sha256"]
            if was and was != now:
                changed.append(f"the dataset's manifest.json (sha256) {was} -> {now}")
            if changed:
                log.warning("resumed with settings that differ from %s's: %s", path.name, "; ".join(changed))

    def _diverged(self, first_bad: int) -> None:
        """Every rank: stop with one line naming the good checkpoint, or roll back (``--faults.divergence.action``)."""
        event = self.guard.event()
        step = self.progress.step
        good = self.checkpointer.fall_back_to_good(first_bad, step)
        good_step = read_meta(good)["progress"]["step"] if good is not None else None
        plan, why = divergence.rollback_plan(self.guard, event, good=good, good_step=good_step, step=step)
        if plan is None:
            mode = self.cfg.faults.divergence.action
            raise NonFiniteState(divergence.stop_line(event, good, why, mode, self.guard.streak_first))
        progress = Progress(**vars(self.progress))  # the data goes on after the batches that diverged
        history, skipped = self.guard.rollbacks, self.guard.skipped
        self.checkpointer.restore(self.state, str(good))
        self.state.progress = progress
        self.guard.rolled_back(plan, history, skipped)
        self.train_log.rollback(plan, len(self.guard.rollbacks), self.cfg.faults.divergence.max_rollbacks, step)
        self._save(is_best=False)  # the rollback and the skipped range are on disk: a resume skips them too

    # ------------------------------------------------------------------ logging

    def _log_step(
        self, loss: Any, logits: Any, labels: Any, images: Any, lr: float, steps: int, timer: StepTimer
    ) -> None:
        """A logged step (every ``--train.log-every``): reading the loss and the gradient norm syncs."""
        p, grad_norm = self.progress, float(self.guard.grad_norm)
        record = StepRecord(p.epoch, p.step, p.step_in_epoch, steps, loss, logits, labels, images, lr, grad_norm)
        self.train_log.step(record, timer)
        timer.reset()

    def _log_drop(self) -> None:
        self.train_log.lr_drop(self.schedule.drops[-1], len(self.schedule.drops))


def build_trainer(
    cfg: RunConfig,
    mesh: Mesh,
    device: torch.device,
    stop: threading.Event,
    loaders: Loaders = Loaders(),
    heartbeat: Callable[[], None] | None = None,
    marks: PhaseMarks | None = None,
) -> Trainer:
    """Every part of a run on this rank. The order is part of the result: the model's initial weights and
    the dropout masks come from the seeds set around the model's construction, and every rank runs the
    collectives (DDP's broadcast, the checkpointer's group, the host names) in the same order."""
    dims, run_dir = mesh.dims, Path(cfg.run_dir)
    marks = marks or PhaseMarks()  # where this rank is (pipeline.phases): the watchdog, profiler, log read it
    seeds.seed_init(cfg.train.seed, dims.rank)
    net = model.build_model(cfg.model, tp_group=mesh.tp_group).to(device)
    seeds.seed_dropout(cfg.train.seed, dims.dp_rank)  # a pair shares masks, replicas do not
    # Phase seconds as the device spent them (CUDA events on a GPU): stragglers, data wait, TensorBoard.
    marks.time_on(device)
    ddp = wrap_ddp(net, mesh, device, cfg.train.grad_compression)
    optimizer = build_optimizer(net, cfg.optim)
    layout = {"world_size": dims.world_size, "dp_size": dims.dp_size, "tp_size": dims.tp_size}
    schedule = LRSchedule(cfg.schedule, cfg.optim.lr)
    guard = divergence.DivergenceGuard(
        cfg.faults.divergence, device, rank=dims.rank, world_size=dims.world_size, dp_size=dims.dp_size
    )
    state = TrainState(
        net,
        optimizer,
        schedule,
        cfg,
        layout,
        rank=dims.rank,
        tp_rank=dims.tp_rank,
        towers=cfg.model.towers,
        divergence=guard,
        dataset=_dataset_identity(cfg.data.data),
    )
    checkpointer = Checkpointer(run_dir, cfg.checkpoint, dims.rank, marks=marks)
    writer = MetricWriter(run_dir, enabled=dims.is_main)
    train_log = TrainLog(
        writer,
        cfg.train,
        is_main=dims.is_main,
        device=device,
        named_parameters=lambda: dict(net.named_parameters()),
        conv1_filters=lambda: [f.detach().cpu() for f in model.unwrap(net).conv1_filters()],  # collective, tp=2
        throughput=perf.Throughput(
            perf.forward_flops_per_image(cfg.model),
            dims.world_size,
            perf.peak_tflops(device, cfg.train.amp, cfg.profile.peak_tflops),
        ),
        phase_seconds=marks.window().take,
    )
    local_batch = _local_batch(cfg.optim.batch_size, dims.dp_size)
    stragglers = StragglerWatch(
        dims.rank,
        dims.world_size,
        _hosts(),
        cfg.faults.stragglers.threshold,
        cfg.faults.stragglers.window,
        tp_size=dims.tp_size,
    )
    profiler = Profiler(
        run_dir, cfg.profile, rank=dims.rank, is_main=dims.is_main, device=device, marks=marks, layout=layout
    )
    compiles = FirstCompile(cfg.model.compile)
    train_step = TrainStep(
        net,
        ddp,
        optimizer,
        guard,
        marks,
        device=device,
        amp=cfg.train.amp == "bf16",
        compiles=compiles,
        rerun_divergent=cfg.faults.divergence.rerun,
    )
    return Trainer(
        cfg,
        mesh,
        device,
        stop,
        train_step=train_step,
        state=state,
        checkpointer=checkpointer,
        writer=writer,
        train_log=train_log,
        stragglers=stragglers,
        profiler=profiler,
        local_batch=local_batch,
        loaders=loaders,
        heartbeat=heartbeat,
    )


def _batch_keys_or_none(loader: Any, i: int) -> list[str]:
    """The sample keys of batch ``i`` (to record a bad batch by), or [] from a loader that does not name them."""
    try:
        return loader.batch_keys(i)
    except (AttributeError, NotImplementedError):
        return []


def _hosts() -> list[str]:
    """Every global rank's host name (one collective at start; for the straggler line)."""
    host = socket.gethostname()
    if not dist.is_initialized():
        return [host]
    hosts: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(hosts, host)
    return hosts


def _dataset_identity(path: str) -> dict[str, Any]:
    """The dataset a checkpoint was trained on: its path and its manifest's sha256 (a rebuilt dataset differs)."""
    try:
        digest = hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()[:16]
    except OSError:
        digest = "unreadable"
    return {"path": str(path), "manifest_sha256": digest}


def _loss_weight(loader: Any, i: int, local: int, dp_size: int, global_batch: int) -> float:
    """What this rank's mean loss is multiplied by before backward so that DDP's average over the dp ranks is
    the mean over the global batch: its share of the batch times the dp size. 1 wherever the slices are equal;
    an epoch's short last batch is cut into unequal slices (pipeline.data's lanes), whose samples would
    otherwise weigh by the dp size that takes it (a resume on another dp size must train the same update)."""
    total = getattr(loader, "total", None)  # the split's size (a test's stand-in loader may not know it)
    if total is None:
        return 1.0
    in_batch = min(global_batch, total - i * global_batch)  # the global batch's samples, the last one short
    return local * dp_size / in_batch if in_batch > 0 else 1.0  # exactly 1.0 for a full batch cut evenly


def _local_batch(global_batch: int, dp_size: int) -> int:
    if global_batch % dp_size:
        raise UserError(f"--batch-size {global_batch} is not divisible by the data-parallel size {dp_size}")
    return global_batch // dp_size


def _flat_hparams(cfg: RunConfig) -> dict[str, Any]:
    flat = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    return flat


def write_run_config(cfg: RunConfig) -> None:
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    config.save(cfg, Path(cfg.run_dir))
