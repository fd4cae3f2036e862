"""Evaluation: top-1/top-5 error on the val split, centre crop or the paper's 10-crop test.

The counting loop is shared by training (each dp rank counts its part; the trainer all-reduces
the counts) and by the command line, which evaluates a checkpoint on one device:

    python -m pipeline.evaluate --run-dir RUN [--checkpoint best|latest|PATH] [--ten-crop true]

The result is printed and written to ``RUN/eval-<checkpoint>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from pipeline.metrics import topk_correct
from preprocess.errors import UserError, run_cli
from preprocess.files import write_json_atomic


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
        return {"top1_error": 1 - self.top1 / self.seen, "top5_error": 1 - self.top5 / self.seen,
                "loss": self.loss_sum / self.seen, "images": int(self.seen)}


def predict(model: torch.nn.Module, images: torch.Tensor, *, ten_crop: bool, amp: bool) -> torch.Tensor:
    """Softmax probabilities; with 10 views per image, the paper's average of the 10 softmaxes."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        if ten_crop:
            b, views = images.shape[:2]
            logits = model(images.flatten(0, 1)).float()
            return logits.softmax(dim=1).view(b, views, -1).mean(dim=1)
        return model(images).float().softmax(dim=1)


@torch.no_grad()
def count(model: torch.nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *, ten_crop: bool,
          amp: bool = False) -> EvalCounts:
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


def main(argv: list[str] | None = None) -> int:
    from pipeline import config as config_mod

    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--checkpoint", default="best", help="best, latest, or a checkpoint directory")
    parser.add_argument("--ten-crop", type=config_mod.parse_bool, default=True, help="the paper's 10-crop test")
    parser.add_argument("--data", help="dataset directory (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    return run_cli(lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline import config as config_mod
    from pipeline import data as data_mod
    from pipeline.checkpoint import export_model, read_meta, resolve
    from pipeline.model import build_model

    path = resolve(args.run_dir, args.checkpoint)
    meta = read_meta(path)
    cfg = config_mod.from_dict(meta["config"], source=str(path / "meta.json"))
    if args.data:
        cfg.data.data = args.data
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    model = build_model(cfg.model).to(device)
    model.load_state_dict(export_model(path))
    loader = data_mod.val_loader(cfg.data, dp_rank=0, dp_size=1, device=device, batch_size=args.batch_size,
                                 ten_crop=args.ten_crop, num_classes=cfg.model.num_classes)
    result: dict[str, Any] = count(model, loader, ten_crop=args.ten_crop).summary()
    result.update({"checkpoint": str(path), "step": meta["step"], "ten_crop": args.ten_crop})
    out = args.run_dir / f"eval-{path.name}.json"
    write_json_atomic(out, result)
    print(f"{path.name}: top-1 error {100 * result['top1_error']:.2f}%, top-5 error {100 * result['top5_error']:.2f}% "
          f"over {result['images']} val images ({'10-crop' if args.ten_crop else 'centre crop'}); {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
