"""slurm/train.sh's decisions that need a training run (the pre-flight modes, a crash that repeats, the node
ledger), run by bash outside Slurm as tests/unit/test_train_script.py describes."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from tests.support import SMALL_RUN, flags
from tests.support.processes import run_logged
from tests.support.train_script import JOB, job_env, requeues

TIMEOUT = 420


def _train_sh(data: Path, run_dir: Path, options: str) -> list[str]:
    """slurm/train.sh with the small run's training flags and ``options`` (one line, as ``flags`` reads it)."""
    return ["bash", "slurm/train.sh", *flags("--data {} --run-dir {}", data, run_dir), *SMALL_RUN, *flags(options)]


def _table_rows(text: str) -> dict[int, list[str]]:
    """The pre-flight table's rows by rank (rank, host, figures)."""
    rows = [line.split() for line in text.splitlines() if re.match(r"\s*\d+\s+\S+\s+[\d.]+\s+[\d.]+\s+[\d.]+", line)]
    return {int(row[0]): row for row in rows}


# ------------------------------------------------------------------------------------------------
# Pre-flight modes (rank 1's device measured at a hundredth of its speed by the test hook)


@pytest.mark.multiprocess
def test_preflight_strict_ends_the_job_before_training_without_requeue(demo_shards: Path, tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = job_env(tmp_path, PREFLIGHT="strict", ALEXNET_TEST_SLOW_MATMUL_RANK="1")
    argv = _train_sh(demo_shards, run_dir, "--tp 1 --max-steps 2")  # short, should the job train after all
    rc = run_logged(argv, log, env, TIMEOUT)
    text = log.read_text(errors="replace")
    assert rc == 1, text[-4000:]
    assert set(_table_rows(text)) == {0, 1}, text[-4000:]
    assert re.search(r"preflight: rank 1 \(host \S+\) matmul GFLOP/s [\d.]+ is below 0.5 x", text), text[-4000:]
    assert "pre-flight failed (exit 1): not training on this allocation" in text, text[-4000:]
    assert f"job {JOB} restart" not in text and not (run_dir / "checkpoints").exists(), text[-4000:]
    assert requeues(tmp_path) == [], requeues(tmp_path)
    # The node is in the ledger beside the run directories: a later job allocated there requeues without it.
    [entry] = [json.loads(line) for line in (tmp_path / ".alexnet-nodes.jsonl").read_text().splitlines()]
    assert (entry["node"], entry["source"]) == (socket.gethostname(), "preflight"), entry


@pytest.mark.multiprocess
def test_preflight_warn_logs_the_table_and_trains(demo_shards: Path, tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = job_env(tmp_path, ALEXNET_TEST_SLOW_MATMUL_RANK="1")  # PREFLIGHT unset: warn, the default
    argv = _train_sh(demo_shards, run_dir, "--tp 1 --max-steps 2")
    rc = run_logged(argv, log, env, TIMEOUT)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-4000:]
    assert "PREFLIGHT=warn" in text and "matmul GFLOP/s" in text, text[-4000:]
    rows = _table_rows(text)
    assert set(rows) == {0, 1}, text[-4000:]
    assert float(rows[1][2]) < 0.5 * float(rows[0][2]), rows  # the table shows the slow device
    verdict = text.index("preflight: rank 1 (host ")
    assert verdict < text.index(f"job {JOB} restart 0:"), text[-4000:]  # reported, then trained anyway
    assert "pre-flight failed" not in text and (run_dir / "checkpoints").is_dir(), text[-4000:]
    assert requeues(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# A crash that repeats ends the job after the second time; one that does not repeat is restarted


def _crash_job(demo_shards: Path, tmp_path: Path, **extra: str) -> tuple[int, str, Path]:
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = job_env(tmp_path, PREFLIGHT="off", ALEXNET_TEST_CRASH_AT="2", **extra)
    argv = _train_sh(demo_shards, run_dir, "--tp 1 --max-steps 4 --faults.hang.timeout 0")
    rc = run_logged(argv, log, env, TIMEOUT)
    return rc, log.read_text(errors="replace"), run_dir


@pytest.mark.multiprocess
def test_a_crash_that_repeats_ends_the_job_after_the_second_time(demo_shards: Path, tmp_path: Path) -> None:
    """Both ranks raise at step 2 every attempt (the message differs: it holds the pid): torchrun restarts the
    group once, the third attempt ends before training with one line and ends torchrun (MAX_RESTARTS 3 not used
    up), and the script exits 3 without a requeue."""
    rc, text, run_dir = _crash_job(demo_shards, tmp_path)
    assert rc == 3, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]] and "the same crash twice at step 2 (RuntimeError: injected crash" in errors[0], errors
    assert text.count("world 2 = dp 2 x tp 1") == 2, text[-4000:]  # two attempts trained, the third did not
    assert "not requeueing (exit 3)" in text and requeues(tmp_path) == [], text[-4000:]


@pytest.mark.multiprocess
def test_a_crash_that_does_not_repeat_is_restarted_and_the_run_finishes(demo_shards: Path, tmp_path: Path) -> None:
    rc, text, run_dir = _crash_job(demo_shards, tmp_path, ALEXNET_TEST_CRASH_ONCE=str(tmp_path / "crashed"))
    assert rc == 0, text[-4000:]
    assert (tmp_path / "crashed").exists() and "injected crash" in text, text[-4000:]
    assert "error: " not in text and (run_dir / "checkpoints" / "latest").exists(), text[-4000:]


# ------------------------------------------------------------------------------------------------
# The node ledger: a node that failed in an earlier job is excluded from this one


@pytest.mark.multiprocess
def test_a_node_in_the_ledger_is_excluded_by_a_requeue_saying_so(demo_shards: Path, tmp_path: Path) -> None:
    """An earlier job's hang named this host unreachable (RUN_DIR/hangs/*/hang.json, recorded into the ledger
    beside the run directories): this job, allocated there, says so and requeues itself excluding it, without
    training; with LEDGER_REQUEUE=0 it says so and trains."""
    from pipeline.faults import nodes

    host = socket.gethostname()
    earlier = tmp_path / "runs" / "earlier"
    (earlier / "hangs" / "20260101-000000").mkdir(parents=True)
    hang = {"unreachable": [{"node": host, "rank": 1}]}
    (earlier / "hangs" / "20260101-000000" / "hang.json").write_text(json.dumps(hang))
    assert nodes.main(["record-hangs", str(earlier)]) == 0  # what slurm/train.sh runs after a hang
    run_dir, log = tmp_path / "runs" / "run", tmp_path / "job.out"
    argv = _train_sh(demo_shards, run_dir, "--tp 1 --max-steps 1")
    rc = run_logged(argv, log, job_env(tmp_path, PREFLIGHT="off"), TIMEOUT)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-4000:]
    ledger = tmp_path / "runs" / ".alexnet-nodes.jsonl"
    assert f"{host} failed in an earlier job ({ledger}): requeueing job {JOB} excluding {host}" in text, text[-4000:]
    calls = (tmp_path / "scontrol.calls").read_text()
    assert f"scontrol requeue {JOB}" in calls and f"ExcNodeList={host}" in calls, calls
    assert f"job {JOB} restart" not in text and not (run_dir / "checkpoints").exists(), text[-4000:]

    rc = run_logged(argv, log, job_env(tmp_path, PREFLIGHT="off", LEDGER_REQUEUE="0"), TIMEOUT)
    text = log.read_text(errors="replace")
    assert rc == 0 and f"{host} failed in an earlier job ({ledger}); training on it anyway" in text, text[-4000:]
    assert (run_dir / "checkpoints" / "latest").exists(), text[-4000:]
