"""Metrics: top-k counts, evaluation counts over a loader (training's validation and the evaluation
tool share them), step timing, and the TensorBoard/console writer (global rank 0 only).

Counts, not means, travel between ranks: an all-reduce of (correct, seen) gives exact accuracy
however unevenly the last batches are split, and padded samples never count.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from basics.errors import UserError
from pipeline.run_dir import RunDir

log = logging.getLogger("alexnet")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many rows have their label among the top k scores, for each k (k capped at #classes)."""
    if labels.numel() == 0:
        return [0 for _ in ks]
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top == labels.view(-1, 1)
    return [int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


@dataclass
class EvalCounts:
    top1: float = 0.0
    top5: float = 0.0
    seen: float = 0.0
    loss_sum: float = 0.0

    def as_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([self.top1, self.top5, self.seen, self.loss_sum], dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "EvalCounts":
        return cls(*t.tolist())

    def summary(self) -> dict[str, float]:
        if self.seen == 0:
            raise UserError("evaluation saw no images: is the val split empty?")
        return {
            "top1_error": 1 - self.top1 / self.seen,
            "top5_error": 1 - self.top5 / self.seen,
            "loss": self.loss_sum / self.seen,
            "images": int(self.seen),
        }


def predict(model: torch.nn.Module, images: torch.Tensor, *, ten_crop: bool, amp: bool) -> torch.Tensor:
    """Softmax probabilities; with 10 views per image, the paper's average of the 10 softmaxes."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        if ten_crop:
            b, views = images.shape[:2]
            logits = model(images.flatten(0, 1)).float()
            return logits.softmax(dim=1).view(b, views, -1).mean(dim=1)
        return model(images).float().softmax(dim=1)


@torch.no_grad()
def count(
    model: torch.nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *, ten_crop: bool, amp: bool = False
) -> EvalCounts:
    """Correct counts over this rank's part of the val split; empty batches count nothing."""
    was_training = model.training
    model.eval()
    counts = EvalCounts()
    for images, labels in loader:
        if labels.numel() == 0:
            continue
        probs = predict(model, images, ten_crop=ten_crop, amp=amp)
        top1, top5 = topk_correct(probs, labels)
        counts.top1 += top1
        counts.top5 += top5
        counts.seen += labels.numel()
        counts.loss_sum += float(F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum"))
    model.train(was_training)
    return counts


@dataclass
class StepTimer:
    """Splits wall time into waiting for data and the rest, to say whether the input pipeline keeps up."""

    data_s: float = 0.0
    total_s: float = 0.0
    images: int = 0
    steps: int = 0
    _mark: float = field(default_factory=time.perf_counter)

    def data_ready(self) -> None:
        self.data_s += time.perf_counter() - self._mark

    def step_done(self, images: int) -> None:
        now = time.perf_counter()
        self.total_s += now - self._mark
        self.images += images
        self.steps += 1
        self._mark = now

    def summary(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        return {
            "images_per_s": self.images / self.total_s if self.total_s else 0.0,
            "data_wait_fraction": self.data_s / self.total_s if self.total_s else 0.0,
            "step_time_s": self.total_s / steps,
        }

    def reset(self) -> None:
        self.data_s = self.total_s = 0.0
        self.images = self.steps = 0


class MetricWriter:
    """TensorBoard event files in the run dir, written by global rank 0 only; others no-op."""

    def __init__(self, run_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(RunDir(run_dir).tensorboard))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._tb is None:
            return
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self._tb.add_scalar(name, value, step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """A grid of images (N, C, H, W), rescaled to [0, 1] per image for viewing."""
        if self._tb is None:
            return
        import torchvision

        imgs = images.detach().float().cpu()
        lo = imgs.amin(dim=(1, 2, 3), keepdim=True)
        hi = imgs.amax(dim=(1, 2, 3), keepdim=True)
        grid = torchvision.utils.make_grid((imgs - lo) / (hi - lo).clamp_min(1e-8), nrow=8, padding=1)
        self._tb.add_image(tag, grid, step)

    def histograms(self, named: dict[str, torch.Tensor], step: int) -> None:
        if self._tb is None:
            return
        for name, tensor in named.items():
            self._tb.add_histogram(name, tensor.detach().float().cpu(), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self._tb is not None:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            self._tb.add_hparams(clean, metrics, run_name=".")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"
