"""Seeing inside a running job: profiler traces on demand, the summary of where the time goes, model FLOP/s and
MFU, memory per rank, the memory snapshot on a CUDA out-of-memory error."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from basics.errors import UserError
from pipeline import perf
from pipeline.config import ProfileConfig
from pipeline.model import AlexNet, layer_table
from pipeline.tools import profile as summary_tool
from tests.support import HARNESS, NARROW_FC_WIDTH, NARROW_MODEL, NARROW_WIDTHS, PYTHON, flags
from tests.support.processes import run_logged, small_env, tail

RUN_TIMEOUT = 300


CLASSES = 4


def _hand_forward_flops(widths: tuple[int, ...], fc: int, classes: int) -> int:
    """AlexNet's conv/fc forward FLOPs per image (2 x multiply-adds), written out from the architecture:
    output maps 55, 27, 13, 13, 13; conv2/4/5 see their own tower's half of the input maps."""
    w1, w2, w3, w4, w5 = widths
    macs = (
        w1 * 55 * 55 * 3 * 11 * 11
        + w2 * 27 * 27 * (w1 // 2) * 5 * 5
        + w3 * 13 * 13 * w2 * 3 * 3
        + w4 * 13 * 13 * (w3 // 2) * 3 * 3
        + w5 * 13 * 13 * (w4 // 2) * 3 * 3
        + fc * w5 * 6 * 6
        + fc * fc
        + classes * fc
    )
    return 2 * macs


def test_layer_table_flops_are_the_architectures() -> None:
    with torch.device("meta"):
        model = AlexNet(CLASSES, NARROW_WIDTHS, NARROW_FC_WIDTH)
    table = sum(r.flops for r in layer_table(model))
    assert table == _hand_forward_flops(NARROW_WIDTHS, NARROW_FC_WIDTH, CLASSES)
    assert sum(r.flops for r in layer_table(AlexNet(1000).to("meta"))) == _hand_forward_flops(
        (96, 256, 384, 384, 256), 4096, 1000
    )


def test_profile_steps_at_start_and_a_window_cut_short_by_the_end(classes_only: Path, tmp_path: Path) -> None:
    """--profile.steps 1:5 on a run that stops after 3 steps: steps 2..3 are recorded and written at the end."""
    run_dir, out, log = tmp_path / "run", tmp_path / "out", tmp_path / "train.log"
    out.mkdir()
    argv = [
        PYTHON,
        HARNESS,
        *flags("--data {} --run-dir {} --num-classes {} --tp 1", classes_only, run_dir, CLASSES),
        *NARROW_MODEL,
        *flags("--batch-size 4 --train.ten-crop false --max-steps 3 --checkpoint.every-minutes 0"),
        *flags("--profile.steps 1:5"),
    ]
    env = small_env({"HARNESS_OUT": str(out), "HARNESS_DATA": "fixed"})
    assert run_logged(argv, log, env, RUN_TIMEOUT) == 0, tail(log)
    (trace_path,) = list((run_dir / "profiles").glob("*/rank-0.json"))
    trace = json.loads(trace_path.read_text())
    assert trace["alexnet"]["first_step"] == 1 and trace["alexnet"]["last_step"] == 3
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::conv2d" in names and {"phase/forward", "phase/backward", "phase/step"} <= names, names
    assert "profile of steps 2..3" in log.read_text()
    assert not list(trace_path.parent.glob("*.tmp"))


def test_profile_of_a_run_dir_without_a_running_job_is_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    # A lease its holder left behind when it was killed: a process on this host that has ended since.
    from pipeline.faults.lease import Holder, Lease

    holder = subprocess.Popen(["sleep", "60"])
    Lease.take(run_dir, Holder.from_environ(env={}, pid=holder.pid), timeout_s=600)
    holder.kill()
    holder.wait()
    for target, why in ((run_dir, "no running job"), (tmp_path / "missing", "not a run directory")):
        result = subprocess.run(
            [PYTHON, *flags("-m launch.profile {} --steps 5", target)], env=small_env(), capture_output=True, text=True
        )
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0], result.stderr
        assert why in lines[0]
    assert not list(run_dir.glob("profile.request*"))


def test_profile_steps_option_is_checked() -> None:
    assert ProfileConfig(steps="3:7").window() == (3, 7)
    assert ProfileConfig().window() is None
    for bad in ("7:3", "3", "a:b", "-1:4"):
        with pytest.raises(UserError, match="--profile.steps"):
            ProfileConfig(steps=bad)


def test_cuda_out_of_memory_writes_a_snapshot_and_names_it(tmp_path: Path) -> None:
    """No GPU here: the device is named cuda, torch's recorder and dump are faked, the step raises torch's OOM."""
    recorded, dumped = [], []

    def dump(path: str) -> None:
        dumped.append(path)
        Path(path).write_bytes(b"snapshot")

    def step() -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    def record(**kwargs) -> None:
        recorded.append(kwargs)

    with pytest.raises(UserError) as caught:
        with perf.oom_snapshot(tmp_path, 3, torch.device("cuda", 0), 5000, dump=dump, record=record):
            step()
    message = str(caught.value)
    (path,) = dumped
    assert Path(path).parent == tmp_path / "memory" and Path(path).name.endswith("-rank-3.pickle")
    assert path in message and perf.MEMORY_VIEWER in message and "\n" not in message
    assert "Tried to allocate 2.00 GiB" in message
    # recorded from the start, bounded, Python stacks only; then off
    assert recorded == [{"max_entries": 5000, "stacks": "python"}, {"enabled": None}]

    # Off (--profile.memory-history 0) or on a CPU: nothing recorded, the error goes through untouched.
    for device, entries in ((torch.device("cuda", 0), 0), (torch.device("cpu"), 5000)):
        with pytest.raises(torch.cuda.OutOfMemoryError):
            with perf.oom_snapshot(tmp_path, 0, device, entries, dump=dump, record=record):
                step()
    assert len(dumped) == 1 and len(recorded) == 2


def test_mfu_uses_the_peak_table() -> None:
    t = perf.Throughput(forward_flops=10**9, world_size=4, peak=312.0)
    s = t.scalars(images_per_s=1000.0)
    assert s["perf/model_tflops"] == pytest.approx(3.0) and s["perf/model_tflops_per_device"] == pytest.approx(0.75)
    assert s["perf/mfu"] == pytest.approx(0.75 / 312.0)
    assert perf.Throughput(10**9, 1, None).scalars(1.0)["perf/mfu"] is None
    assert perf.peak_tflops(torch.device("cpu"), "none") is None
    assert perf.peak_tflops(torch.device("cpu"), "none", override=1.5) == 1.5
    assert {"A100", "H100", "H200"} <= set(perf.PEAK_TFLOPS)
    assert all({"bf16", "fp32"} <= set(p) for p in perf.PEAK_TFLOPS.values())


@pytest.mark.parametrize(
    ("name", "row"),
    [
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 80GB HBM3", "H100"),  # SXM5
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA L4", None),
    ],
)
def test_the_peak_table_matches_the_most_specific_name(monkeypatch, name: str, row: str | None) -> None:
    assert perf.peak_row(name) == row
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    want = perf.PEAK_TFLOPS[row]["bf16"] if row else None
    assert perf.peak_tflops(torch.device("cuda", 0), "bf16") == want


def test_counting_flops_never_compiles(monkeypatch) -> None:
    """With --model.compile true the FLOP count runs on an eager model: no compile at every start, and Dynamo
    sees no batch-1 forward that would turn the real graphs' batch dimension dynamic."""
    import torch._dynamo

    from pipeline.model import ModelConfig

    compiled: list[object] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compiled.append(a) or (a[0] if a else None))
    torch._dynamo.reset()
    cfg = ModelConfig(num_classes=4, widths=(8, 16, 16, 16, 8), fc_width=16, compile=True)
    flops = perf.forward_flops_per_image(cfg)
    assert compiled == [] and torch._dynamo.utils.counters["stats"]["calls_captured"] == 0
    assert cfg.compile  # the run's own config is left as it was
    assert flops == perf.forward_flops_per_image(ModelConfig(num_classes=4, widths=(8, 16, 16, 16, 8), fc_width=16))


def _event(name: str, ts: float, dur: float, tid: int = 1, cat: str = "cpu_op", **args) -> dict:
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "cat": cat, "args": args}


def test_summary_of_a_gpu_trace_by_hand() -> None:
    """A made-up CUDA trace whose answer is known: phases on the host, kernels on two streams, one NCCL kernel
    half hidden behind backward compute."""
    annotation = "user_annotation"
    events = [
        # kineto's copies of the host's ranges on the stream (listed first: the host's must still win)
        _event("phase/data", 0, 10, tid=7, cat="gpu_user_annotation"),
        _event("phase/forward", 120, 60, tid=7, cat="gpu_user_annotation"),
        _event("phase/backward", 220, 100, tid=7, cat="gpu_user_annotation"),
        _event("phase/step", 420, 30, tid=7, cat="gpu_user_annotation"),
        _event("phase/data", 0, 100, cat=annotation),
        _event("phase/forward", 100, 100, cat=annotation),
        _event("phase/backward", 200, 200, cat=annotation),
        _event("phase/step", 400, 100, cat=annotation),
        # launches (host) and their kernels (device), tied by correlation ids
        _event("cudaLaunchKernel", 110, 5, cat="cuda_runtime", correlation=1),
        _event("conv_fwd", 120, 60, tid=7, cat="kernel", correlation=1),
        _event("cudaLaunchKernel", 210, 5, cat="cuda_runtime", correlation=2),
        _event("conv_bwd", 220, 100, tid=7, cat="kernel", correlation=2),
        _event("cudaLaunchKernel", 230, 5, cat="cuda_runtime", correlation=3),
        _event("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 270, 100, tid=8, cat="kernel", correlation=3),
        _event("cudaLaunchKernel", 410, 5, cat="cuda_runtime", correlation=4),
        _event("sgd_update", 420, 30, tid=7, cat="kernel", correlation=4),
    ]
    s = summary_tool.summarise({"traceEvents": events, "alexnet": {"wall_s": 500e-6, "rank": 0}}, 0)
    assert s.timeline == "cuda kernels"
    expected = {
        "data": 100,  # no kernel runs while the host waits for a batch
        "forward": 60,
        "backward": 100,
        "communication": 50,  # 270..370, of which 270..320 runs beside conv_bwd
        "optimizer": 30,
        "other": 0,
        "idle": 500 - 100 - 60 - 100 - 50 - 30,
    }
    assert s.parts == pytest.approx({k: v * 1e-6 for k, v in expected.items()})
    assert s.overlap == pytest.approx(0.5) and s.collectives == {"nccl:allreduce": pytest.approx(100e-6)}


def test_kernels_launched_through_the_driver_api_are_attributed_too() -> None:
    """Triton's kernels (torch.compile) and many of cuDNN's are launched with cuLaunchKernel (kineto's
    ``cuda_driver``), the rest with cudaLaunchKernel (``cuda_runtime``): each kernel belongs to the phase of
    its own launch, whichever API made it, not to the phase in progress when it ran on the device."""
    annotation = "user_annotation"
    events = [
        _event("phase/forward", 0, 100, cat=annotation),
        _event("phase/backward", 100, 100, cat=annotation),
        _event("phase/step", 200, 100, cat=annotation),
        # queued in forward (one launch per API), run while the host is already in backward
        _event("cuLaunchKernel", 10, 5, cat="cuda_driver", correlation=11),
        _event("triton_poi_fused_relu_0", 120, 40, tid=7, cat="kernel", correlation=11),
        _event("cudaLaunchKernel", 20, 5, cat="cuda_runtime", correlation=12),
        _event("cudnn_conv_fwd", 160, 20, tid=7, cat="kernel", correlation=12),
        # queued in backward through the driver, run during step
        _event("cuLaunchKernelEx", 150, 5, cat="cuda_driver", correlation=13),
        _event("triton_red_fused_bwd_1", 210, 30, tid=7, cat="kernel", correlation=13),
    ]
    s = summary_tool.summarise({"traceEvents": events, "alexnet": {"wall_s": 300e-6, "rank": 0}}, 0)
    assert s.parts["forward"] == pytest.approx(60e-6)
    assert s.parts["backward"] == pytest.approx(30e-6)
    assert s.parts["optimizer"] == 0.0


def test_summary_of_a_cpu_trace_by_hand() -> None:
    """A made-up CPU trace whose answer is known: the training thread's operators and a gloo all-reduce in
    gloo's thread, 30 of whose 100 us run beside backward's operator; an operator inside the collective's own
    c10d range (its copies) is communication, not compute."""
    annotation = "user_annotation"
    events = [
        _event("phase/data", 0, 100, cat=annotation),
        _event("phase/forward", 100, 100, cat=annotation),
        _event("phase/backward", 200, 200, cat=annotation),
        _event("phase/step", 400, 100, cat=annotation),
        _event("aten::conv2d", 110, 80),
        _event("aten::convolution_backward", 210, 90),
        _event("c10d::allreduce_", 300, 20),
        _event("aten::copy_", 305, 5),  # inside the collective: not compute hiding it
        _event("gloo:all_reduce", 270, 100, tid=2, cat="record_param_comms"),
        _event("aten::add_", 410, 30),
    ]
    s = summary_tool.summarise({"traceEvents": events, "alexnet": {"wall_s": 500e-6, "rank": 1}}, 1)
    assert s.timeline == "cpu operators" and s.rank == 1
    expected = {
        "data": 100,
        "forward": 80,
        "backward": 90,
        "communication": 70,  # 300..370: the all-reduce after backward's operator ends
        "optimizer": 30,
        "other": 0,
        "idle": 500 - 100 - 80 - 90 - 70 - 30,
    }
    assert s.parts == pytest.approx({k: v * 1e-6 for k, v in expected.items()})
    assert s.comm_s == pytest.approx(100e-6) and s.comm_overlapped_s == pytest.approx(30e-6)
    assert s.overlap == pytest.approx(0.3) and s.collectives == {"gloo:all_reduce": pytest.approx(100e-6)}


def test_summary_of_a_folder_without_traces_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert summary_tool.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no rank-N.json" in err[0]
    (tmp_path / "rank-0.json").write_text("{not json")
    assert summary_tool.main([str(tmp_path)]) == 2
    assert "not a JSON trace" in capsys.readouterr().err


def test_the_oom_history_default_costs_a_few_mb_of_host_memory_per_rank() -> None:
    """What an entry of the allocation history holds on the host beyond its fixed ~200 bytes is its Python
    traceback (stacks="python"): one is gathered here at this test's depth inside a model's forward (deeper
    than the trainer's), held 4,000 times, and the resident set grows by that many. The default's cost
    must stay a few MB per rank (docs/BENCHMARKS.md: 100,000 entries cost ~150 MB per rank, 10,000 ~15)."""
    import gc

    from torch._C._profiler import gather_traceback

    from pipeline.config import ProfileConfig

    held: list[object] = []
    conv = torch.nn.Conv2d(3, 4, 3)
    conv.register_forward_hook(lambda *_: held.append(gather_traceback(python=True, script=True, cpp=False)))
    n = 4_000
    x = torch.zeros(1, 3, 5, 5)
    for _ in range(n // 4):  # warm: the first calls' own allocations (kernels' caches) are not history
        conv(x)
    held.clear()
    gc.collect()
    before = perf.host_rss_bytes()
    for _ in range(n):
        conv(x)
    per_entry = (perf.host_rss_bytes() - before) / n + 200  # + the TraceEntry itself (c10 CachingDeviceAllocator.h)
    assert 100 < per_entry < 8192, per_entry  # torch's docs: "several KB" at most
    assert ProfileConfig().memory_history * per_entry < 32 * 2**20, (ProfileConfig().memory_history, per_entry)
