"""Evaluation: top-1/top-5 error on the val split (centre crop or the paper's 10 views), one model or an
ensemble, with per-class accuracy and the most confused class pairs.

    python -m pipeline.tools.evaluate --run-dir RUN [--checkpoint best|latest|PATH] [--ten-crop true]
    python -m pipeline.tools.evaluate --ensemble RUN_OR_CHECKPOINT ... [--out FILE]
    torchrun --nproc_per_node=N -m pipeline.tools.evaluate ...     # the same, split over N processes

Every process holds whole models in the single-device form (``checkpoint.export_model``), so
checkpoints of any layout evaluate the same, and takes its contiguous part of the val split from
the loader (dp rank = process rank), as training's validation does; the counts are summed over
processes, so each image counts exactly once. An ensemble averages its members' softmax outputs
(each member's views averaged first), the paper's "average of several CNNs"; the result lists
the ensemble and every member side by side. The counting itself (``count``, ``EvalCounts``,
``predict``) is the core's (``pipeline.metrics``), shared with the trainer's validation.
The result is printed and written to ``RUN/eval-<checkpoint>.json`` (``-centre`` before ``.json``
for the centre crop; an ensemble: the first member's ``RUN/eval-ensemble.json``) or ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from basics.errors import UserError, run_cli
from basics.files import write_json_atomic
from pipeline.metrics import EvalCounts, predict
from pipeline.run_dir import RunDir


@dataclass
class Tally:
    """Per-class counts: ``confusion[true, top-1 prediction]``, top-5 hits per true class, summed loss."""

    confusion: torch.Tensor
    top5: torch.Tensor
    loss_sum: float = 0.0

    @classmethod
    def zeros(cls, num_classes: int) -> "Tally":
        return cls(
            torch.zeros(num_classes, num_classes, dtype=torch.int64), torch.zeros(num_classes, dtype=torch.int64)
        )

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        n = self.top5.numel()
        probs, labels = probs.float().cpu(), labels.cpu()
        self.confusion += torch.bincount(labels * n + probs.argmax(1), minlength=n * n).view(n, n)
        hit5 = (probs.topk(min(5, n), dim=1).indices == labels[:, None]).any(1)
        self.top5 += torch.bincount(labels[hit5], minlength=n)
        self.loss_sum += float(F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum"))

    def all_reduce(self, group: Any = None) -> None:
        """Sum over the processes of ``group`` (float64 carries counts up to 2^53 exactly)."""
        backend_device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        flat = torch.cat([self.confusion.flatten(), self.top5]).double()
        flat = torch.cat([flat, torch.tensor([self.loss_sum], dtype=torch.float64)]).to(backend_device)
        dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        n = self.top5.numel()
        self.confusion = flat[: n * n].round().long().view(n, n)
        self.top5 = flat[n * n : n * n + n].round().long()
        self.loss_sum = float(flat[-1])

    def counts(self) -> EvalCounts:
        return EvalCounts(
            float(self.confusion.trace()), float(self.top5.sum()), float(self.confusion.sum()), self.loss_sum
        )

    def per_class(self, names: list[str]) -> list[dict[str, Any]]:
        images = self.confusion.sum(1)
        return [
            {
                "class": c,
                "name": names[c],
                "images": int(images[c]),
                "top1_error": 1 - int(self.confusion[c, c]) / int(images[c]) if images[c] else None,
                "top5_error": 1 - int(self.top5[c]) / int(images[c]) if images[c] else None,
            }
            for c in range(len(names))
        ]

    def confused_pairs(self, names: list[str], limit: int) -> list[dict[str, Any]]:
        """The most frequent (true class, top-1 prediction) pairs with true != predicted."""
        off = self.confusion.clone()
        off.fill_diagonal_(0)
        counts, flat = off.flatten().sort(descending=True, stable=True)
        n, images = off.shape[0], self.confusion.sum(1)
        return [
            {
                "true": int(i) // n,
                "true_name": names[int(i) // n],
                "predicted": int(i) % n,
                "predicted_name": names[int(i) % n],
                "count": int(k),
                "fraction_of_true": int(k) / int(images[int(i) // n]),
            }
            for k, i in zip(counts[:limit], flat[:limit])
            if k > 0
        ]

    def summary(self, names: list[str], confused: int = 10) -> dict[str, Any]:
        return {
            **self.counts().summary(),
            "per_class": self.per_class(names),
            "confused_pairs": self.confused_pairs(names, confused),
        }


@torch.no_grad()
def probabilities(
    model: torch.nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *, ten_crop: bool, amp: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax outputs [n, classes] (float32, CPU) and labels [n] of this rank's part, in loader order.

    The one thing here that grows with the split: 4 bytes x classes a sample (ImageNet val at dp 1:
    200 MB). Written into one tensor as the batches come (no list of batches, then a copy of it).
    """
    model.eval()
    probs: torch.Tensor | None = None
    labels = torch.zeros(0, dtype=torch.int64)
    row = 0
    for images, batch_labels in loader:
        if not batch_labels.numel():
            continue
        batch = predict(model, images, ten_crop=ten_crop, amp=amp).cpu()
        if probs is None or row + batch.shape[0] > probs.shape[0]:  # sized from the loader, grown if it lied
            rows = max(getattr(loader, "samples", 0), row + batch.shape[0])
            grown = torch.empty(rows, batch.shape[1])
            labels, old_labels = torch.empty(rows, dtype=torch.int64), labels
            if probs is not None:
                grown[:row], labels[:row] = probs[:row], old_labels[:row]
            probs = grown
        probs[row : row + batch.shape[0]] = batch
        labels[row : row + batch.shape[0]] = batch_labels.cpu()
        row += batch.shape[0]
    if probs is None:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    return probs[:row], labels[:row]


# ---------------------------------------------------------------------------- checkpoints and models


def member_checkpoint(spec: str | Path, which: str = "best") -> Path:
    """A checkpoint directory as given, or run directory ``spec``'s ``which`` checkpoint."""
    from pipeline import checkpoint
    from pipeline.checkpoint import META
    from pipeline.run_dir import RunDir

    path = Path(spec)
    if (path / META).exists():
        return path
    if RunDir(path).checkpoints.is_dir():
        return checkpoint.resolve(path, which)
    raise UserError(f"{spec}: neither a checkpoint directory (with {META}) nor a run directory (with checkpoints/)")


@dataclass
class Member:
    """A trained model to evaluate: its checkpoint, step and resolved run config."""

    path: Path
    step: int
    cfg: Any  # pipeline.config.RunConfig

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent

    def build(self, device: torch.device) -> torch.nn.Module:
        """The single-device model with the checkpoint's weights, whatever layout trained it."""
        from pipeline.checkpoint import export_model
        from pipeline.model import ModelConfig, build_model

        model_cfg = ModelConfig(**{**vars(self.cfg.model), "compile": False, "channels_last": False})
        model = build_model(model_cfg)
        model.load_state_dict(export_model(self.path))
        return model.to(device).eval()


def load_member(spec: str | Path, which: str = "best", data: str | None = None) -> Member:
    from pipeline import config
    from pipeline.checkpoint import read_meta

    path = member_checkpoint(spec, which)
    meta = read_meta(path)
    cfg = config.from_dict(meta["config"], source=str(path / "meta.json"))
    if data:
        cfg.data.data = data
    return Member(path, int(meta["step"]), cfg)


def class_names(data_dir: str) -> list[str]:
    """Class names in index order from the dataset's manifest (the wnid where a name is missing)."""
    from preprocess.format import read_manifest

    return [c.get("name") or c.get("wnid") or str(i) for i, c in enumerate(read_manifest(data_dir).classes)]


# ---------------------------------------------------------------------------- evaluation of members


def evaluate_members(
    members: list[Member],
    *,
    ten_crop: bool,
    batch_size: int,
    device: torch.device,
    dp_rank: int = 0,
    dp_size: int = 1,
    amp: bool = False,
) -> tuple[list[Tally], Tally | None]:
    """This rank's tallies: one per member and, for two or more members, the ensemble's (the mean of
    the members' softmax outputs); sum them over ranks for the whole split."""
    from pipeline import data

    # Each member is tallied as soon as its outputs exist; only their running sum is kept for the
    # ensemble, so memory stays at two [n, classes] tensors however many members there are.
    tallies: list[Tally] = []
    total, labels = None, None
    num_classes = members[0].cfg.model.num_classes
    for member in members:
        if member.cfg.model.num_classes != num_classes:
            raise UserError(
                f"{member.path}: {member.cfg.model.num_classes} classes, but {members[0].path} has "
                f"{num_classes}; an ensemble needs models of the same classes"
            )
        model = member.build(device)
        loader = data.val_loader(
            member.cfg.data,
            dp_rank=dp_rank,
            dp_size=dp_size,
            device=device,
            ten_crop=ten_crop,
            batch_size=batch_size,
            num_classes=num_classes,
        )
        probs, member_labels = probabilities(model, loader, ten_crop=ten_crop, amp=amp)
        del model
        if labels is not None and not torch.equal(labels, member_labels):
            raise UserError(
                f"{member.path}: its val images differ from {members[0].path}'s; "
                "ensemble members must be evaluated on the same dataset (--data)"
            )
        labels = member_labels
        tallies.append(_tally(probs, labels, num_classes))
        if len(members) > 1:
            total = probs if total is None else total.add_(probs)
        del probs
    assert labels is not None
    ensemble = _tally(total / len(members), labels, num_classes) if total is not None else None
    return tallies, ensemble


def _tally(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Tally:
    tally = Tally.zeros(num_classes)
    if labels.numel():
        tally.add(probs, labels)
    return tally


# ---------------------------------------------------------------------------- the command line


def main(argv: list[str] | None = None) -> int:
    from pipeline.options import parse_bool

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tools.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run-dir", type=Path, help="the run to evaluate (its --checkpoint)")
    parser.add_argument("--checkpoint", default="best", help="best, latest, or a checkpoint directory")
    parser.add_argument(
        "--ensemble",
        nargs="+",
        metavar="RUN_OR_CHECKPOINT",
        help="evaluate the average of these models' softmax outputs (a run dir means its best)",
    )
    parser.add_argument("--ten-crop", type=parse_bool, default=True, help="the paper's 10-view test (default: true)")
    parser.add_argument("--data", help="dataset directory (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per process and step")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--confused", type=int, default=10, help="how many most-confused class pairs to list")
    parser.add_argument("--out", type=Path, help="JSON result file (default: in the (first) run directory)")
    args = parser.parse_args(argv)
    if not args.run_dir and not args.ensemble:
        parser.error("give --run-dir RUN or --ensemble RUN_OR_CHECKPOINT ...")
    return run_cli(lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline import checkpoint
    from pipeline.process import ProcessEnv, process_group, select_device

    env = ProcessEnv.from_environ()  # under torchrun: one part of the val split per process
    device = select_device(args.device, env.local_rank, option="--device")
    with process_group(env, device, timedelta(minutes=30)):
        specs = args.ensemble or [checkpoint.resolve(args.run_dir, args.checkpoint)]
        members = [load_member(spec, "best", args.data) for spec in specs]
        tallies, ensemble = evaluate_members(
            members,
            ten_crop=args.ten_crop,
            batch_size=args.batch_size,
            device=device,
            dp_rank=env.rank,
            dp_size=env.world_size,
        )
        if env.world_size > 1:
            for tally in [*tallies, *([ensemble] if ensemble else [])]:
                tally.all_reduce()
        if env.rank == 0:
            _report(args, members, tallies, ensemble)
    return 0


def _report(args: argparse.Namespace, members: list[Member], tallies: list[Tally], ensemble: Tally | None) -> None:
    names = class_names(members[0].cfg.data.data)
    views = "10-crop" if args.ten_crop else "centre crop"
    rows = [{"checkpoint": str(m.path), "step": m.step, **t.counts().summary()} for m, t in zip(members, tallies)]
    if ensemble is None:
        result: dict[str, Any] = {
            **tallies[0].summary(names, args.confused),
            "checkpoint": str(members[0].path),
            "step": members[0].step,
            "ten_crop": args.ten_crop,
        }
        out = args.out or RunDir(members[0].run_dir).eval_result(members[0].path.name, ten_crop=args.ten_crop)
    else:
        result = {**ensemble.summary(names, args.confused), "ten_crop": args.ten_crop, "members": rows}
        out = args.out or RunDir(members[0].run_dir).eval_ensemble
    write_json_atomic(out, result)
    print(f"{'model':<48}{'top-1 err':>10}{'top-5 err':>10}   ({result['images']} val images, {views})")
    for member, row in zip(members, rows):
        label = f"{member.run_dir.name}/{member.path.name}"
        print(f"{label[-47:]:<48}{100 * row['top1_error']:>9.2f}%{100 * row['top5_error']:>9.2f}%")
    if ensemble is not None:
        print(
            f"{f'ensemble of {len(members)}':<48}{100 * result['top1_error']:>9.2f}%{100 * result['top5_error']:>9.2f}%"
        )
    for pair in result["confused_pairs"][:3]:
        print(f"  confused: {pair['true_name']} -> {pair['predicted_name']} ({pair['count']}x)")
    print(f"written: {out}")


if __name__ == "__main__":
    sys.exit(main())
