"""Seeing inside a running job: profiler traces on demand, the summary of where the time goes, model FLOP/s and
MFU, memory per rank, the memory snapshot on a CUDA out-of-memory error."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.model import AlexNet, layer_table
from pipeline.tools import profile as summary_tool
from tests.support import HARNESS, NARROW_FC_WIDTH, NARROW_MODEL, NARROW_WIDTHS, PYTHON, flags
from tests.support.processes import kill_group, small_env, tail, wait_for

RUN_TIMEOUT = 300


CLASSES = 4


PEAK = 0.05  # TFLOP/s given as the "device peak" on CPU (what the pre-flight's matmul figure would be)


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from pipeline.tools.report import read_scalars

    return read_scalars(run_dir)


@pytest.mark.multiprocess
def test_profile_requested_while_training(classes_only: Path, tmp_path: Path) -> None:
    """2 gloo ranks, tp=2: `launch.profile` on the running job writes a trace per rank with the model's operators
    and the collectives; the summary's parts add up to the window; MFU in TensorBoard is the layer table's."""
    run_dir, out, gate, log = tmp_path / "run", tmp_path / "out", tmp_path / "gate", tmp_path / "train.log"
    out.mkdir()
    gate.mkdir()
    argv = [
        PYTHON,
        *flags("-m torch.distributed.run --standalone --nproc_per_node=2 {}", HARNESS),
        *flags("--data {} --run-dir {} --num-classes {} --tp 2", classes_only, run_dir, CLASSES),
        *NARROW_MODEL,
        *flags("--batch-size 8 --train.ten-crop false --epochs 3 --max-steps 8 --checkpoint.every-minutes 0"),
        *flags("--train.control-every 1 --train.log-every 1 --profile.peak-tflops {}", PEAK),
    ]
    env = small_env({"HARNESS_OUT": str(out), "HARNESS_DATA": "fixed", "HARNESS_PAUSE_AT": "3"})
    env["HARNESS_GATE"] = str(gate)
    with log.open("ab") as sink:
        proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: len(list(gate.glob("paused-rank*"))) == 2, RUN_TIMEOUT, "both ranks at step 3", proc)
        asked = subprocess.run(
            [PYTHON, *flags("-m launch.profile {} --steps 2", run_dir)], env=small_env(), capture_output=True, text=True
        )
        assert asked.returncode == 0, asked.stderr
        (gate / "go").touch()
        assert proc.wait(timeout=RUN_TIMEOUT) == 0, tail(log)
    finally:
        kill_group(proc)
    text = log.read_text(errors="replace")
    # The control step after step 4 saw the request: steps 5 and 6 were recorded.
    assert "profile of steps 5..6" in text, text[-4000:]
    assert (run_dir / "profile.started-step4").exists() and not list(run_dir.glob("profile.request*"))
    (folder,) = list((run_dir / "profiles").iterdir())
    assert str(folder) in text  # the log line says where
    assert sorted(p.name for p in folder.iterdir()) == ["rank-0.json", "rank-1.json"]
    for rank in (0, 1):
        trace = json.loads((folder / f"rank-{rank}.json").read_text())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"aten::conv2d", "aten::linear", "aten::max_pool2d"} <= names, sorted(names)[:50]
        assert {"gloo:all_gather", "gloo:all_reduce"} <= names  # the tower exchange, the control all-reduce
        assert {"phase/forward", "phase/backward", "phase/data", "phase/step"} <= names
        assert trace["alexnet"]["first_step"] == 4 and trace["alexnet"]["last_step"] == 6
        assert trace["alexnet"]["rank"] == rank and trace["alexnet"]["tp_size"] == 2

    summary = subprocess.run(
        [PYTHON, *flags("-m pipeline.tools.profile {} --json", folder)], env=small_env(), capture_output=True, text=True
    )
    assert summary.returncode == 0, summary.stderr
    for rank, s in enumerate(json.loads(summary.stdout)):
        assert s["rank"] == rank and s["timeline"] == "cpu operators"
        assert set(s["parts"]) == set(summary_tool.PARTS)
        assert sum(s["parts"].values()) == pytest.approx(s["wall_s"], rel=0.10), s
        assert s["parts"]["forward"] > 0 and s["parts"]["backward"] > 0 and s["parts"]["communication"] > 0, s
        assert {"gloo:all_gather", "gloo:all_reduce"} <= set(s["collectives"])
        # The communication in all, from the trace itself: the union of the gloo ranges within the phases'
        # window; the part of it compute hides is what the parts do not count as communication.
        trace = json.loads((folder / f"rank-{rank}.json").read_text())
        marks = [e for e in trace["traceEvents"] if str(e.get("name", "")).startswith("phase/") and "dur" in e]
        w0, w1 = min(e["ts"] for e in marks), max(e["ts"] + e["dur"] for e in marks)
        ranges = sorted(
            (max(e["ts"], w0), min(e["ts"] + e["dur"], w1))
            for e in trace["traceEvents"]
            if str(e.get("name", "")).startswith("gloo:") and "dur" in e and e["ts"] < w1 and e["ts"] + e["dur"] > w0
        )
        comm, end = 0.0, w0
        for a, b in ranges:
            comm, end = comm + max(0.0, b - max(a, end)), max(end, b)
        assert s["comm_s"] == pytest.approx(comm / 1e6, rel=1e-6), s
        hidden = s["comm_s"] - s["parts"]["communication"]
        assert s["comm_overlapped_s"] == pytest.approx(hidden, abs=1e-9) and 0 <= hidden <= s["comm_s"], s
        assert s["overlap"] == pytest.approx(hidden / s["comm_s"], abs=1e-6), s
    readable = subprocess.run(
        [PYTHON, *flags("-m pipeline.tools.profile {}", folder)], env=small_env(), capture_output=True, text=True
    )
    assert "rank 1: steps 5..6" in readable.stdout and "overlapped by compute" in readable.stdout

    # MFU: 3 x the layer table's forward FLOPs x images/s over the devices and the given peak.
    with torch.device("meta"):
        forward = sum(r.flops for r in layer_table(AlexNet(CLASSES, NARROW_WIDTHS, NARROW_FC_WIDTH)))
    scalars = _scalars(run_dir)
    speed = dict(scalars["perf/images_per_s"])
    tflops, mfu = dict(scalars["perf/model_tflops"]), dict(scalars["perf/mfu"])
    assert set(tflops) == set(speed) and len(speed) == 8
    for step, ips in speed.items():
        assert tflops[step] == pytest.approx(3 * forward * ips / 1e12, rel=1e-5)
        assert mfu[step] == pytest.approx(tflops[step] / 2 / PEAK, rel=1e-5)
    assert "TFLOP/s/device MFU" in text
    from pipeline.tools.report import speed_section

    report = "\n".join(speed_section(scalars))
    assert "model FLOP/s per device" in report and "MFU" in report, report
    for rank in (0, 1):  # every rank's host memory, from rank 0's TensorBoard
        assert all(v > 0.05 for _, v in scalars[f"mem/host_rss_gib/rank{rank}"])
