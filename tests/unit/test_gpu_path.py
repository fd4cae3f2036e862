"""The GPU path on CPU: what can be decided without a GPU is tested here with fakes (a device clock, a device
count, CUDA's RNG, DALI's operators, NCCL's send/recv); what only a GPU can tell is in `make gpu-check`
(pipeline/bench/gpu_check.py), whose refusal on a machine without CUDA is tested here too."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from basics.errors import UserError
from launch import preflight
from pipeline import checkpoint, process, seeds
from pipeline.faults.stragglers import StragglerWatch
from pipeline.faults.watchdog import Record, judge
from pipeline.phases import Allowance, CudaEventClock, HostClock, PhaseMarks
from tests.support import PYTHON, REPO

# ------------------------------------------------------------------------------------------ a fake GPU


class FakeGpu:
    """One stream: kernels run back to back from when they are queued; the host runs ahead until it syncs."""

    def __init__(self) -> None:
        self.host = 0.0  # the host's clock (s)
        self.busy = 0.0  # when the stream finishes what is queued
        self.syncs = 0

    def launch(self, seconds: float, host_s: float = 0.0005) -> None:
        self.host += host_s  # queueing costs the host a little
        self.busy = max(self.busy, self.host) + seconds

    def wait_host(self, seconds: float) -> None:
        self.host += seconds

    def event(self) -> FakeEvent:
        return FakeEvent(self)


class FakeEvent:
    """torch.cuda.Event's timing API: reached when the stream gets there; ``elapsed_time`` in ms."""

    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu, self.at = gpu, None

    def record(self) -> None:
        self.at = max(self.gpu.busy, self.gpu.host)
        self.gpu.busy = self.at

    def synchronize(self) -> None:
        self.gpu.syncs += 1
        self.gpu.host = max(self.gpu.host, self.at)

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.gpu.host >= end.at, "read before the stream reached the event"
        return (end.at - self.at) * 1000.0


def _marks(gpu: FakeGpu, device: bool) -> PhaseMarks:
    marks = PhaseMarks()
    marks.use_clock(CudaEventClock(event=gpu.event) if device else HostClock(clock=lambda: gpu.host))
    return marks


def test_cuda_event_clock_books_queued_work_to_its_phase_and_syncs_only_when_read() -> None:
    gpu = FakeGpu()
    marks = _marks(gpu, device=True)
    window = marks.window()
    for _ in range(10):
        marks.enter("data")
        gpu.wait_host(0.002)  # the batch arrives late: the GPU idles in "data"
        marks.enter("forward")
        gpu.launch(0.030)
        marks.enter("backward")
        gpu.launch(0.060)
        marks.enter("step")
        gpu.launch(0.010)
    assert gpu.syncs == 0, "no host sync per step"
    marks.enter("control")
    host_before = gpu.host
    seconds = window.take()
    assert gpu.syncs > 0 and gpu.host == pytest.approx(gpu.busy)  # the host waited once, for all of it
    assert gpu.host - host_before == pytest.approx(0.99, abs=0.03)
    assert seconds["forward"] == pytest.approx(0.30, rel=0.02)
    assert seconds["backward"] == pytest.approx(0.60, rel=0.02)
    assert seconds["step"] == pytest.approx(0.10, rel=0.02)
    assert seconds["data"] < 0.03  # the host ran ahead: the GPU barely waited for data
    # The host clock books none of that work where it ran, only enqueue times.
    gpu2 = FakeGpu()
    host = _marks(gpu2, device=False)
    hw = host.window()
    host.enter("forward")
    gpu2.launch(0.030)
    host.enter("control")
    gpu2.host = gpu2.busy  # the control step's tolist waits for the GPU
    assert hw.take()["forward"] < 0.001


def _simulate(device: bool, slow_gpu: float = 2.0, slow_data_s: float = 0.0) -> tuple[list[str], dict[str, float]]:
    """Two ranks in lockstep, rank 1's GPU ``slow_gpu`` x slower (or its batches ``slow_data_s`` late): the
    gradient all-reduce and the control all-reduce make each stream wait for the other; the straggler watch
    reads each rank's phase seconds as the trainer does (PhaseMarks.take_seconds at control steps)."""
    gpus = [FakeGpu(), FakeGpu()]
    marks = [_marks(g, device) for g in gpus]
    watch = StragglerWatch(0, 2, ["h0", "h1"], threshold=1.5, window=3)
    lines: list[str] = []
    scalars: dict[str, float] = {}
    handler = logging.Handler()
    handler.emit = lambda r: lines.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("alexnet").addHandler(handler)
    try:
        for _control in range(5):
            for _ in range(4):
                for r, (g, m) in enumerate(zip(gpus, marks)):
                    m.enter("data")
                    g.wait_host(0.001 + (slow_data_s if r == 1 else 0.0))
                    m.enter("forward")
                    g.launch(0.02 * (slow_gpu if r == 1 else 1.0))
                    m.enter("backward")
                    g.launch(0.04 * (slow_gpu if r == 1 else 1.0))
                    m.enter("gradient-sync")
                done = max(g.busy for g in gpus) + 0.002  # the all-reduce ends when both got there
                for g, m in zip(gpus, marks):
                    g.busy = done
                    m.enter("step")
                    g.launch(0.005)
            flags = torch.zeros(watch.slots())
            for r, m in enumerate(marks):
                m.enter("control")
                mine = torch.zeros(watch.slots())
                StragglerWatch(r, 2, ["h0", "h1"], 1.5, 3).fill(mine, m.take_seconds(), 4)
                flags = torch.maximum(flags, mine)
            end = max(max(g.busy, g.host) for g in gpus) + 0.001  # the control all-reduce + tolist
            for g in gpus:
                g.host = g.busy = end
            scalars = watch.observe(flags.tolist())
    finally:
        logging.getLogger("alexnet").removeHandler(handler)
    return [line for line in lines if line.startswith("straggler:")], scalars


def test_a_slow_gpu_is_named_from_device_time_not_from_host_clocks() -> None:
    named, scalars = _simulate(device=True)
    assert len(named) == 1 and named[0].startswith("straggler: rank 1 (host h1)"), named
    assert "on compute" in named[0]
    assert scalars["perf/slowest_rank"] == 1.0
    # Host clocks (today's figures on a GPU): both ranks' own work looks equal, nobody is named.
    named_host, _ = _simulate(device=False)
    assert named_host == []


def test_a_rank_whose_batches_come_late_is_named_on_data_from_device_time() -> None:
    named, scalars = _simulate(device=True, slow_gpu=1.0, slow_data_s=0.15)
    assert len(named) == 1 and "rank 1" in named[0] and "on data" in named[0], named
    assert scalars["perf/rank_data_wait_fraction_max"] > 0.5


def test_progress_line_and_tensorboard_take_the_data_wait_from_the_phase_clock(caplog) -> None:
    from pipeline.config import TrainConfig
    from pipeline.metrics import StepTimer
    from pipeline.train_log import StepRecord, TrainLog

    class Writer:
        values: dict[str, float] = {}

        def scalars(self, values: dict[str, float], step: int) -> None:
            self.values.update(values)

    writer = Writer()
    seconds = {"data": 1.0, "forward": 1.0, "backward": 1.5, "step": 0.5, "validation": 9.0}
    log = TrainLog(
        writer,  # type: ignore[arg-type]
        TrainConfig(log_every=1),
        is_main=True,
        device=torch.device("cpu"),
        named_parameters=dict,
        conv1_filters=list,
        phase_seconds=lambda: seconds,
    )
    timer = StepTimer()
    timer.data_ready()  # the host saw no data wait at all
    timer.step_done(8)
    record = StepRecord(
        0, 5, 5, 10, torch.tensor(1.0), torch.zeros(8, 4), torch.zeros(8, dtype=torch.long), None, 0.1, 1.0
    )
    with caplog.at_level(logging.INFO, logger="alexnet"):
        log.step(record, timer)
    assert writer.values["perf/data_wait_fraction"] == pytest.approx(0.25)
    assert "data 25%" in caplog.text
    from pipeline.bench.gpu_check import training_figures  # what the GPU check reads from the line

    assert training_figures(caplog.text)["data_wait_percent_last"] == 25


def test_gpu_memory_counts_what_torch_does_not_see_and_resets_the_peak(monkeypatch) -> None:
    from pipeline import train_log

    resets = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: resets.append(d))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (70 * 2**30, 80 * 2**30))  # DALI's pool, context
    got = train_log.gpu_memory(torch.device("cuda", 0))
    assert got == {"perf/gpu_mem_gib": 3.0, "perf/gpu_mem_used_gib": 10.0}
    assert resets == [torch.device("cuda", 0)]


# ------------------------------------------------------------------------------------------ checkpoints


def _state(run_dir: Path, seed: int = 0) -> checkpoint.TrainState:
    from pipeline.config import RunConfig
    from pipeline.model import ModelConfig, build_model
    from pipeline.schedule import LRSchedule

    cfg = RunConfig(run_dir=str(run_dir))
    cfg.model = ModelConfig(num_classes=4, widths=(8, 16, 16, 16, 8), fc_width=16)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    layout = {"world_size": 1, "dp_size": 1, "tp_size": 1}
    return checkpoint.TrainState(model, optimizer, LRSchedule(cfg.schedule, 0.01), cfg, layout, rank=0, tp_rank=0)


def _saver(run_dir: Path) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(run_dir, checkpoint.CheckpointConfig(every_minutes=0), rank=0)


def test_a_cpu_checkpoint_resumes_where_cuda_rng_is_expected(tmp_path: Path, monkeypatch) -> None:
    """A CPU run saves no CUDA RNG; on a GPU (same layout) the restore asked for rng.rank0.cuda and failed."""
    state = _state(tmp_path)
    path = _saver(tmp_path).save(state, torch.device("cpu"))
    assert "rng.rank0.cuda" not in checkpoint.read_meta(path)["tensors"]

    cuda_seeds: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: torch.zeros(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a: pytest.fail("no CUDA state was saved"))
    monkeypatch.setattr(torch.cuda, "manual_seed", cuda_seeds.append)
    fresh = _state(tmp_path, seed=1)
    assert "rng.rank0.cuda" in fresh.tensor_templates(with_rng=True)  # what a GPU run expects
    assert _saver(tmp_path).restore(fresh, None) == path
    assert fresh.rng_restored >= {"torch", "python", "numpy"} and "cuda" not in fresh.rng_restored
    torch.testing.assert_close(fresh.model.state_dict(), state.model.state_dict())
    # The GPU's generator gets the replica's stream for this step (the same on both towers of a pair).
    seeds.after_resume(3, 1, 40, fresh.rng_restored, cuda=True)
    assert cuda_seeds == [seeds.replica_seed(3, 1, 40)]


def test_rng_not_restored_after_a_layout_change_is_reseeded_per_replica_and_step(monkeypatch) -> None:
    seeded: list[int] = []
    monkeypatch.setattr(torch, "manual_seed", seeded.append)
    seeds.after_resume(3, 1, 40, restored=set(), cuda=False)
    seeds.after_resume(3, 1, 40, restored={"torch", "python", "numpy"}, cuda=False)  # restored: nothing to do
    assert seeded == [seeds.replica_seed(3, 1, 40)]
    assert len({seeds.replica_seed(3, d, s) for d in range(4) for s in (0, 40)}) == 8


def _layout_state(run_dir: Path, channels_last: bool, seed: int) -> checkpoint.TrainState:
    """The trainer's own optimizer (fused SGD, buffers from the start) on a model in the layout asked for."""
    from pipeline.config import RunConfig
    from pipeline.model import ModelConfig, build_model
    from pipeline.schedule import LRSchedule
    from pipeline.train_step import build_optimizer

    cfg = RunConfig(run_dir=str(run_dir))
    cfg.model = ModelConfig(
        num_classes=4, widths=(8, 16, 16, 16, 8), fc_width=16, dropout=0.0, channels_last=channels_last
    )
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    layout = {"world_size": 1, "dp_size": 1, "tp_size": 1}
    return checkpoint.TrainState(
        model, build_optimizer(model, cfg.optim), LRSchedule(cfg.schedule, 0.01), cfg, layout, rank=0, tp_rank=0
    )


def _sgd_step(state: checkpoint.TrainState, x: torch.Tensor) -> None:
    state.optimizer.zero_grad()
    state.model(x).square().mean().backward()
    state.optimizer.step()


def test_a_resume_with_the_memory_layout_flipped_keeps_its_momentum(tmp_path: Path) -> None:
    """Saved in channels_last, resumed without (and the reverse): the momentum goes into the live weights'
    strides, so the first step after the resume is the same-layout resume's step within layout noise. The
    saved strides would scramble every conv layer's update (CPU; fused SGD on CUDA refuses them)."""
    x = torch.randn(2, 3, 227, 227, generator=torch.Generator().manual_seed(0))
    for saved_layout in (True, False):
        run = tmp_path / f"saved-channels-last-{saved_layout}"
        saved = _layout_state(run, saved_layout, seed=0)
        for _ in range(3):  # momentum that differs from zero and from the gradient
            _sgd_step(saved, x)
        _saver(run).save(saved, torch.device("cpu"))
        updates = {}
        for layout in (saved_layout, not saved_layout):
            resumed = _layout_state(run, layout, seed=1)
            assert _saver(run).restore(resumed, None) is not None
            for p in resumed.model.parameters():
                assert resumed.optimizer.state[p]["momentum_buffer"].stride() == p.stride()
            before = {n: p.detach().clone() for n, p in resumed.model.named_parameters()}
            _sgd_step(resumed, x)
            updates[layout] = {n: p.detach() - before[n] for n, p in resumed.model.named_parameters()}
        same, flipped = updates[saved_layout], updates[not saved_layout]
        for name in (n for n in same if n.startswith("conv") and n.endswith("weight")):
            relative = ((flipped[name] - same[name]).norm() / same[name].norm()).item()
            assert relative < 1e-2, (saved_layout, name, relative)  # noise ~1e-4; scrambled ~1


# ------------------------------------------------------------------------------------------ torch.compile


def test_a_compile_gets_the_slow_phase_allowance() -> None:
    allowance = Allowance(step_s=120, slow_s=480)

    def records(phase: str) -> dict[int, Record]:
        return {r: Record(r, "h", 1, "a", 5, 0, phase, 0.0, 299.0) for r in range(2)}

    assert judge(records("compile"), 2, 300.0, allowance, stale_s=30) is None
    assert judge(records("forward"), 2, 300.0, allowance, stale_s=30) is not None


def test_first_step_and_first_validation_batch_under_compile_are_marked_compile(tmp_path: Path, monkeypatch) -> None:
    from pipeline.config import RunConfig
    from pipeline.mesh import ParallelDims, build_mesh
    from pipeline.model import ModelConfig
    from pipeline.train import Loaders, build_trainer

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: None)  # the marks are the point here
    seen: list[tuple[str, int]] = []

    class Recording(PhaseMarks):
        def enter(self, phase: str, step: int | None = None) -> None:
            super().enter(phase, step)
            seen.append((phase, self.current.step))

        def tick(self, phase: str | None = None) -> None:
            super().tick(phase)
            seen.append((f"tick:{phase}", self.current.step))

    batches = [(torch.randn(2, 3, 227, 227), torch.tensor([0, 1])) for _ in range(3)]

    class Loader(list):
        steps_in_epoch = 3

    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    cfg.model = ModelConfig(num_classes=4, widths=(8, 16, 16, 16, 8), fc_width=16, compile=True)
    cfg.train.tp, cfg.train.max_steps, cfg.train.epochs, cfg.optim.batch_size = 1, 3, 1, 2
    cfg.checkpoint.every_minutes, cfg.train.ten_crop = 0, False
    trainer = build_trainer(
        cfg,
        build_mesh(ParallelDims(1, 0, 1), "cpu"),
        torch.device("cpu"),
        threading.Event(),
        Loaders(train=lambda *a, **k: Loader(batches), val=lambda *a, **k: list(batches)),
        marks=Recording(),
    )
    trainer.fit()
    steps = [(p, s) for p, s in seen if p in ("compile", "forward", "backward")]
    assert steps[:2] == [("compile", 0), ("compile", 0)], steps
    assert [p for p, _ in steps[2:]] == ["forward", "backward"] * 2
    seen.clear()
    trainer.validate(0)
    val = [p for p, _ in seen if p not in ("loader",)]
    assert val[:2] == ["compile", "tick:validation"], val
    seen.clear()
    trainer.validate(0)
    assert [p for p, _ in seen if p != "loader"][:1] == ["validation"]  # compiled: later validations are normal
    trainer.writer.close()


# ------------------------------------------------------------------------------------------ devices


def test_a_local_rank_without_its_gpu_is_one_line_naming_cuda_visible_devices(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # Slurm --gpus-per-task: one GPU, seen as ordinal 0
    assert process.select_device("auto", 0) == torch.device("cuda", 0)
    with pytest.raises(UserError) as e:
        process.select_device("auto", 1)
    msg = str(e.value)
    assert "\n" not in msg and "local rank 1" in msg and "CUDA_VISIBLE_DEVICES=3" in msg and "sees 1" in msg


def test_auto_refuses_gpus_torch_cannot_use_instead_of_training_on_the_cpu(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(process, "unusable_gpus", lambda: "8 device node(s) /dev/nvidia0...")
    with pytest.raises(UserError) as e:
        process.select_device("auto", 0)
    assert "\n" not in str(e.value) and "--train.device cpu" in str(e.value) and "driver" in str(e.value)
    assert process.select_device("cpu", 0) == torch.device("cpu")
    monkeypatch.setattr(process, "unusable_gpus", lambda: "")
    assert process.select_device("auto", 0) == torch.device("cpu")
    # What decides it: the driver's device nodes, unless the GPUs are hidden on purpose.
    monkeypatch.undo()
    monkeypatch.setattr(process.torch.version, "cuda", "13.0")
    monkeypatch.setattr(process, "Path", lambda p: tmp_path if p == "/dev" else Path(p))
    (tmp_path / "nvidia0").touch()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert process.unusable_gpus().startswith("1 device node")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert process.unusable_gpus() == ""


def test_preflight_link_is_timed_after_a_warm_up_and_a_device_sync(monkeypatch) -> None:
    """On NCCL a send only enqueues and the first one builds the pair's communicator: the clock must start
    after an untimed exchange and stop after a sync (only a GPU shows the figures; the order is shown here)."""
    events: list[str] = []
    monkeypatch.setattr(preflight.dist, "send", lambda buf, peer: events.append("send"))
    monkeypatch.setattr(preflight.dist, "recv", lambda buf, peer: events.append("recv"))
    monkeypatch.setattr(preflight.dist, "broadcast_object_list", lambda box, src: None)
    ticks = iter(range(100))

    def clock() -> float:
        events.append("clock")
        return float(next(ticks))

    monkeypatch.setattr(preflight.time, "perf_counter", clock)
    figures = preflight.link_mb_per_s(torch.device("cpu"), 0, 2, lambda: events.append("sync"))
    assert events[:4] == ["send", "recv", "sync", "clock"], events
    assert events[-2:] == ["sync", "clock"], events
    assert events.count("send") == 4 and figures[1] > 0


# ------------------------------------------------------------------------------------------ DALI


def test_the_mixed_decoder_upsamples_chroma_as_libjpeg_turbo(monkeypatch) -> None:
    from nvidia.dali import fn

    from pipeline.data import dali_pipeline

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(fn.decoders, "image", lambda jpegs, **kw: calls.append(kw))
    dali_pipeline.decode(None, gpu=True)
    dali_pipeline.decode(None, gpu=False)
    assert calls[0]["device"] == "mixed" and calls[0]["jpeg_fancy_upsampling"] is True
    assert calls[1]["device"] == "cpu" and "jpeg_fancy_upsampling" not in calls[1]  # the CPU decoder's own way


def test_the_benchmarks_bare_dali_graph_runs_on_the_device_asked_for(monkeypatch) -> None:
    import nvidia.dali

    from pipeline import data
    from pipeline.bench import gpu

    class Built(Exception):
        pass

    def pipeline(**kw: Any) -> None:
        raise Built(kw)

    norm = types.SimpleNamespace(max_offset=0)
    monkeypatch.setattr(data, "open_dataset", lambda cfg, split: (None, norm))
    monkeypatch.setattr(nvidia.dali, "Pipeline", pipeline)
    with pytest.raises(Built) as e:
        gpu.dali_graph(None, batch_size=4, workers=1, gpu=True, hw_decoder_load=0.5, device_id=gpu.cuda_index("cuda:3"))
    assert e.value.args[0]["device_id"] == 3


# ------------------------------------------------------------------------------------------ the GPU check


def test_gpu_check_refuses_in_one_line_without_cuda(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [PYTHON, "-m", "pipeline.bench.gpu_check", "--out", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "CUDA" in lines[0], lines
    assert not (tmp_path / "out").exists()  # nothing made, no shards, before the refusal


# ------------------------------------------------------------------------------------------ on a GPU (make gpu-check)


def _warm_up(device: torch.device, a: torch.Tensor) -> None:
    """What a fresh process does once, outside the timed regions: the first matmul creates the cuBLAS handle
    and workspace and loads the kernels' modules on the host (tens to hundreds of ms, all of it host time
    inside the "queued" figure: ``forward > 3 * queued`` then fails); the first backward starts autograd's
    device thread; the first CUDA event creates its pool."""
    w = torch.randn_like(a, requires_grad=True)
    (w @ a).clamp(-1, 1).square().mean().backward()
    torch.cuda.Event(enable_timing=True).record()
    torch.cuda.synchronize(device)


@pytest.mark.cuda
def test_cuda_event_clock_sees_the_device_time_the_host_only_queued() -> None:
    import time

    device = torch.device("cuda", 0)
    a = torch.randn(4096, 4096, device=device)
    _warm_up(device, a)
    marks = PhaseMarks()
    marks.time_on(device)
    window = marks.window()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    marks.enter("forward")
    for _ in range(40):
        a = (a @ a).clamp_(-1, 1)
    queued = time.perf_counter() - start
    marks.enter("control")
    torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    seconds = window.take()
    assert seconds["forward"] == pytest.approx(wall, rel=0.25), (seconds, wall, queued)
    assert seconds["forward"] > 3 * queued, "the host clock would have booked this in control"
    assert seconds.get("control", 0.0) < 0.25 * seconds["forward"]

    # A mark from autograd's device thread (the trainer's gradient-sync hook) is recorded in stream order: w's
    # gradient is accumulated once, after every kernel of the backward pass, so its event follows them on the
    # stream and the device time is backward's; nothing is queued after it, so gradient-sync gets next to
    # none. An event on another stream (or a host clock) would complete as the host reached it: backward
    # would get the host's queueing time and the device's work would land in gradient-sync (or step).
    w = torch.randn(4096, 4096, device=device, requires_grad=True)
    w.register_post_accumulate_grad_hook(lambda _: marks.enter("gradient-sync"))
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    marks.enter("backward")
    loss = sum((w @ a).square().mean() for _ in range(10))
    loss.backward()
    queued = time.perf_counter() - start
    marks.enter("step")
    torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    after = window.take()
    assert "gradient-sync" in marks.seconds(), after  # the autograd thread's event was read
    assert after["backward"] == pytest.approx(wall, rel=0.25), (after, wall, queued)
    assert after["backward"] > 3 * queued, (after, queued)
    assert after.get("gradient-sync", 0.0) < 0.05 * after["backward"], after
    assert after.get("step", 0.0) < 0.25 * after["backward"], after


@pytest.mark.cuda
def test_mixed_decode_matches_the_cpu_decoder_on_4_2_0_jpegs() -> None:
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    from pipeline.data import dali_pipeline
    from tests.support.datasets import encode_jpeg, natural_image

    rng = np.random.default_rng(0)
    blobs = [np.frombuffer(encode_jpeg(natural_image(rng), quality=90, subsampling=2), np.uint8) for _ in range(8)]

    def decoded(gpu: bool, fancy: bool = True) -> np.ndarray:
        @pipeline_def(batch_size=len(blobs), num_threads=2, device_id=0)
        def pipe():
            jpegs = fn.external_source(source=lambda: blobs, batch=True)
            if fancy:
                return dali_pipeline.decode(jpegs, gpu=gpu)
            return fn.decoders.image(jpegs, device="mixed")

        p = pipe()
        p.build()
        (out,) = p.run()
        out = out.as_cpu() if gpu else out
        return np.stack([np.array(out[i]) for i in range(len(blobs))]).astype(np.int16)

    cpu = decoded(gpu=False)
    fancy = np.abs(decoded(gpu=True) - cpu)
    plain = np.abs(decoded(gpu=True, fancy=False) - cpu)
    assert fancy.mean() < 0.5 and np.mean(fancy > 2) < 1e-3, (fancy.mean(), fancy.max())
    assert fancy.mean() <= plain.mean(), (fancy.mean(), plain.mean())


@pytest.mark.cuda
def test_device_checks_on_this_gpu() -> None:
    count = torch.cuda.device_count()
    assert process.select_device("auto", 0) == torch.device("cuda", 0)
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES"):
        process.select_device("auto", count)


@pytest.mark.cuda
def test_gpu_memory_on_this_gpu_resets_its_peak() -> None:
    from pipeline.train_log import gpu_memory

    device = torch.device("cuda", 0)
    big = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB
    first = gpu_memory(device)
    del big
    torch.cuda.empty_cache()
    second = gpu_memory(device)
    assert first["perf/gpu_mem_gib"] >= 0.25 and first["perf/gpu_mem_used_gib"] >= first["perf/gpu_mem_gib"]
    assert second["perf/gpu_mem_gib"] < first["perf/gpu_mem_gib"]


def test_gpu_check_steps_record_failures_time_limits_and_the_budget(tmp_path: Path) -> None:
    """The check's plumbing, on CPU: a failing step, one killed at its limit and one past the budget are
    reported as failed with their reason; the report renders them."""
    import time

    from pipeline.bench import gpu_check

    c = gpu_check.Check(tmp_path, tmp_path / "work", budget_s=120)
    ok = c.python("ok", ["-c", "print('fine')"], 30, figures=lambda out: {"said": out.strip()})
    bad = c.python("bad", ["-c", "import sys; print('broken'); sys.exit(3)"], 30)
    slow = c.python("slow", ["-c", "import time; time.sleep(60)"], 6)
    c.deadline = time.monotonic()
    late = c.python("late", ["-c", "print('never')"], 30)
    c.log.close()
    assert ok.ok and ok.figures == {"said": "fine"}
    assert not bad.ok and bad.rc == 3 and "broken" in bad.tail
    assert not slow.ok and slow.rc is None and "killed after 6 s" in slow.tail and slow.seconds < 30
    assert not late.ok and "budget" in late.tail
    versions = {k: "v" for k in ("gpu", "capability", "driver", "torch", "torch_cuda", "cudnn", "dali", "python")}
    result = {
        "ok": False,
        "seconds": 9.0,
        "versions": {**versions, "commit": "c", "date_utc": "d"},
        "steps": [vars(s) for s in c.steps],
        "not_checked": ["x"],
    }
    text = gpu_check.markdown(result)
    assert "| ok | ok |" in text and "## bad (exit 3)" in text and "## slow (exit None)" in text
    assert "broken" in (tmp_path / "gpu-check.log").read_text()


def test_gpu_check_fits_its_budget_with_a_margin_per_step() -> None:
    """Every step's limit leaves it half again its expected seconds on one H100, and the limits together
    leave the budget a margin for what runs between them (versions, start-ups, the report)."""
    from pipeline.bench import gpu_check

    assert gpu_check.BUDGET_S == 480  # 8 minutes
    assert all(p.limit_s >= 1.5 * p.expected_s for p in gpu_check.PLAN), gpu_check.PLAN
    assert sum(p.limit_s for p in gpu_check.PLAN) == 440 and gpu_check.margin_s() == 40
    assert len(gpu_check.LIMITS) == len(gpu_check.PLAN)  # one limit per step name
    source = Path(gpu_check.__file__).read_text()
    used = set(re.findall(r'LIMITS\["([^"]+)"\]', source))
    assert used == set(gpu_check.LIMITS), used ^ set(gpu_check.LIMITS)  # each step runs under its planned limit
    docs = (REPO / "docs" / "gpu-check.md").read_text()
    assert all(f"| {p.name} | {p.expected_s:g} | {p.limit_s:g} |" in docs for p in gpu_check.PLAN)


def _report_figures(**over: float) -> dict[str, dict[str, float]]:
    report = {"trainer_vs_model_alone": 0.95, "trainer_data_wait_fraction": 0.01, "image_mae_max": 0.8}
    return {
        "gpu report": {**report, "channel_mean_gap": 0.2, **over},
        "profile summary": {"forward_s": 0.05, "backward_s": 0.1},
    }


@pytest.mark.parametrize(
    ("over", "failed"),
    [
        ({}, []),
        ({"trainer_vs_model_alone": 0.89}, ["trainer within 10% of the model alone (same batch)"]),
        ({"trainer_vs_model_alone": 0.90}, []),  # exactly 10% slower passes
        ({"trainer_data_wait_fraction": 0.05}, []),
        ({"trainer_data_wait_fraction": 0.051}, ["trainer's data wait below 5%"]),
        (
            {"image_mae_max": 2.5, "channel_mean_gap": 1.5},
            ["GPU batches: worst image's mean abs. difference", "GPU batches: largest channel-mean gap"],
        ),  # fmt: skip
    ],
)
def test_gpu_check_thresholds_judge_the_figures(over: dict[str, float], failed: list[str]) -> None:
    from pipeline.bench import gpu_check

    judged = gpu_check.verdicts(_report_figures(**over))
    assert [v["name"] for v in judged if not v["ok"]] == failed
    assert len(judged) == len(gpu_check.THRESHOLDS)


def test_gpu_check_fails_a_threshold_whose_figure_is_missing() -> None:
    from pipeline.bench import gpu_check

    figures = _report_figures()
    del figures["profile summary"]  # the step failed: no figures
    judged = gpu_check.verdicts(figures)
    assert [v["name"] for v in judged if not v["ok"]] == [
        t.name for t in gpu_check.THRESHOLDS if t.step == "profile summary"
    ]
    keys = ("gpu", "capability", "torch", "torch_cuda", "cudnn", "dali", "python", "commit", "date_utc")
    versions = dict.fromkeys(keys, "v")
    result = {"ok": False, "seconds": 1.0, "versions": versions, "steps": [], "thresholds": judged, "not_checked": []}
    assert "| no figure | >= 1e-06 | FAILED |" in gpu_check.markdown(result)


def test_gpu_check_installs_from_the_index_for_torchs_cuda_or_refuses_in_one_line(monkeypatch, tmp_path) -> None:
    from pipeline.bench import gpu_check

    assert gpu_check.requirements(["nvidia.dali", "simplejpeg"], "13.0") == [
        "nvidia-dali-cuda130==2.4.0",
        "simplejpeg==1.9.0",
    ]
    assert gpu_check.requirements(["nvidia.dali"], "12.8") == ["nvidia-dali-cuda120==2.4.0"]
    monkeypatch.setattr(gpu_check, "_importable", lambda module: module != "webdataset")
    with pytest.raises(UserError) as refused:
        gpu_check.install_missing(None, allowed=False)
    assert "\n" not in str(refused.value) and "-m pip install webdataset==1.0.2" in str(refused.value)
    ran: list[list[str]] = []

    def pip(command, **kwargs):
        ran.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version (no index)\n")

    monkeypatch.setattr(subprocess, "run", pip)
    log = (tmp_path / "log").open("w")
    with pytest.raises(UserError, match=r"pip install webdataset==1.0.2 failed \(ERROR: Could not find"):
        gpu_check.install_missing(log, allowed=True)
    assert ran == [[gpu_check.sys.executable, "-m", "pip", "install", "webdataset==1.0.2"]]  # the index, no wheels
