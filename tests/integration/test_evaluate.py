"""Evaluation: 10-view averaging, ensembles against the hand computation, per-class counts and confused
pairs, exactly-once counting over 1-3 processes, and a tp=2 checkpoint evaluated on one device."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline import data
from pipeline.tools.evaluate import class_names, evaluate_members, load_member
from tests.support import TORCHRUN
from tests.support.evaluate import evaluate
from tests.support.processes import free_port, run_captured

CPU = torch.device("cpu")


def torchrun_evaluate(*args: str, nproc: int) -> subprocess.CompletedProcess[str]:
    return run_captured(
        [TORCHRUN, f"--nproc_per_node={nproc}", f"--master-port={free_port()}", "-m", "pipeline.tools.evaluate", *args],
        600,
    )


def checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir() and p.name.startswith("step-"))


def test_ensemble_is_the_mean_of_the_members_softmaxes(
    trained_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    members = checkpoints(trained_run)
    assert len(members) == 2
    out = tmp_path / "ensemble.json"
    status, stdout, stderr = evaluate(
        capsys, "--ensemble", *map(str, members), "--ten-crop", "false", "--out", str(out)
    )
    assert status == 0, stderr
    result = json.loads(out.read_text())
    assert "ensemble of 2" in stdout

    probs, labels = [], None
    for path in members:  # by hand: each model's softmax over the centre crops, then the mean
        member = load_member(path)
        model = member.build(CPU)
        loader = data.val_loader(
            member.cfg.data, dp_rank=0, dp_size=1, device=CPU, batch_size=64, num_classes=member.cfg.model.num_classes
        )
        with torch.no_grad():
            batches = [(model(x).softmax(1), y) for x, y in loader if y.numel()]
        probs.append(torch.cat([p for p, _ in batches]))
        labels = torch.cat([y for _, y in batches])
    for row, p in zip(result["members"], probs):
        assert row["top1_error"] == pytest.approx(float((p.argmax(1) != labels).float().mean()))
    mean = torch.stack(probs).mean(0)
    assert result["top1_error"] == pytest.approx(float((mean.argmax(1) != labels).float().mean()))
    assert result["top5_error"] == pytest.approx(0.0)  # 4 classes: the label is always in the top 5
    assert result["loss"] == pytest.approx(float(-mean[torch.arange(len(labels)), labels].log().mean()), rel=1e-5)


def test_per_class_counts_sum_to_the_totals_with_names(
    trained_run: Path,
    demo_shards: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "eval.json"
    status, _, stderr = evaluate(
        capsys, "--run-dir", str(trained_run), "--checkpoint", "best", "--ten-crop", "true", "--out", str(out)
    )
    assert status == 0, stderr
    result = json.loads(out.read_text())
    per_class = result["per_class"]
    assert [c["name"] for c in per_class] == class_names(str(demo_shards))
    assert sum(c["images"] for c in per_class) == result["images"] == 24
    correct = sum(round((1 - c["top1_error"]) * c["images"]) for c in per_class)
    assert correct == round((1 - result["top1_error"]) * result["images"])
    wrong = sum(p["count"] for p in result["confused_pairs"])
    assert wrong == result["images"] - correct  # 4 classes: at most 12 pairs, all listed
    for pair in result["confused_pairs"]:
        assert pair["true"] != pair["predicted"] and pair["true_name"] == per_class[pair["true"]]["name"]


@pytest.mark.parametrize("ranks", [2, 3])
def test_every_image_counts_once_over_ranks(trained_run: Path, ranks: int) -> None:
    members = [load_member(p) for p in checkpoints(trained_run)]
    alone, alone_ensemble = evaluate_members(members, ten_crop=False, batch_size=4, device=CPU)
    parts = [
        evaluate_members(members, ten_crop=False, batch_size=4, device=CPU, dp_rank=r, dp_size=ranks)
        for r in range(ranks)
    ]
    assert all(int(part[0][0].confusion.sum()) > 0 for part in parts)  # every rank had work
    for m in range(len(members)):
        assert torch.equal(sum(part[0][m].confusion for part in parts), alone[m].confusion)
    assert torch.equal(sum(part[1].confusion for part in parts), alone_ensemble.confusion)
    assert int(alone_ensemble.confusion.sum()) == 24


def test_under_torchrun_equals_one_process(trained_run: Path, demo_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    proc = torchrun_evaluate("--run-dir", str(trained_run), "--ten-crop", "false", "--out", str(out), nproc=3)
    assert proc.returncode == 0, proc.stderr
    three = json.loads(out.read_text())
    [alone], _ = evaluate_members(
        [load_member(trained_run / "checkpoints" / three["checkpoint"].split("/")[-1])],
        ten_crop=False,
        batch_size=64,
        device=CPU,
    )
    assert three["images"] == 24
    assert three["per_class"] == alone.per_class(class_names(str(demo_shards)))


def test_a_tp2_checkpoint_evaluates_on_one_device_as_the_towers_validated_it(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    best = (trained_run / "checkpoints" / "best").read_text().strip()
    meta = json.loads((trained_run / "checkpoints" / best / "meta.json").read_text())
    assert meta["layout"]["tp_size"] == 2
    out = tmp_path / "eval.json"
    status, _, stderr = evaluate(capsys, "--run-dir", str(trained_run), "--ten-crop", "false", "--out", str(out))
    assert status == 0, stderr
    assert json.loads(out.read_text())["top1_error"] == pytest.approx(meta["best_top1_error"])
