"""Distributed training on CPU with gloo: layout invariance, exact resume, LR drops, TensorBoard, guard rails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint
from pipeline.checkpoint import export_model, read_towers
from pipeline.model import ModelConfig, build_model
from tests.support import NARROW_MODEL, REPO, flags
from tests.support.harness_runs import train


def _outcome(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"outcome-rank{rank}.json").read_text())


def _latest(run_dir: Path) -> Path:
    path = checkpoint.latest(run_dir)
    assert path is not None, f"no checkpoint in {run_dir}"
    return path


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert max(worst.values()) <= atol, worst


@pytest.mark.multiprocess
def test_one_process_equals_dp2_x_tp2(classes_only: Path, tmp_path: Path) -> None:
    """The same global batches give the same weights on 1 process and on 4 (dp=2 x tp=2)."""
    common = [
        *flags("--data {} --num-classes 4", classes_only),
        *NARROW_MODEL,
        *flags("--model.dropout 0 --batch-size 8 --lr 0.05 --epochs 1 --train.ten-crop false"),
    ]
    train(tmp_path / "o1", [*common, *flags("--tp 1 --run-dir {}", tmp_path / "r1")], data="fixed")
    train(tmp_path / "o4", [*common, *flags("--tp 2 --run-dir {}", tmp_path / "r4")], nproc=4, data="fixed")

    single = export_model(_latest(tmp_path / "r1"))
    split = export_model(_latest(tmp_path / "r4"))
    _assert_same_weights(single, split, atol=1e-6)

    torch.manual_seed(0)  # the trainer's init for seed 0: training really moved the weights
    init = build_model(ModelConfig(num_classes=4, widths=(16, 32, 48, 48, 32), fc_width=64)).state_dict()
    assert max(float((init[k] - single[k]).abs().max()) for k in init) > 1e-3
    # The tp=2 checkpoint holds each tower once, in the canonical tower form.
    towers = read_towers(_latest(tmp_path / "r4"))
    assert sorted(towers) == [0, 1] and towers[0]["model.conv1.weight"].shape == (8, 3, 11, 11)


def _small(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """A narrow model on the real DALI pipeline (CPU), small batches."""
    return [
        *flags("--data {} --run-dir {} --num-classes 4", shards, run_dir),
        *NARROW_MODEL,
        *flags("--batch-size 8 --lr 0.01 --train.ten-crop false --train.log-every 1"),
        *flags("--data.workers 1 --checkpoint.every-minutes 0"),
        *extra,
    ]


@pytest.mark.multiprocess
def test_preempt_then_resume_equals_uninterrupted(demo_shards: Path, tmp_path: Path) -> None:
    """Stop at a step boundary mid-epoch (as on SIGUSR1), resume: the same weights as one straight run."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(tmp_path / "o1", _small(demo_shards, straight, "--tp", "2", "--max-steps", "6"), nproc=2)

    stopped.mkdir()
    (stopped / "preempt.request").touch()  # what slurm/train.sh's signal trap writes
    train(
        tmp_path / "o2",
        _small(demo_shards, stopped, "--tp", "2", "--max-steps", "6", "--train.control-every", "3"),
        nproc=2,
    )
    first = _outcome(tmp_path / "o2")
    assert first["preempted"] and first["progress"] == {"epoch": 0, "step": 3, "step_in_epoch": 3}
    assert not (stopped / "preempt.request").exists()

    train(
        tmp_path / "o3",
        _small(demo_shards, stopped, "--tp", "2", "--max-steps", "6", "--train.control-every", "3"),
        nproc=2,
    )
    assert _outcome(tmp_path / "o3")["progress"]["step"] == 6
    _assert_same_weights(export_model(_latest(straight)), export_model(_latest(stopped)), atol=0)


@pytest.mark.multiprocess
def test_manual_lr_drop_reaches_every_rank_and_survives_tp_change(demo_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    missing = subprocess.run(
        [sys.executable, *flags("-m launch.lr_drop {}", run_dir)], cwd=REPO, capture_output=True, text=True
    )
    assert missing.returncode == 2 and str(run_dir) in missing.stderr
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")  # lr_drop checks it is a run directory
    subprocess.run(
        [sys.executable, *flags("-m launch.lr_drop {} --note test", run_dir)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    train(
        tmp_path / "o",
        _small(demo_shards, run_dir, "--tp", "2", "--max-steps", "4", "--train.control-every", "2"),
        nproc=2,
    )
    drops = [_outcome(tmp_path / "o", r)["lr_drops"] for r in (0, 1)]
    assert drops[0] == drops[1] and len(drops[0]) == 1
    assert drops[0][0]["step"] == 2 and drops[0][0]["reason"] == "manual"
    assert drops[0][0]["lr"] == pytest.approx(0.001)
    assert (run_dir / "lr_drop.applied-step2").exists() and not list(run_dir.glob("lr_drop.request*"))

    # The tp=2 checkpoint resumes in one process (tp=1), drop history and all.
    train(tmp_path / "o1", _small(demo_shards, run_dir, "--tp", "1", "--max-steps", "6"))
    resumed = _outcome(tmp_path / "o1")
    assert resumed["progress"]["step"] == 6 and resumed["lr_drops"] == drops[0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/top1_error",
        "perf/images_per_s",
        "perf/data_wait_fraction",
        "train/grad_norm",
    } <= tags
    lr = {e.step: e.value for e in events.Scalars("train/lr")}
    assert lr[1] == pytest.approx(0.01) and lr[max(lr)] == pytest.approx(0.001) and max(lr) == 6
    assert {"conv1_filters/tower0", "conv1_filters/tower1", "inputs/augmented"} <= set(events.Tags()["images"])


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(demo_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(tmp_path / "o", _small(demo_shards, run_dir, "--tp", "1", "--max-steps", "2"))
    good = _latest(run_dir)
    proc = train(
        tmp_path / "o", _small(demo_shards, run_dir, "--tp", "1", "--max-steps", "12", "--lr", "1e12"), check=False
    )
    assert proc.returncode == 2
    assert "training diverged" in proc.stderr and f"last good checkpoint {good}" in proc.stderr
    assert _latest(run_dir) == good


@pytest.mark.slow
def test_demo_config_learns(demo_shards: Path, tmp_path: Path) -> None:
    """The demo recipe on real shards: loss falls and val accuracy beats chance (25%)."""
    run_dir = tmp_path / "run"
    train(
        tmp_path / "o",
        [
            *flags(
                "--config {} --data {} --run-dir {} --num-classes 4 --tp 1 --batch-size 16",
                REPO / "configs" / "demo.toml",
                demo_shards,
                run_dir,
            ),
            *flags("--epochs 6 --data.workers 1 --schedule.milestones 5"),
        ],
        timeout=600,
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    loss = [e.value for e in events.Scalars("train/loss")]
    assert sum(loss[-3:]) / 3 < 0.8 * sum(loss[:3]) / 3
    assert _outcome(tmp_path / "o")["val_top1_error"] < 0.6


@pytest.mark.multiprocess
def test_paper_model_end_to_end(demo_shards: Path, tmp_path: Path) -> None:
    """The paper's full widths over the two-tower split: train, checkpoint, 10-crop evaluation."""
    run_dir = tmp_path / "run"
    train(
        tmp_path / "o",
        [
            *flags("--data {} --run-dir {} --num-classes 4 --tp 2 --batch-size 4 --max-steps 2", demo_shards, run_dir),
            *flags("--epochs 1 --data.workers 1 --train.ten-crop true"),
            # At batch 4 the paper-width model's second loss is ~17x its first, a spike to the divergence cap
            # (README, Divergence); this test is about the widths end to end, so the cap is off here.
            *flags("--faults.divergence.spike-factor 0"),
        ],
        nproc=2,
        timeout=600,
    )
    towers = read_towers(_latest(run_dir))
    assert towers[0]["model.fc6.weight"].shape == (2048, 9216)
    proc = subprocess.run(
        [
            sys.executable,
            *flags("-m pipeline.tools.evaluate --run-dir {} --checkpoint latest --ten-crop true", run_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next(run_dir.glob("eval-step-*.json")).read_text())
    assert result["images"] == 24 and result["ten_crop"] is True
