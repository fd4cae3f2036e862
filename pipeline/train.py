"""The training loop: AlexNet on DALI batches, DDP over data-parallel ranks x the paper's tower split.

Read ``Trainer.fit`` top to bottom: resume, then per epoch build the input pipeline for
(seed, dp_rank, epoch), step, validate, let the schedule react, checkpoint. Everything that must
happen on all ranks at once (a preemption signal, an operator's LR-drop request, a timed
checkpoint, a NaN) is decided in one small all-reduce every ``control_every`` steps, so every rank
acts at the same step boundary.
"""

from __future__ import annotations

import logging
import math
import pickle
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import checkpoint as ckpt
from pipeline import evaluate
from pipeline import config as config_mod
from pipeline import data as data_mod
from pipeline import model as model_mod
from pipeline.config import RunConfig
from pipeline.mesh import Mesh
from pipeline.metrics import MetricWriter, StepTimer, format_eta, topk_correct
from pipeline.schedule import LRSchedule, take_manual_request
from preprocess.errors import UserError
from preprocess.format import read_manifest

log = logging.getLogger("alexnet")

PREEMPT_REQUEST = "preempt.request"


class NonFiniteLoss(UserError):
    """Training diverged; the last good checkpoint is kept."""


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress (or the next one, at an epoch boundary)
    step: int = 0  # optimizer steps taken since the start of training
    step_in_epoch: int = 0  # steps of ``epoch`` already taken


@dataclass
class Outcome:
    progress: Progress
    preempted: bool
    val_top1_error: float | None
    lr_drops: list[dict[str, Any]]


class Trainer:
    def __init__(self, cfg: RunConfig, mesh: Mesh, device: torch.device, stop: threading.Event,
                 heartbeat: Callable[[], None] | None = None):
        self.cfg = cfg
        self.heartbeat = heartbeat  # the run dir's writer lease, refreshed by the main rank at each control step
        self.mesh = mesh
        self.dims = mesh.dims
        self.device = device
        self.stop = stop
        self.run_dir = Path(cfg.run_dir)
        self.manifest = read_manifest(cfg.data.data)

        _seed_everything(cfg.train.seed, self.dims.rank)
        self.model = model_mod.build_model(cfg.model, tp_group=mesh.tp_group).to(device)
        if cfg.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp = self._wrap_ddp(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                         weight_decay=cfg.optim.weight_decay)
        self.schedule = LRSchedule(cfg.schedule, cfg.optim.lr)
        self.checkpointer = ckpt.Checkpointer(self.run_dir, cfg.checkpoint, self.dims.rank)
        self.writer = MetricWriter(self.run_dir, enabled=self.dims.is_main)
        self.progress = Progress()
        self.best_top1_error: float | None = None
        self.local_batch = _local_batch(cfg.optim.batch_size, self.dims.dp_size)

    def _wrap_ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.dims.dp_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, process_group=self.mesh.dp_group)

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: str | None = None) -> Outcome:
        self._resume(resume)
        cfg = self.cfg.train
        val_error = None
        start = time.monotonic()
        start_step = self.progress.step
        while self.progress.epoch < cfg.epochs and not self._step_budget_spent():
            epoch = self.progress.epoch
            if self.schedule.on_epoch_start(epoch=epoch, step=self.progress.step):
                self._log_drop()
            loader = data_mod.train_loader(self.cfg.data, dp_rank=self.dims.dp_rank, dp_size=self.dims.dp_size,
                                           epoch=epoch, seed=cfg.seed, device=self.device,
                                           batch_size=self.local_batch, num_classes=self.cfg.model.num_classes)
            steps_in_epoch = len(loader)
            stopped = self._train_epoch(loader, steps_in_epoch, start, start_step)
            if stopped == "preempt":
                return Outcome(self.progress, True, val_error, self.schedule.drops)
            if stopped == "budget":
                break
            self.progress = Progress(epoch + 1, self.progress.step, 0)
            if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
                val_error = self.validate(epoch)
                if self.schedule.on_validation(top1_error=val_error, epoch=epoch, step=self.progress.step):
                    self._log_drop()
            self._save(is_best=self._is_best(val_error))
        if self.progress.step_in_epoch:  # stopped by --max-steps mid-epoch: keep the state
            self._save(is_best=False)
        self.writer.hparams(_flat_hparams(self.cfg), {"hparam/val_top1_error": val_error if val_error is not None else -1})
        self.writer.close()
        return Outcome(self.progress, False, val_error, self.schedule.drops)

    def _train_epoch(self, loader: Any, steps_in_epoch: int, run_start: float, run_start_step: int) -> str | None:
        cfg = self.cfg.train
        self.ddp.train()
        timer = StepTimer()
        skip = self.progress.step_in_epoch  # a mid-epoch resume replays the epoch's order and skips ahead
        nonfinite = torch.zeros((), device=self.device)
        for i, (images, labels) in enumerate(loader):
            if i < skip:
                timer.reset()
                continue
            timer.data_ready()
            lr = self.schedule.lr(self.progress.epoch + i / max(steps_in_epoch, 1))
            for group in self.optimizer.param_groups:
                group["lr"] = lr

            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                logits = self.ddp(images)
            loss = F.cross_entropy(logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nonfinite = torch.maximum(nonfinite, (~torch.isfinite(loss.detach())).float())
            log_now = self.progress.step % cfg.log_every == 0
            grad_norm = self._grad_norm() if log_now else None
            self.optimizer.step()
            self.progress.step += 1
            self.progress.step_in_epoch = i + 1
            timer.step_done(images.shape[0] * self.dims.dp_size)

            if log_now:
                self._log_train(loss, logits, labels, lr, grad_norm, timer, steps_in_epoch, run_start,
                                run_start_step, images)
                timer.reset()
            last = i + 1 == steps_in_epoch
            save_due = self.checkpointer.step_due(self.progress.step) and not last  # the epoch end saves anyway
            control_due = self.progress.step % cfg.control_every == 0 or last or self._step_budget_spent()
            # Saves go through the control step too, so a NaN is never checkpointed.
            if (control_due or save_due) and self._control(nonfinite, save_now=save_due):
                return "preempt"
            if self._step_budget_spent():
                return "budget"
        return None

    def _control(self, nonfinite: torch.Tensor, save_now: bool = False) -> bool:
        """One all-reduce decides for every rank: stop (signal), LR drop (request), save (timer), NaN.

        Returns True when the run must stop (checkpointed) for preemption.
        """
        main = self.dims.is_main
        if main and self.heartbeat is not None:
            self.heartbeat()
        flags = torch.zeros(4, device=self.device)
        flags[0] = float(self.stop.is_set() or (main and (self.run_dir / PREEMPT_REQUEST).exists()))
        flags[1] = float(main and take_manual_request(self.run_dir, self.progress.step))
        flags[2] = float(save_now or (main and self.checkpointer.time_due()))
        flags[3] = nonfinite
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, drop, save_due, bad = (bool(v) for v in flags.tolist())
        if bad:
            raise NonFiniteLoss(f"loss became NaN/inf by step {self.progress.step}; stopped without saving, "
                                f"the last good checkpoint is {self.checkpointer.latest()}; "
                                "lower --lr or check the data")
        if drop and self.schedule.drop(step=self.progress.step, epoch=self.progress.epoch, reason="manual"):
            self._log_drop()
        if stop:
            self._save(is_best=False)
            if main:
                (self.run_dir / PREEMPT_REQUEST).unlink(missing_ok=True)
                log.info("stop requested: checkpointed at step %d; exiting for requeue", self.progress.step)
            return True
        if save_due:
            self._save(is_best=False)
        return False

    def _step_budget_spent(self) -> bool:
        return 0 < self.cfg.train.max_steps <= self.progress.step

    # ------------------------------------------------------------------ evaluation

    def validate(self, epoch: int) -> float:
        """Top-1/top-5 error over every val image exactly once (counts all-reduced over dp ranks)."""
        ten_crop = self.cfg.train.ten_crop
        loader = data_mod.val_loader(self.cfg.data, dp_rank=self.dims.dp_rank, dp_size=self.dims.dp_size,
                                     device=self.device, ten_crop=ten_crop, batch_size=self.local_batch,
                                     num_classes=self.cfg.model.num_classes)
        # The towers compute collectively, so both tp ranks run the model; their counts are equal.
        totals = evaluate.count(self.model, loader, ten_crop=ten_crop, amp=self.cfg.train.amp == "bf16")
        totals_t = totals.as_tensor(self.device)
        if self.mesh.dp_group is not None and self.dims.dp_size > 1:
            dist.all_reduce(totals_t, group=self.mesh.dp_group)
        result = evaluate.EvalCounts.from_tensor(totals_t).summary()
        self.writer.scalars({"val/top1_error": result["top1_error"], "val/top5_error": result["top5_error"],
                             "val/loss": result["loss"]}, self.progress.step)
        if self.dims.is_main:
            log.info("epoch %d val: top-1 error %.2f%%, top-5 error %.2f%% over %d images (%s)", epoch,
                     100 * result["top1_error"], 100 * result["top5_error"], result["images"],
                     "10-crop" if ten_crop else "centre crop")
        return result["top1_error"]

    def _is_best(self, val_error: float | None) -> bool:
        if val_error is None:
            return False
        if self.best_top1_error is None or val_error < self.best_top1_error:
            self.best_top1_error = val_error
            return True
        return False

    # ------------------------------------------------------------------ checkpoints

    def _tower_state(self) -> dict[int, dict[str, torch.Tensor]]:
        """Model weights and SGD momentum of the towers this rank holds, in the canonical tower form."""
        params = dict(self.model.named_parameters())
        momentum = {}
        for name, p in params.items():
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            momentum[name] = buf if buf is not None else torch.zeros_like(p)
        model_sd = {k: v.detach().cpu() for k, v in model_mod.unwrap(self.model).state_dict().items()}
        momentum = {k: v.detach().cpu() for k, v in momentum.items()}
        if self.dims.tp_size == 2:
            return {self.dims.tp_rank: _prefixed(model_sd, momentum)}
        return {t: _prefixed(model_mod.tower_state_dict(model_sd, t), model_mod.tower_state_dict(momentum, t))
                for t in (0, 1)}

    def _load_tower_state(self, towers: dict[int, dict[str, torch.Tensor]]) -> None:
        model_sd = {t: _unprefixed(towers[t], "model.") for t in towers}
        momentum = {t: _unprefixed(towers[t], "momentum.") for t in towers}
        if self.dims.tp_size == 2:
            model_sd, momentum = model_sd[self.dims.tp_rank], momentum[self.dims.tp_rank]
        else:
            model_sd = model_mod.merge_tower_state_dicts([model_sd[0], model_sd[1]])
            momentum = model_mod.merge_tower_state_dicts([momentum[0], momentum[1]])
        model_mod.unwrap(self.model).load_state_dict(model_sd)
        for name, p in self.model.named_parameters():
            self.optimizer.state[p]["momentum_buffer"] = momentum[name].to(p.device, p.dtype).clone()

    def _save(self, is_best: bool) -> None:
        meta = {
            "progress": vars(self.progress).copy(),
            "layout": {"world_size": self.dims.world_size, "dp_size": self.dims.dp_size, "tp_size": self.dims.tp_size},
            "schedule": self.schedule.state_dict(),
            "best_top1_error": self.best_top1_error,
            "config": self.cfg.to_dict(),
        }
        path = self.checkpointer.save(self.progress.step, self._tower_state(), _rng_state(), meta, is_best=is_best)
        if self.dims.is_main:
            log.info("checkpoint %s (epoch %d, step %d)", path, self.progress.epoch, self.progress.step)

    def _resume(self, resume: str | None) -> None:
        path = Path(resume) if resume else self.checkpointer.latest()
        if resume and not (path / ckpt.META).exists():
            raise UserError(f"--resume {resume}: not a complete checkpoint directory (no {ckpt.META})")
        if path is None:
            return
        meta = ckpt.Checkpointer.read_meta(path)
        _check_compatible(meta["config"], self.cfg, path)
        same_layout = meta["layout"] == {"world_size": self.dims.world_size, "dp_size": self.dims.dp_size,
                                         "tp_size": self.dims.tp_size}
        towers, rng = self.checkpointer.load(path, self._templates(), want_rng=same_layout)
        self._load_tower_state(towers)
        self.schedule.load_state_dict(meta["schedule"])
        self.best_top1_error = meta["best_top1_error"]
        self.progress = Progress(**meta["progress"])
        if rng is not None:
            _set_rng_state(rng)
        elif self.progress.step_in_epoch:
            # The epoch's sample order depends on dp_size: with another layout, replaying the rest of a
            # half-done epoch would not be the same samples, so start the next epoch cleanly.
            log.warning("layout changed (%s -> %s): resuming at the start of epoch %d",
                        meta["layout"], self.dims.describe(), self.progress.epoch + 1)
            self.progress = Progress(self.progress.epoch + 1, self.progress.step, 0)
        if self.dims.is_main:
            log.info("resumed from %s: epoch %d, step %d, lr drops %d", path, self.progress.epoch,
                     self.progress.step, len(self.schedule.drops))

    def _templates(self) -> dict[int, dict[str, torch.Tensor]]:
        sd = {k: v.detach().cpu() for k, v in model_mod.unwrap(self.model).state_dict().items()}
        params = {k: v for k, v in sd.items() if k in dict(self.model.named_parameters())}
        if self.dims.tp_size == 2:
            return {self.dims.tp_rank: _prefixed(sd, params)}
        return {t: _prefixed(model_mod.tower_state_dict(sd, t), model_mod.tower_state_dict(params, t))
                for t in (0, 1)}

    # ------------------------------------------------------------------ logging

    def _grad_norm(self) -> float:
        """Global gradient norm: each tower holds part of the model; dp replicas hold the same grads."""
        sq = torch.zeros((), device=self.device)
        for p in self.model.parameters():
            if p.grad is not None:
                sq += p.grad.detach().float().pow(2).sum()
        if self.mesh.tp_group is not None:
            dist.all_reduce(sq, group=self.mesh.tp_group)
        return float(sq.sqrt())

    def _log_train(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lr: float,
                   grad_norm: float | None, timer: StepTimer, steps_in_epoch: int, run_start: float,
                   run_start_step: int, images: torch.Tensor) -> None:
        step = self.progress.step
        top1, top5 = topk_correct(logits.detach(), labels)
        n = max(labels.numel(), 1)
        speed = timer.summary()
        values = {"train/loss": float(loss.detach()), "train/top1_error": 1 - top1 / n, "train/top5_error": 1 - top5 / n,
                  "train/lr": lr, "perf/images_per_s": speed["images_per_s"],
                  "perf/data_wait_fraction": speed["data_wait_fraction"], "perf/step_time_s": speed["step_time_s"],
                  "train/grad_norm": grad_norm}
        if self.device.type == "cuda":
            values["perf/gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.writer.scalars(values, step)
        first = step == run_start_step + 1
        # Every rank takes part: gathering the other tower's filters is a collective.
        filters = self.model_conv1_filters() if first or step % (self.cfg.train.log_every * 10) == 0 else None
        if not self.dims.is_main:
            return
        if filters is not None:
            for t, f in enumerate(filters):
                self.writer.images(f"conv1_filters/tower{t}", f, step)
        if first:
            self.writer.images("inputs/augmented", images[:16], step)
        if self.cfg.train.histogram_every and step % self.cfg.train.histogram_every == 0:
            self.writer.histograms({f"weights/{k}": v for k, v in self.model.named_parameters()}, step)
        total = self.cfg.train.epochs * steps_in_epoch
        if self.cfg.train.max_steps:
            total = min(total, self.cfg.train.max_steps)
        done = step - run_start_step
        eta = (time.monotonic() - run_start) / done * (total - step) if done > 0 else float("nan")
        log.info("epoch %d step %d/%d (%d/%d in epoch) loss %.4f top-1 err %.1f%% lr %.2e %.0f img/s "
                 "data %.0f%% ETA %s", self.progress.epoch, step, total, self.progress.step_in_epoch,
                 steps_in_epoch, float(loss.detach()), 100 * (1 - top1 / n), lr, speed["images_per_s"],
                 100 * speed["data_wait_fraction"], format_eta(eta) if math.isfinite(eta) else "?")

    def model_conv1_filters(self) -> list[torch.Tensor]:
        """Both towers' conv1 filters (the paper's figure 3); collective under tp=2."""
        return [f.detach().cpu() for f in model_mod.unwrap(self.model).conv1_filters()]

    def _log_drop(self) -> None:
        drop = self.schedule.drops[-1]
        self.writer.scalars({"train/lr_drops": len(self.schedule.drops)}, drop["step"])
        self.writer.text("lr_drops", f"step {drop['step']} epoch {drop['epoch']}: {drop['reason']} -> lr {drop['lr']:.2e}",
                         drop["step"])
        if self.dims.is_main:
            log.info("LR drop %d (%s) at step %d: lr now %.2e", len(self.schedule.drops), drop["reason"],
                     drop["step"], drop["lr"])


def _local_batch(global_batch: int, dp_size: int) -> int:
    if global_batch % dp_size:
        raise UserError(f"--batch-size {global_batch} is not divisible by the data-parallel size {dp_size}")
    return global_batch // dp_size


def _prefixed(model_sd: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**{f"model.{k}": v for k, v in model_sd.items()}, **{f"momentum.{k}": v for k, v in momentum.items()}}


def _unprefixed(d: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


def _seed_everything(seed: int, rank: int) -> None:
    """Init is identical on every rank (same seed); DDP also broadcasts dp rank 0's weights."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)


def _rng_state() -> bytes:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    return pickle.dumps(state)


def _set_rng_state(blob: bytes) -> None:
    state = pickle.loads(blob)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_compatible(saved: dict[str, Any], cfg: RunConfig, path: Path) -> None:
    """A checkpoint only loads into the same model shape and dataset classes."""
    for key in ("num_classes", "widths", "fc_width"):
        old, new = saved["model"].get(key), getattr(cfg.model, key)
        if old is not None and list(np.atleast_1d(old)) != list(np.atleast_1d(new)):
            raise UserError(f"{path}: checkpoint has model.{key}={old}, this run {new}; "
                            "use the same model config or a new --run-dir")


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
    config_mod.save(cfg, Path(cfg.run_dir))
