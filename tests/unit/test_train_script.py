"""slurm/train.sh's own decisions, run by bash outside Slurm with stand-ins for ``srun`` (runs its command once:
a one-node allocation) and ``scontrol`` (records what it is asked): PREFLIGHT=strict ends the job before
training with exit 1 and no requeue, PREFLIGHT=warn puts the pre-flight's table and verdict in the job log and
trains, and a hung job is requeued at most HANG_REQUEUES times. The same script under a real Slurm cluster
(submission, signals, requeue by Slurm itself) is tests/integration/test_slurm_train.py. The stand-ins and the
job's environment are in tests/support/train_script.py; the decisions that need a training run are in
tests/integration/test_train_script.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.support import PYTHON, flags
from tests.support.processes import run_logged
from tests.support.train_script import JOB, job_env, requeues, write_script

# The training step's stand-in (for the hang-requeue decisions): it records a hang as the watchdog does
# (RUN_DIR/hangs/<time>/) when FAKE_HANG is set, and fails; everything else is the real interpreter.
TRAINING_THAT_HANGS = """#!/bin/bash
if [[ " $* " == *" -m launch.train "* ]]; then
    [[ -n "${{FAKE_HANG:-}}" ]] && mkdir -p "$FAKE_RUN_DIR/hangs/$(date +%Y%m%d-%H%M%S.%N)"
    exit 1
fi
exec {python} "$@"
"""


# ------------------------------------------------------------------------------------------------
# A hung job: requeued while SLURM_RESTART_COUNT < HANG_REQUEUES (default 3), then left failed


@pytest.mark.parametrize(
    "restarts, cap, hang, requeued",
    [
        ("0", None, True, True),
        ("2", None, True, True),
        ("3", None, True, False),  # the default cap reached
        ("3", "5", True, True),
        ("5", "5", True, False),
        ("0", None, False, False),  # a failure without a hang is not requeued
    ],
)
def test_a_hung_job_is_requeued_up_to_hang_requeues(
    tmp_path: Path, restarts: str, cap: str | None, hang: bool, requeued: bool
) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    fake_python = tmp_path / "bin" / "python-stand-in"
    (tmp_path / "bin").mkdir()
    write_script(fake_python, TRAINING_THAT_HANGS.format(python=PYTHON))
    extra = {"SLURM_RESTART_COUNT": restarts, "PREFLIGHT": "off", "MAX_RESTARTS": "0", "FAKE_RUN_DIR": str(run_dir)}
    if cap is not None:
        extra["HANG_REQUEUES"] = cap
    if hang:
        extra["FAKE_HANG"] = "1"
    env = job_env(tmp_path, PYTHON=str(fake_python), **extra)
    # A hang recorded before this job started is an earlier incarnation's: it never counts.
    old = run_dir / "hangs" / "earlier-incarnation"
    old.mkdir(parents=True)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    rc = run_logged(["bash", "slurm/train.sh", *flags("--data /nonexistent --run-dir {}", run_dir)], log, env, 120)
    text = log.read_text(errors="replace")
    if requeued:
        assert rc == 0 and requeues(tmp_path) == [f"scontrol requeue {JOB}"], text
        assert "training failed after a hang" in text, text
    else:
        assert rc == 1 and requeues(tmp_path) == [], text
        assert "requeueing" not in text, text


# ------------------------------------------------------------------------------------------------
# A node range (sbatch -N 3-4): torchrun spans the nodes this allocation got, read at each start

# The training step's stand-in: torchrun's command line recorded, nothing run; everything else is the interpreter.
TORCHRUN_RECORDED = """#!/bin/bash
if [[ " $* " == *" -m torch.distributed.run "* ]]; then
    echo "$*" >> "$FAKE_TORCHRUN"
    exit 0
fi
exec {python} "$@"
"""


@pytest.mark.parametrize(
    "allocated",
    [{"SLURM_JOB_NUM_NODES": "3", "SLURM_NNODES": "3"}, {"SLURM_NNODES": "4"}],  # older Slurm: SLURM_NNODES only
)
def test_a_node_range_trains_on_the_nodes_it_got(tmp_path: Path, allocated: dict[str, str]) -> None:
    run_dir, log, calls = tmp_path / "run", tmp_path / "job.out", tmp_path / "torchrun.calls"
    fake_python = tmp_path / "bin" / "python-stand-in"
    (tmp_path / "bin").mkdir()
    write_script(fake_python, TORCHRUN_RECORDED.format(python=PYTHON))
    env = job_env(tmp_path, PYTHON=str(fake_python), PREFLIGHT="off", FAKE_TORCHRUN=str(calls))
    del env["SLURM_JOB_NUM_NODES"]
    env.update(allocated)
    rc = run_logged(["bash", "slurm/train.sh", *flags("--data /nonexistent --run-dir {}", run_dir)], log, env, 120)
    text = log.read_text(errors="replace")
    nodes = allocated["SLURM_NNODES"]
    assert rc == 0, text
    assert f"{nodes} node(s) x 2 process(es)" in text, text
    (line,) = calls.read_text().splitlines()
    assert f"--nnodes={nodes} " in line and "-m launch.train" in line, line
