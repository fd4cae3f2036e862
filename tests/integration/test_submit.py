"""launch.submit: the CLI and its executor parameters (no Slurm), then real jobs through submitit on the
local two-node Slurm cluster (tests/support/slurm.py): a short run, a preemption (USR2 -> collective
checkpoint -> requeue -> resume -> COMPLETED, the run directory's lease passing to the requeued job;
a resubmission into the live run directory refused) and dp 2 x tp 2 over two nodes."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.faults.lease import ENDED_STATES
from tests.support import REPO, SMALL_RUN, flags
from tests.support.slurm import SlurmCluster

# The test cluster: 2 nodes of 2 CPUs, no GPUs; a short limit (the preemption signal is sent by hand).
CPU_JOB = flags("--gpus-per-node 0 --cpus-per-task 1 --time-min 10")


# ------------------------------------------------------------------------------- real Slurm jobs


def _submit(
    cluster: SlurmCluster, cwd: Path, job_args: list[str], train_args: list[str], timeout: float = 240
) -> tuple[str, subprocess.CompletedProcess[str]]:
    """`python -m launch.submit` against the test cluster, from outside the repo; (job id, process)."""
    env = cluster.env({"PYTHONPATH": str(REPO)})
    env.pop("OMP_NUM_THREADS", None)  # the job sets it from --cpus-per-task
    proc = subprocess.run(
        [sys.executable, "-m", "launch.submit", *job_args, "--", *train_args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    match = re.search(r"^submitted job (\d+)", proc.stdout, re.M)
    assert match, f"no job submitted (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return match.group(1), proc


def _logs(folder: Path, job: str) -> str:
    parts = []
    for path in sorted(folder.glob(f"{job}_*_log.*")):
        parts.append(f"----- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def _results(folder: Path, job: str, tasks: int) -> list[dict]:
    out = []
    for t in range(tasks):
        with open(folder / f"{job}_{t}_result.pkl", "rb") as f:
            status, value = pickle.load(f)
        assert status == "success", value
        out.append(value)
    return out


def _latest(run_dir: Path) -> Path:
    from pipeline import checkpoint

    path = checkpoint.latest(run_dir)
    assert path is not None, f"no checkpoint in {run_dir}"
    return path


def _record(cluster: SlurmCluster, job: str) -> dict[str, str]:
    (record,) = cluster.jobs(job)
    return record


@pytest.mark.slurm
def test_submitted_job_trains_and_checkpoints(slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job, proc = _submit(
        slurm_cluster,
        tmp_path,
        ["--wait", *CPU_JOB],
        [*flags("--data {} --run-dir run", demo_shards), *SMALL_RUN, *flags("--tp 2 --max-steps 4")],
    )
    folder = run_dir / "submitit"
    report = f"{proc.stdout}\n{proc.stderr}\n{_logs(folder, job)}"
    assert proc.returncode == 0, report
    assert f"{folder}/{job}_0_log.out" in proc.stdout and f"{folder}/{job}_0_log.err" in proc.stdout
    record = _record(slurm_cluster, job)
    assert (record["JobState"], record["ExitCode"], record["NumTasks"]) == ("COMPLETED", "0:0", "2"), report

    assert _latest(run_dir).name == "step-00000004"
    assert (run_dir / "tensorboard").is_dir() and list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    results = _results(folder, job, 2)
    assert [(r["rank"], r["step"], r["preempted"]) for r in results] == [(0, 4, False), (1, 4, False)]
    rank0 = (folder / f"{job}_0_log.err").read_text()
    assert "world 2 = dp 1 x tp 2 on cpu" in rank0 and "task 0/2 (local 0) on n1, rendezvous 127.0.0.1:" in rank0


@pytest.mark.slurm
def test_preemption_checkpoints_requeues_and_resumes(
    slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path
) -> None:
    """USR2 to every task: all ranks stop at one step boundary with a checkpoint, rank 0 requeues through
    submitit, the requeued job resumes from that checkpoint and trains on."""
    run_dir = tmp_path / "run"
    job, proc = _submit(
        slurm_cluster,
        tmp_path,
        CPU_JOB,
        [
            *f"--data {demo_shards} --run-dir {run_dir}".split(),
            *SMALL_RUN,
            # It cannot end by itself: the test stops the requeued run with RUN_DIR/preempt.request.
            *"--tp 2 --epochs 10000 --train.control-every 2 --train.log-every 1 --checkpoint.keep-last 20".split(),
        ],
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    folder = run_dir / "submitit"
    rank0_log = folder / f"{job}_0_log.err"

    def rank0() -> str:
        return rank0_log.read_text(errors="replace") if rank0_log.exists() else ""

    # Let it take a few steps, then send what Slurm sends before the time limit.
    deadline = time.monotonic() + 120
    while not re.search(r" step ([3-9]|\d\d+)/", rank0()):
        assert time.monotonic() < deadline, (
            f"no training progress:\n{_logs(folder, job)}\n{slurm_cluster.diagnostics()}"
        )
        assert _record(slurm_cluster, job)["JobState"] in ("PENDING", "RUNNING"), _logs(folder, job)
        time.sleep(0.5)
    slurm_cluster.scancel(job, "--signal=USR2")

    deadline = time.monotonic() + 60
    while _record(slurm_cluster, job)["Restarts"] == "0":
        assert time.monotonic() < deadline, f"not requeued:\n{_logs(folder, job)}"
        time.sleep(0.5)
    # Submitting again into the run directory while the job is requeued is refused, on one line.
    again = subprocess.run(
        [sys.executable, "-m", "launch.submit", *CPU_JOB, *flags("-- --data {} --run-dir {}", demo_shards, run_dir)]
        + SMALL_RUN,
        cwd=tmp_path,
        env=slurm_cluster.env({"PYTHONPATH": str(REPO)}),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert again.returncode == 2 and "submitted job" not in again.stdout, f"{again.stdout}\n{again.stderr}"
    assert (
        again.stderr.startswith(
            f"error: {run_dir} is being written by Slurm job {job} on cluster alexnet-local (started "
        )
        and again.stderr.count("\n") == 1
    ), again.stderr

    # Once the requeued run has trained past its resume point, the operator stops it for good.
    deadline = time.monotonic() + 300
    while not re.search(r"resumed from .*\n(.*\n)*.* step \d+/", rank0().partition(f"job {job} restart 1:")[2]):
        assert time.monotonic() < deadline, f"requeued job not training:\n{_logs(folder, job)}"
        assert _record(slurm_cluster, job)["JobState"] not in ENDED_STATES, _logs(folder, job)
        time.sleep(0.5)
    (run_dir / "preempt.request").touch()
    records = slurm_cluster.wait(job, timeout=180)
    report = _logs(folder, job)
    assert (records[0]["JobState"], records[0]["ExitCode"], records[0]["Restarts"]) == ("COMPLETED", "0:0", "1"), report

    first_run, _, second_run = rank0().partition(f"job {job} restart 1:")
    stops = [
        int(s) for s in re.findall(r"stopped at epoch \d+, step (\d+) .*run the same command to continue", rank0())
    ]
    assert len(stops) == 2, report
    stop_step, final_step = stops
    assert stop_step >= 3 and stop_step % 2 == 0, report  # a control step
    assert f"Requeued job {job}" in first_run, report
    assert re.search(rf"resumed from \S+/step-{stop_step:08d}: epoch \d+, step {stop_step},", second_run), report
    # The lease passed to the requeued job (same job id); stopped without a requeue, it stays with it.
    assert f"Slurm job {job} on cluster alexnet-local takes over from its previous incarnation" in second_run, report
    assert json.loads((run_dir / "writer.lease").read_text())["holder"] == f"Slurm job {job} on cluster alexnet-local"
    rank1 = (folder / f"{job}_1_log.err").read_text()
    assert f"rank 1 stopped at step {stop_step} with a checkpoint; rank 0 requeues the job" in rank1, report

    # The stop checkpoint is complete (both towers), and the job trained on from it.
    stop_ckpt = run_dir / "checkpoints" / f"step-{stop_step:08d}"
    meta = json.loads((stop_ckpt / "meta.json").read_text())
    assert meta["progress"]["step"] == stop_step and meta["layout"]["tp_size"] == 2
    assert final_step > stop_step and _latest(run_dir).name == f"step-{final_step:08d}"
    assert [(r["step"], r["preempted"]) for r in _results(folder, job, 2)] == [(final_step, True)] * 2


@pytest.mark.slurm
def test_two_nodes_dp2_x_tp2(slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job, proc = _submit(
        slurm_cluster,
        tmp_path,
        [*flags("--wait --nodes 2"), *CPU_JOB],
        [*flags("--data {} --run-dir {}", demo_shards, run_dir), *SMALL_RUN, *flags("--tp 2 --max-steps 2")],
    )
    folder = run_dir / "submitit"
    report = f"{proc.stdout}\n{proc.stderr}\n{_logs(folder, job)}"
    assert proc.returncode == 0, report
    record = _record(slurm_cluster, job)
    assert (record["JobState"], record["NumNodes"], record["NumTasks"]) == ("COMPLETED", "2", "4"), report
    meta = json.loads((_latest(run_dir) / "meta.json").read_text())
    assert meta["progress"]["step"] == 2
    assert meta["layout"] == {"world_size": 4, "dp_size": 2, "tp_size": 2}
    assert [r["rank"] for r in _results(folder, job, 4)] == [0, 1, 2, 3]
    nodes = {
        t: re.search(r"task \d/4 \(local (\d)\) on (n\d)", (folder / f"{job}_{t}_log.err").read_text()).groups()
        for t in range(4)
    }
    assert nodes == {0: ("0", "n1"), 1: ("1", "n1"), 2: ("0", "n2"), 3: ("1", "n2")}, report
