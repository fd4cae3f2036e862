"""pipeline.bench.train / bench_gpu and --train.grad-compression: the report's shape and honesty, not speed."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from basics.errors import UserError
from pipeline import config
from pipeline.bench import gpu as bench_gpu
from pipeline.bench import harness
from pipeline.bench import train as bench_train
from pipeline.data import DataConfig
from tests.support import DEMO_CLASSES, REPO, flags

TINY = flags("--size tiny --warmup 1 --steps 3 --workers 1")


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
