"""Every rank of a run that finished exits 0, also on a loaded machine: nothing the run started is left running
into the interpreter's exit (a daemon thread still in native code there is ended by pthread_exit, whose
unwinding through a C++ frame aborts the process: "terminate called without an active exception", exit -6,
seen once in a fresh-clone run of the suite after the last checkpoint was written)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import HARNESS, HOOKS, REPO, SMALL_RUN, TORCHRUN, flags
from tests.support.processes import free_port, kill_group, run_logged, small_env

# The slow plan hook makes the abort certain in every run without the fix (seen: the first of 4 aborted), so a
# few runs suffice; more to soak a change.
RUNS = int(os.environ.get("ALEXNET_TEST_SHUTDOWN_RUNS", 4))
RUN_TIMEOUT = 300


def _burner() -> subprocess.Popen:
    """A process that keeps a core busy: the ranks' threads are descheduled at any moment, as under load."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)


def _short_runs(demo_shards: Path, tmp_path: Path, runs: int, **extra: str) -> list[tuple[int, str]]:
    results = []
    burners = [_burner(), _burner()]
    try:
        for i in range(runs):
            run_dir, out, log = tmp_path / f"run{i}", tmp_path / f"out{i}", tmp_path / f"log{i}"
            out.mkdir()
            argv = [
                TORCHRUN,
                "--nproc_per_node=2",
                f"--master-port={free_port()}",
                HARNESS,
                *flags("--data {} --run-dir {}", demo_shards, run_dir),
                *SMALL_RUN,
                *flags("--tp 1 --epochs 1 --checkpoint.every-steps 2 --faults.hang.timeout 0"),
            ]
            env = small_env({"HARNESS_OUT": str(out), "HARNESS_DATA": "real", "PYTHONPATH": f"{HOOKS}:{REPO}", **extra})
            results.append((run_logged(argv, log, env, RUN_TIMEOUT), log.read_text(errors="replace")))
    finally:
        for burner in burners:
            kill_group(burner, grace=0)
    return results


@pytest.mark.slow
@pytest.mark.multiprocess
def test_every_rank_of_a_finished_run_exits_0_under_load(demo_shards: Path, tmp_path: Path) -> None:
    """Four 2-rank runs to the end beside a CPU burner; the next epoch's plan (prepared in the background, never
    used: the run has 1 epoch) is still in native code for 1 s after the run is over and cancels it."""
    for rc, text in _short_runs(demo_shards, tmp_path, RUNS, ALEXNET_TEST_SLOW_PLAN_S="1"):
        assert rc == 0 and "terminate called" not in text and "failed (exitcode" not in text, text[-4000:]
