"""pipeline.bench.train / bench_gpu and --train.grad-compression: the report's shape and honesty, not speed."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint
from pipeline.bench import train as bench_train
from preprocess import format as fmt
from tests.support import DEMO_CLASSES, HARNESS, REPO, TORCHRUN, flags

TINY = flags("--size tiny --warmup 1 --steps 3 --workers 1")


def _bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "report.json"
    assert bench_train.main([*TINY, *args, *flags("--checkpoint-dir {} --json {}", tmp_path, out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_trainer_and_plain_loop_see_the_same_batches(demo_shards: Path, tmp_path: Path) -> None:
    report = _bench(
        tmp_path,
        "--data",
        str(demo_shards),
        "--loaders",
        "synthetic,dali",
        "--rounds",
        "2",
        "--tp-steps",
        "0",
        "--checkpoint-saves",
        "0",
    )
    assert set(report["loops"]) == {"synthetic", "dali"}
    for name, loop in report["loops"].items():
        # 3 timed steps of 8 (the demo's 96 train images make 12 full batches an epoch)
        assert loop["trainer"]["images"] == loop["plain"]["images"] == 24, name
        assert len(loop["rounds"]["trainer"]) == len(loop["rounds"]["plain"]) == 2
        for which in ("trainer", "plain"):
            assert 0 <= loop[which]["data_wait_fraction"] < 1
            assert loop[which]["images_per_s"] > 0
        assert loop["overhead"] == pytest.approx(loop["plain"]["images_per_s"] / loop["trainer"]["images_per_s"] - 1)
        cpu = loop["cpu_s_per_step"]
        assert cpu["trainer"] > 0 and loop["cpu_overhead"] == pytest.approx(cpu["trainer"] / cpu["plain"] - 1)
        assert 0 < loop["main_cpu_s_per_step"]["trainer"] <= cpu["trainer"]  # one thread of the process
        assert loop["paired_cpu_overhead_median"] > -1
    assert report["setup"]["num_classes"] == DEMO_CLASSES
    assert {"date", "torch", "cpu", "command"} <= set(report["environment"])
    assert not list(tmp_path.glob("bench-train-*")), "scratch run dirs are removed"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_tower_split_and_checkpoint_stall(tmp_path: Path) -> None:
    report = _bench(tmp_path, "--rounds", "1", "--tp-steps", "1", "--checkpoint-saves", "2")
    split = report["tower_split"]
    assert split["tp1_step_s"] > 0 and split["tp2_step_s"] > 0
    assert split["speedup"] == pytest.approx(split["tp1_step_s"] / split["tp2_step_s"])
    ckpt = report["checkpoint"]
    assert ckpt["saves"] == 2 and len(ckpt["blocked_rounds"]) == 2
    # weights + momentum in fp32, plus a little metadata and RNG state
    assert 8 * ckpt["parameters"] <= ckpt["bytes"] <= 8 * ckpt["parameters"] + 1_000_000
    background = report["checkpoint_async"]  # the same checkpoint, written in the background
    assert background["async_save"] and abs(background["bytes"] - ckpt["bytes"]) < 4096  # meta.json differs
    assert background["background_s"] > 0


# ------------------------------------------------------------------------------------------------ bf16 gradients


def _dp2_weights(manifest: Path, tmp_path: Path, compression: str) -> dict[str, torch.Tensor]:
    out, run_dir = tmp_path / f"out-{compression}", tmp_path / f"run-{compression}"
    out.mkdir()
    args = [
        *flags("--data {} --run-dir {} --num-classes 4 --model.widths 16,32,48,48,32", manifest, run_dir),
        *flags("--model.fc-width 64 --model.dropout 0 --batch-size 8 --lr 0.05 --epochs 1"),
        *flags("--tp 1 --train.ten-crop false --train.grad-compression"),
        compression,
    ]
    env = {
        **os.environ,
        "HARNESS_OUT": str(out),
        "HARNESS_DATA": "fixed",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run(
        [TORCHRUN, "--nproc_per_node=2", "--standalone", HARNESS, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = checkpoint.latest(run_dir)
    assert path is not None
    return checkpoint.export_model(path)


@pytest.mark.multiprocess
def test_bf16_gradient_compression_trains_under_dp2(tmp_path: Path) -> None:
    """gloo all-reduces the bf16 gradients: the run trains, close to fp32 all-reduce but not the same."""
    manifest = tmp_path / "data"
    manifest.mkdir()
    fmt.write_manifest(
        manifest, fmt.Manifest(classes=[{"index": i, "wnid": f"n{i:08d}", "name": ""} for i in range(4)])
    )
    full = _dp2_weights(manifest, tmp_path, "none")
    half = _dp2_weights(manifest, tmp_path, "bf16")
    torch.manual_seed(0)  # the trainer's init for seed 0
    from pipeline.model import ModelConfig, build_model

    init = build_model(ModelConfig(num_classes=4, widths=(16, 32, 48, 48, 32), fc_width=64)).state_dict()
    moved = max(float((init[k] - half[k]).abs().max()) for k in init)
    gap = max(float((full[k] - half[k]).abs().max()) for k in full)
    assert all(torch.isfinite(v).all() for v in half.values())
    assert moved > 1e-3, "training moved the weights"
    assert 0 < gap < 0.1 * moved, (gap, moved)  # the hook is in effect, and only rounds the gradients
