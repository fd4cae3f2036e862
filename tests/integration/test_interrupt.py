"""Ctrl-C in a terminal run stops like a preemption: every rank checkpoints at the next control step and
exits cleanly, the same command resumes exactly; a second Ctrl-C ends it at once, leaving nothing partial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline import checkpoint
from pipeline.checkpoint import META, export_model
from tests.support import HARNESS, PYTHON, SMALL_RUN, flags
from tests.support.processes import (
    descendants,
    interruptible,
    kill_group,
    run_logged,
    small_env,
    start_logged,
    tail,
    wait_for,
)

pytestmark = pytest.mark.slow  # each test trains, is interrupted and resumes

RUN_TIMEOUT = 300


def _argv(data: Path, run_dir: Path, nproc: int) -> list[str]:
    common = [
        *flags("--data {} --run-dir {}", data, run_dir),
        *SMALL_RUN,
        *flags("--epochs 2 --train.control-every 1 --train.log-every 1"),
    ]
    if nproc == 1:
        return [PYTHON, HARNESS, *common, "--tp", "1"]
    return [
        PYTHON,
        *flags("-m torch.distributed.run --standalone"),
        f"--nproc_per_node={nproc}",
        HARNESS,
        *common,
        "--tp",
        "2",
    ]


def _logged_step(log: Path) -> int:
    """The newest training step the run has logged (rank 0's progress lines)."""
    steps = [
        int(line.split(" step ", 1)[1].split("/", 1)[0])
        for line in log.read_text(errors="replace").splitlines()
        if " step " in line and "/" in line.split(" step ", 1)[1]
    ]
    return max(steps, default=0)


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return start_logged(argv, log, env, preexec_fn=interruptible)


def _interrupt_and_resume(data: Path, tmp_path: Path, nproc: int) -> None:
    straight, stopped, out = tmp_path / "straight", tmp_path / "stopped", tmp_path / "out"
    out.mkdir()
    env = small_env({"HARNESS_OUT": str(out), "HARNESS_DATA": "real"})
    assert run_logged(_argv(data, straight, nproc), tmp_path / "straight.log", env, RUN_TIMEOUT) == 0, tail(
        tmp_path / "straight.log"
    )

    log = tmp_path / "stopped.log"
    gate = tmp_path / "gate"
    gate.mkdir()
    pause_at = 3  # every rank holds before its 4th batch: the Ctrl-C lands there, however fast the machine
    proc = _start(
        _argv(data, stopped, nproc), log, {**env, "HARNESS_PAUSE_AT": str(pause_at), "HARNESS_GATE": str(gate)}
    )
    try:
        wait_for(lambda: len(list(gate.glob("paused-rank*"))) == nproc, RUN_TIMEOUT, f"step {pause_at}", proc)
        # What a terminal does: SIGINT to the foreground process group. torchrun also forwards a copy to
        # each worker, so under torchrun every rank sees it twice within milliseconds.
        os.killpg(proc.pid, signal.SIGINT)
        for pid in descendants(proc.pid):
            os.kill(pid, signal.SIGINT)
        (gate / "go").touch()
        proc.wait(timeout=RUN_TIMEOUT)
    finally:
        kill_group(proc)
    text = log.read_text(errors="replace")
    if nproc == 1:
        assert proc.returncode == 0, text[-4000:]
    assert "KeyboardInterrupt" not in text, text[-4000:]
    ranks = [json.loads((out / f"outcome-rank{r}.json").read_text()) for r in range(nproc)]
    assert all(r["preempted"] for r in ranks), ranks  # every rank returned from the trainer, none crashed
    step = ranks[0]["progress"]["step"]
    # The step in flight finishes; the control step after it (every step here) stops every rank.
    assert step == pause_at + 1 and all(r["progress"] == ranks[0]["progress"] for r in ranks), ranks
    saved = checkpoint.latest(stopped)
    assert saved is not None and checkpoint.verify(saved) is None
    assert json.loads((saved / META).read_text())["progress"]["step"] == step  # at a step boundary
    assert "run the same command to continue" in text, text[-4000:]
    if nproc == 1:
        assert "Traceback" not in text, text[-4000:]
    else:  # torchrun itself reports the signal it got; no rank prints one
        assert text.count("Traceback") <= 1 and "SignalException" in text.split("Traceback")[-1], text[-4000:]

    assert run_logged(_argv(data, stopped, nproc), log, env, RUN_TIMEOUT) == 0, tail(log)
    assert f"resumed from {saved}" in log.read_text(errors="replace")
    a, b = export_model(checkpoint.latest(straight)), export_model(checkpoint.latest(stopped))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


def test_ctrl_c_single_process_checkpoints_and_resumes_exactly(demo_shards: Path, tmp_path: Path) -> None:
    _interrupt_and_resume(demo_shards, tmp_path, nproc=1)


@pytest.mark.multiprocess
def test_ctrl_c_under_torchrun_checkpoints_on_every_rank(demo_shards: Path, tmp_path: Path) -> None:
    _interrupt_and_resume(demo_shards, tmp_path, nproc=2)


def test_second_ctrl_c_exits_at_once_and_leaves_nothing_partial(demo_shards: Path, tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    # The paper-width model: its checkpoint takes seconds to write, so the second Ctrl-C can land inside one.
    argv = [
        PYTHON,
        *flags("-m launch.train --data {} --run-dir {} --tp 1 --batch-size 2", demo_shards, run_dir),
        *flags("--data.workers 1 --train.ten-crop false --checkpoint.every-minutes 0"),
        *flags("--checkpoint.every-steps 1 --train.log-every 1 --train.control-every 1"),
        # At batch 2 the paper-width model's early loss jumps are spikes to the divergence guard's cap (a stop
        # before the second save); this test is about Ctrl-C, so the cap is off here.
        *flags("--faults.divergence.spike-factor 0"),
    ]
    proc = _start(argv, log, small_env())
    try:
        wait_for(lambda: checkpoint.latest(run_dir), RUN_TIMEOUT, "the first checkpoint", proc)
        os.killpg(proc.pid, signal.SIGINT)
        # The paper-width model's save takes seconds: the second Ctrl-C lands inside the one now being written.
        in_flight = wait_for(
            lambda: list((run_dir / "checkpoints").glob("*.tmp")), RUN_TIMEOUT, "the next save", proc, 0.005
        )
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        proc.wait(timeout=60)
        waited = time.monotonic() - t0
    finally:
        kill_group(proc)
    text = log.read_text(errors="replace")
    assert proc.returncode == -signal.SIGINT, (proc.returncode, text[-4000:])
    assert waited < 10 and "Traceback" not in text, text[-4000:]
    # The save in flight was abandoned, not finished first: its checkpoint never appeared, `latest` is older.
    (tmp,) = in_flight
    unfinished = tmp.with_suffix("")
    assert not unfinished.exists() and checkpoint.latest(run_dir).name < unfinished.name, (
        unfinished.name,
        sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
    )
    # Whatever was half-written stays invisible: every checkpoint a restart could see verifies.
    for path in checkpoint.candidates(run_dir):
        assert checkpoint.verify(path) is None, path
    assert checkpoint.latest(run_dir) is not None
