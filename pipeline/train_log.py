"""What a run reports while it trains: the progress line, TensorBoard scalars, images, histograms, LR drops.

The trainer hands :class:`TrainLog` one :class:`StepRecord` per logged step and the figures of
validation and LR drops; what is written where (rank 0's console and TensorBoard, every rank's part
in the collective that gathers both towers' conv1 filters) is decided here, not in the loop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import TrainConfig
from pipeline.metrics import MetricWriter, StepTimer, format_eta, topk_correct
from pipeline.perf import Throughput, memory_scalars
from pipeline.phases import data_wait_fraction

log = logging.getLogger("alexnet")


@dataclass
class StepRecord:
    """One logged training step, as the loop saw it."""

    epoch: int
    step: int  # steps done, this one included
    step_in_epoch: int
    steps_in_epoch: int
    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    images: torch.Tensor
    lr: float
    grad_norm: float | None


class TrainLog:
    """The run's reporting, with the run's start as its reference for throughput and the ETA."""

    def __init__(
        self,
        writer: MetricWriter,
        cfg: TrainConfig,
        *,
        is_main: bool,
        device: torch.device,
        named_parameters: Callable[[], dict[str, torch.Tensor]],
        conv1_filters: Callable[[], list[torch.Tensor]],
        throughput: Throughput | None = None,
        phase_seconds: Callable[[], dict[str, float]] | None = None,
    ):
        self.writer = writer
        self.cfg = cfg
        self.is_main = is_main
        self.device = device
        self.named_parameters = named_parameters
        self.conv1_filters = conv1_filters  # collective under tp=2: every rank calls it at the same steps
        self.throughput = throughput  # model FLOP/s and MFU (pipeline.perf); None: not reported
        # Seconds per phase since the last logged step, as the device spent them (PhaseMarks.window):
        # on a GPU the host's wait for a batch says nothing about whether the GPU waited for it.
        self.phase_seconds = phase_seconds
        self.started = time.monotonic()
        self.start_step = 0

    def start(self, step: int) -> None:
        """The run (re)starts at ``step``: the ETA counts from here."""
        self.started = time.monotonic()
        self.start_step = step

    def due(self, step: int) -> bool:
        """Whether the step about to run (``step`` done before it) is logged."""
        return step % self.cfg.log_every == 0

    def step(self, record: StepRecord, timer: StepTimer) -> None:
        """Scalars every logged step, filters and inputs now and then, and rank 0's progress line."""
        top1, top5 = topk_correct(record.logits.detach(), record.labels)
        n = max(record.labels.numel(), 1)
        speed = timer.summary()
        if self.phase_seconds is not None:
            speed["data_wait_fraction"] = data_wait_fraction(self.phase_seconds())
        loss = float(record.loss.detach())
        values = {
            "train/loss": loss,
            "train/top1_error": 1 - top1 / n,
            "train/top5_error": 1 - top5 / n,
            "train/lr": record.lr,
            "perf/images_per_s": speed["images_per_s"],
            "perf/data_wait_fraction": speed["data_wait_fraction"],
            "perf/step_time_s": speed["step_time_s"],
            "train/grad_norm": record.grad_norm,
        }
        flops = self.throughput.scalars(speed["images_per_s"]) if self.throughput else {}
        values.update(flops)
        values.update(memory_scalars(self.device))  # every rank's figures: a small all-gather
        if self.device.type == "cuda":
            values.update(gpu_memory(self.device))  # after memory_scalars: it resets torch's peak
        self.writer.scalars(values, record.step)
        first = record.step == self.start_step + 1
        filters = self.conv1_filters() if first or record.step % (self.cfg.log_every * 10) == 0 else None
        if not self.is_main:
            return
        if filters is not None:
            for t, f in enumerate(filters):
                self.writer.images(f"conv1_filters/tower{t}", f, record.step)
        if first:
            self.writer.images("inputs/augmented", record.images[:16], record.step)
        if self.cfg.histogram_every and record.step % self.cfg.histogram_every == 0:
            self.writer.histograms({f"weights/{k}": v for k, v in self.named_parameters().items()}, record.step)
        log.info(
            "epoch %d step %d/%d (%d/%d in epoch) loss %.4f top-1 err %.1f%% lr %.2e %.0f img/s%s data %.0f%% ETA %s",
            record.epoch,
            record.step,
            self._total_steps(record.steps_in_epoch),
            record.step_in_epoch,
            record.steps_in_epoch,
            loss,
            100 * (1 - top1 / n),
            record.lr,
            speed["images_per_s"],
            _flops_text(flops),
            100 * speed["data_wait_fraction"],
            self._eta(record.step, record.steps_in_epoch),
        )

    def validation(self, epoch: int, step: int, result: dict[str, Any], ten_crop: bool) -> None:
        self.writer.scalars(
            {
                "val/top1_error": result["top1_error"],
                "val/top5_error": result["top5_error"],
                "val/loss": result["loss"],
            },
            step,
        )
        if self.is_main:
            log.info(
                "epoch %d val: top-1 error %.2f%%, top-5 error %.2f%% over %d images (%s)",
                epoch,
                100 * result["top1_error"],
                100 * result["top5_error"],
                result["images"],
                "10-crop" if ten_crop else "centre crop",
            )

    def lr_drop(self, drop: dict[str, Any], count: int) -> None:
        self.writer.scalars({"train/lr_drops": count}, drop["step"])
        self.writer.text(
            "lr_drops",
            f"step {drop['step']} epoch {drop['epoch']}: {drop['reason']} -> lr {drop['lr']:.2e}",
            drop["step"],
        )
        if self.is_main:
            log.info("LR drop %d (%s) at step %d: lr now %.2e", count, drop["reason"], drop["step"], drop["lr"])

    def rollback(self, plan: dict[str, Any], count: int, most: int, step: int) -> None:
        """A divergence rolled the state back (``pipeline.faults.divergence``): one line, TensorBoard scalars
        and text."""
        first, last = plan["skipped_steps"]
        line = (
            f"divergence ({plan['kind']} at step {plan['diverged_step']}, loss {plan['loss']}, grad norm "
            f"{plan['grad_norm']}): rolled back to {plan['checkpoint']} (step {plan['restored_step']}), the batches "
            f"of steps {first}..{last} skipped, lr x{plan['lr_scale']:g}; rollback {count} of at most {most}"
        )
        self.writer.scalars({"train/rollbacks": count, "train/skipped_batches": last - first + 1}, step)
        self.writer.text("divergence", line, step)
        if self.is_main:
            log.warning("%s", line)

    def _total_steps(self, steps_in_epoch: int) -> int:
        total = self.cfg.epochs * steps_in_epoch
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def _eta(self, step: int, steps_in_epoch: int) -> str:
        done = step - self.start_step
        eta = (time.monotonic() - self.started) / done * (self._total_steps(steps_in_epoch) - step) if done > 0 else 0
        return format_eta(eta) if done > 0 and math.isfinite(eta) else "?"


def _flops_text(flops: dict[str, float | None]) -> str:
    """The progress line's model FLOP/s per device and MFU ("MFU -" where the peak is unknown: CPU)."""
    if not flops:
        return ""
    mfu = flops["perf/mfu"]
    return f" {flops['perf/model_tflops_per_device']:.3g} TFLOP/s/device MFU " + (f"{100 * mfu:.1f}%" if mfu else "-")


def gpu_memory(device: torch.device) -> dict[str, float]:
    """GiB: torch's peak since the last call (the peak is reset, so each logged step shows its own interval),
    and the device's memory in use by everyone (DALI's memory pool, the CUDA context, NCCL's buffers: what
    torch's allocator does not see, and what an out-of-memory error is about)."""
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    return {"perf/gpu_mem_gib": peak, "perf/gpu_mem_used_gib": (total - free) / 2**30}
