"""pipeline.bench.train / bench_gpu and --train.grad-compression: the report's shape and honesty, not speed."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from basics.errors import UserError
from pipeline import checkpoint, config
from pipeline.bench import gpu as bench_gpu
from pipeline.bench import harness
from pipeline.bench import train as bench_train
from pipeline.data import DataConfig
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


def test_recording_counts_only_the_window() -> None:
    record = harness.Recording()
    source = iter([(None, torch.zeros(n)) for n in (5, 5, 7, 3, 9)])
    loader = harness.RecordingLoader(source, 4, record, lambda: None, (1, 3))
    assert len(list(loader)) == 4
    window = record.window(1, 2)
    assert window["images"] == 12  # batches 1 and 2: 5 + 7
    assert window["cpu_s_per_step"] >= 0 and len(record.cpu) == 2
    with pytest.raises(RuntimeError, match="fewer than"):
        record.window(1, 4)


def test_scaling_estimate_follows_its_stated_model() -> None:
    a = bench_train.ScalingAssumptions()
    one = bench_train.scaling_estimate(1, 100, grad_bytes_per_param=4, overlap=False)
    assert one["allreduce_s"] == pytest.approx(2 * 7 / 8 * 4 * a.parameters / a.nvlink_bytes_per_s)  # NVLink only
    for link in (100, 400):
        for nodes in (2, 8, 32):
            fp32 = bench_train.scaling_estimate(nodes, link, grad_bytes_per_param=4, overlap=False)
            bf16 = bench_train.scaling_estimate(nodes, link, grad_bytes_per_param=2, overlap=False)
            hidden = bench_train.scaling_estimate(nodes, link, grad_bytes_per_param=4, overlap=True)
            assert bf16["allreduce_s"] == pytest.approx(fp32["allreduce_s"] / 2)
            assert fp32["efficiency"] < bf16["efficiency"] and fp32["efficiency"] < hidden["efficiency"] < 1
            assert fp32["step_s"] == pytest.approx(a.step_s + fp32["allreduce_s"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--loaders", "dali"], "pass --data"),
        (["--loaders", "dali,fast"], "unknown fast"),
    ],
)
def test_bad_options_are_one_line_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_train.main([*TINY, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_gpu_report_without_a_gpu_says_so_in_one_line(demo_shards: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, *flags("-m pipeline.bench.train --gpu-report --data {}", demo_shards)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --gpu-report needs a CUDA GPU")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_gpu_report_pieces_run_on_cpu(demo_shards: Path) -> None:
    """The bare DALI graph and the torchvision recipe make training batches; CPU vs CPU augmentation matches."""
    cfg = DataConfig(data=str(demo_shards), workers=1)
    pipe = bench_gpu.dali_graph(cfg, batch_size=4, workers=1, gpu=False, hw_decoder_load=0.0)
    images, labels = pipe.run()
    assert images.as_tensor().shape() == [4, 3, 227, 227] and len(labels) == 4
    batches = bench_gpu.torchvision_batches(cfg, batch_size=4, workers=0, device="cpu")
    for images, labels in itertools.islice(batches, 2):
        assert images.shape == (4, 3, 227, 227) and images.dtype == torch.float32
        assert int(labels.max()) < DEMO_CLASSES
    same = bench_gpu.compare_devices(cfg, batch_size=8, gpu_device="cpu", batches=2)
    assert same["match"] and same["same_order"] and same["images"] == 16 and same["image_mae_max"] == 0


# ------------------------------------------------------------------------------------------------ bf16 gradients


def test_grad_compression_option_is_checked(tmp_path: Path) -> None:
    cfg, _ = config.parse(flags("--data {} --train.grad-compression bf16", tmp_path))
    assert cfg.train.grad_compression == "bf16"
    with pytest.raises(UserError, match="--train.grad-compression must be none or bf16"):
        config.parse(flags("--data {} --train.grad-compression fp8", tmp_path))


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
