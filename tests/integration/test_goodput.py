"""The goodput ledger under faults of known cost: a clean run keeps its steps, a kill k steps after a
checkpoint loses about k steps, a preemption books its save, the gap and the restore, a rollback books the
rolled-back steps. Each attempt's parts add up to its span (``other`` within a stated tolerance).

Runs are one process on the harness's fixed batches (4 steps an epoch), every optimizer step slowed by
``STEP_S`` so that a step's cost is known and dominates the narrow model's own compute."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from pipeline.goodput import CATEGORIES, RunAccount, account, read_records
from pipeline.run_dir import RunDir
from pipeline.tools.report import goodput_section, read_scalars
from tests.support import HARNESS, PYTHON, REPO, SMALL_RUN, flags
from tests.support.processes import kill_group, resume, run_logged, small_env, start_logged, tail, wait_for
from tests.support.run_records import progress_record

pytestmark = pytest.mark.slow  # each test trains (and restarts) a narrow model for a few steps

STEP_S = 0.3  # each optimizer step sleeps this long (harness HARNESS_SLOW_STEP_S)
TIMEOUT = 240
OTHER_SHARE = 0.25  # the unmarked rest of an attempt (logging, the control's bookkeeping) at most this share


def _argv(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        PYTHON,
        HARNESS,
        *flags("--data {} --run-dir {} --tp 1", data, run_dir),
        *SMALL_RUN,
        *flags("--train.control-every 1 --train.log-every 1 --faults.hang.timeout 0"),
        *extra,
    ]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    base = {"HARNESS_OUT": str(out), "HARNESS_DATA": "fixed", "ALEXNET_GOODPUT_TICK_S": "0"}
    return small_env({**base, "HARNESS_SLOW_RANK": "0", "HARNESS_SLOW_STEP_S": str(STEP_S), **extra})


def _account(run_dir: Path) -> RunAccount:
    run = account(read_records(RunDir(run_dir).goodput_ledger))
    for one in run.attempts:
        assert sum(one.seconds[k] for k in CATEGORIES) == pytest.approx(one.span)  # the parts tile the span
        assert abs(one.seconds["other"]) <= OTHER_SHARE * one.span, one.as_json()
    return run


def _train(argv: list[str], log: Path, env: dict[str, str]) -> None:
    assert run_logged(argv, log, env, TIMEOUT) == 0, tail(log)


def _paused(argv: list[str], log: Path, env: dict[str, str], gate: Path, at: int) -> subprocess.Popen:
    gate.mkdir()
    proc = start_logged(argv, log, {**env, "HARNESS_PAUSE_AT": str(at), "HARNESS_GATE": str(gate)})
    wait_for(lambda: (gate / "paused-rank0").exists(), TIMEOUT, f"step {at}", proc)
    return proc


def test_a_clean_run_keeps_close_to_all_its_steps(classes_only: Path, tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    _train(_argv(classes_only, run_dir, "--epochs", "2"), log, _env(tmp_path))
    run = _account(run_dir)
    [one] = run.attempts
    assert one.ended == "done" and (one.first_step, one.last_step) == (0, 8)
    assert one.seconds["lost"] == 0 and one.seconds["rolled_back"] == 0
    assert one.seconds["kept"] >= 8 * STEP_S
    assert one.startup > 0 and one.seconds["checkpoint"] > 0
    assert "start-up" in log.read_text() and "to the first step" in log.read_text()
    tool = subprocess.run(
        [PYTHON, "-m", "pipeline.tools.goodput", str(run_dir), "--json"],
        cwd=REPO,
        env=small_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(tool.stdout)[str(run_dir)]["goodput"] == pytest.approx(run.goodput)
    logged = read_scalars(run_dir)  # TensorBoard's goodput/* at each tick; the run report's section
    assert logged["goodput/kept_s"][-1][1] > 0 and 0 < logged["goodput/goodput"][-1][1] <= 1
    assert "| kept |" in "\n".join(goodput_section(run_dir))


def test_a_kill_k_steps_after_a_checkpoint_books_k_steps_as_lost(classes_only: Path, tmp_path: Path) -> None:
    run_dir, log, k = tmp_path / "run", tmp_path / "train.log", 3
    argv = _argv(classes_only, run_dir, "--epochs", "3")
    proc = _paused(argv, log, _env(tmp_path), tmp_path / "gate", at=4 + k)  # the epoch-end checkpoint at step 4
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        kill_group(proc)
    _train(argv, log, _env(tmp_path))
    first, second = _account(run_dir).attempts
    assert first.ended.startswith("killed") and first.last_step == 4 + k and second.first_step == 4
    assert first.lost_steps == k
    mean = (first.seconds["kept"] + first.seconds["lost"]) / first.last_step
    assert first.seconds["lost"] == pytest.approx(k * mean) and first.seconds["lost"] >= k * STEP_S
    assert second.seconds["gap"] > 0 and second.seconds["startup.restore"] > 0


def test_a_preemption_books_the_save_the_gap_and_the_restore(classes_only: Path, tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    argv = _argv(classes_only, run_dir, "--epochs", "2")
    gate = tmp_path / "gate"
    proc = _paused(argv, log, _env(tmp_path), gate, at=5)
    try:
        os.kill(proc.pid, signal.SIGUSR1)
        (gate / "go").touch()
        assert proc.wait(timeout=TIMEOUT) == 0, tail(log)
    finally:
        kill_group(proc)
    _train(argv, log, _env(tmp_path))
    first, second = _account(run_dir).attempts
    assert first.ended == "preempted" and first.last_step == 6 and second.first_step == 6
    assert first.lost_steps == 0 and first.seconds["checkpoint"] > 0
    assert second.seconds["gap"] > 0 and second.seconds["startup.restore"] > 0


def test_a_rollback_books_the_rolled_back_steps(classes_only: Path, tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    argv = _argv(
        classes_only,
        run_dir,
        *flags("--epochs 1 --checkpoint.every-steps 1 --faults.divergence.action rollback"),
        *flags("--faults.divergence.max-skips 0"),  # the NaN batch is acted on, not skipped
    )
    _train(argv, log, _env(tmp_path, HARNESS_POISON_AT="3", HARNESS_POISON="nan"))
    [one] = _account(run_dir).attempts
    # step 3 diverges: the checkpoint of step 2 (whose next step diverged) is not good, so back to step 1
    assert "rolled back to step-00000001" in log.read_text(), tail(log)
    assert one.rolled_back_steps == 2 and one.seconds["rolled_back"] >= 2 * STEP_S
    assert one.seconds["kept"] + one.seconds["rolled_back"] >= one.last_step * STEP_S


HANG_S = 4  # --faults.hang.timeout: the watchdog names a hang after this long without progress on any rank


@pytest.mark.multiprocess
def test_a_stopped_rank_books_the_hang_detection_time(classes_only: Path, tmp_path: Path) -> None:
    """Two ranks under torchrun; rank 1 is SIGSTOPped before step 5: the watchdog names the hang after
    ``HANG_S`` s, torchrun restarts, and the next attempt books those seconds as hang detection."""
    run_dir, log, gate = tmp_path / "run", tmp_path / "torchrun.log", tmp_path / "gate"
    argv = [
        PYTHON,
        *flags("-m torch.distributed.run --standalone --nproc_per_node=2 --max-restarts=1 --monitor-interval=0.2"),
        *_argv(classes_only, run_dir, "--epochs", "2")[1:],
        *flags("--faults.hang.timeout {} --faults.hang.slow-phase-timeout 20", HANG_S),
        *flags("--faults.hang.collective-timeout-min 2"),
    ]
    env = _env(tmp_path, HARNESS_SLOW_STEP_S="0")
    proc = _paused(argv, log, env, gate, at=5)
    victim = None
    try:
        wait_for(lambda: (gate / "paused-rank1").exists(), TIMEOUT, "rank 1 at step 5", proc)
        record = wait_for(lambda: progress_record(run_dir, 1), TIMEOUT, "rank 1's progress record", proc)
        victim = record["pid"]
        os.kill(victim, signal.SIGSTOP)
        (gate / "go").touch()
        assert proc.wait(timeout=TIMEOUT) == 0, tail(log)
    finally:
        resume(victim)
        kill_group(proc)
    first, second = _account(run_dir).attempts
    assert first.ended == "hang" and second.ended == "done", tail(log)
    assert HANG_S <= second.seconds["hang_detection"] <= HANG_S + 10
    assert second.seconds["gap"] >= 0 and second.first_step == 4


def test_a_restart_reuses_the_compile_cache_in_the_run_directory(classes_only: Path, tmp_path: Path) -> None:
    """Under --model.compile the first start compiles into RUN_DIR/compile-cache; the restart (a resume in
    the same run directory) finds its graphs there (inductor's cache hits, no graph compiled again), and the
    ledger books both starts' compile parts. States, not durations: the times are in docs/BENCHMARKS.md."""
    run_dir = tmp_path / "run"
    env = _env(tmp_path, HARNESS_SLOW_STEP_S="0", TORCH_LOGS="torch._inductor.codecache")  # its hits and misses
    argv = _argv(classes_only, run_dir, *flags("--epochs 3 --model.compile true"))
    _train([*argv, "--max-steps", "1"], tmp_path / "first.log", env)
    first = (tmp_path / "first.log").read_text()
    cache = RunDir(run_dir).compile_cache
    compiled = sorted(p.relative_to(cache) for p in cache.rglob("*.so"))
    assert compiled and "fx graph cache miss" in first and "fx graph cache hit" not in first, tail(
        tmp_path / "first.log"
    )
    _train([*argv, "--max-steps", "2"], tmp_path / "restart.log", env)
    restart = (tmp_path / "restart.log").read_text()
    assert "fx graph cache hit" in restart and "fx graph cache miss" not in restart, tail(tmp_path / "restart.log")
    assert sorted(p.relative_to(cache) for p in cache.rglob("*.so")) == compiled  # nothing compiled again
    one, two = _account(run_dir).attempts
    assert two.first_step == 1 and one.seconds["startup.compile"] > 0 and two.seconds["startup.compile"] > 0
