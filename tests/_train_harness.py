"""Runs ``launch.train`` in this process (plain python or under torchrun) and records its outcome.

``HARNESS_DATA=fixed`` swaps the input pipeline for fixed synthetic global batches that each dp rank
slices by its rank: the global batch of a step is then the same whatever the (dp, tp) layout, which
is what a layout-invariance test needs (the real pipeline's sharding is tested in test_data.py).
The outcome (progress, LR drops) of each rank goes to ``$HARNESS_OUT/outcome-rank{RANK}.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

STEPS_PER_EPOCH = 4


class FixedLoader:
    def __init__(
        self,
        *,
        dp_rank: int,
        dp_size: int,
        batch_size: int,
        num_classes: int,
        epoch: int,
        device: torch.device,
        views: int = 0,
        steps: int = STEPS_PER_EPOCH,
        start: int = 0,
    ):
        self.dp_rank, self.dp_size, self.batch, self.num_classes = dp_rank, dp_size, batch_size, num_classes
        self.epoch, self.device, self.views, self.steps_in_epoch, self.start = epoch, device, views, steps, start

    def __len__(self) -> int:
        return self.steps_in_epoch - self.start

    def __iter__(self):
        global_batch = self.batch * self.dp_size
        lo, hi = self.dp_rank * self.batch, (self.dp_rank + 1) * self.batch
        for step in range(self.start, self.steps_in_epoch):
            g = torch.Generator().manual_seed(1000 * self.epoch + step)
            labels = torch.randint(0, self.num_classes, (global_batch,), generator=g)
            images = torch.randn(global_batch, 3, 227, 227, generator=g)
            images += labels.view(-1, 1, 1, 1).float() * 0.1  # learnable signal
            if self.views:
                images = images.unsqueeze(1).expand(-1, self.views, -1, -1, -1).contiguous()
            yield images[lo:hi].to(self.device), labels[lo:hi].to(self.device)


def fixed_loaders():
    """Loaders with the signatures of pipeline.data's, handed to the trainer instead of the real ones."""
    from pipeline.train import Loaders

    def train_loader(
        cfg, *, dp_rank, dp_size, epoch, seed, device, batch_size, num_classes=None, start_batch=0, ahead=None
    ):
        return FixedLoader(
            dp_rank=dp_rank,
            dp_size=dp_size,
            batch_size=batch_size,
            num_classes=num_classes,
            epoch=epoch,
            device=device,
            start=start_batch,
        )

    def val_loader(cfg, *, dp_rank, dp_size, device, batch_size, ten_crop=False, num_classes=None, verify_cache=None):
        return FixedLoader(
            dp_rank=dp_rank,
            dp_size=dp_size,
            batch_size=batch_size,
            num_classes=num_classes,
            epoch=99,
            device=device,
            views=10 if ten_crop else 0,
            steps=2,
        )

    return Loaders(train=train_loader, val=val_loader)


def main() -> int:
    loaders = fixed_loaders() if os.environ.get("HARNESS_DATA") == "fixed" else None
    from launch.train import run
    from preprocess.errors import run_cli

    rank = int(os.environ.get("RANK", 0))
    out = Path(os.environ["HARNESS_OUT"])

    def body() -> int:
        outcome = run(sys.argv[1:], loaders=loaders)
        record = {
            "progress": vars(outcome.progress),
            "preempted": outcome.preempted,
            "lr_drops": outcome.lr_drops,
            "val_top1_error": outcome.val_top1_error,
        }
        (out / f"outcome-rank{rank}.json").write_text(json.dumps(record))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
