"""slurm/train.sh as real Slurm jobs on the two-node local cluster (tests/cluster.py, conftest.py):
one node (the tower pair as 2 processes), preemption by SIGUSR1 -> checkpoint -> requeue -> resume
(the run directory's lease passes to the requeued job), two nodes (dp=2 x tp=2, 4 processes), two
jobs sharing one node (their own rendezvous each), and a second job on a run directory that a live
job writes (refused at once with one line). The nodes have 2 CPUs and no GPUs, so jobs are submitted
with --gpus-per-node=0 --cpus-per-task=2 (the script's header asks for 2 GPUs and 16 CPUs)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from launch.submit import rendezvous_port
from pipeline import checkpoint
from pipeline.checkpoint import META, export_model
from pipeline.lease import LEASE_NAME
from tests._fixtures import PYTHON, REPO, SMALL_RUN, free_port
from tests.cluster import TERMINAL, SlurmCluster

pytestmark = pytest.mark.slurm

SCRIPT = str(REPO / "slurm" / "train.sh")
RESOURCES = ["--gpus-per-node=0", "--cpus-per-task=2"]
STEPS_PER_EPOCH = 12  # 94 demo train images, batch 8


def _submit(
    cluster: SlurmCluster,
    tmp_path: Path,
    train_args: list[str],
    nodes: int = 1,
    resources: list[str] = RESOURCES,
    env: dict[str, str] | None = None,
) -> str:
    """sbatch slurm/train.sh with the script's own rendezvous choice (no RDZV_PORT unless `env` sets one)."""
    # The log goes to tmp_path, not the script's default (%x-%j.out in the submit directory: the repo).
    return cluster.sbatch(
        [f"--nodes={nodes}", *resources, f"--output={tmp_path}/%x-%j.out", SCRIPT, *train_args],
        env={"PYTHON": PYTHON, "OMP_NUM_THREADS": "1", **(env or {})},
        cwd=REPO,
    )


def _log(record: dict[str, str]) -> str:
    path = Path(record["StdOut"])
    return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"


def _cancel(cluster: SlurmCluster, job: str) -> None:
    """Leave no job behind for the next test (a no-op once the job has ended)."""
    try:
        if cluster.job_state(job) not in TERMINAL:
            cluster.scancel(job)
            cluster.wait(job, timeout=60)
    except Exception:
        pass


def _latest(run_dir: Path) -> Path:
    path = checkpoint.latest(run_dir)
    assert path is not None, f"no checkpoint in {run_dir}"
    return path


def _meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def test_one_node_job_completes(slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    port = free_port()
    job = _submit(
        slurm_cluster,
        tmp_path,
        ["--data", str(demo_shards), "--run-dir", str(run_dir), *SMALL_RUN, "--epochs", "1", "--train.log-every", "4"],
        env={"RDZV_PORT": str(port)},
    )
    try:
        (record,) = slurm_cluster.wait(job, timeout=240)
    finally:
        _cancel(slurm_cluster, job)
    log = _log(record)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log
    assert Path(record["StdOut"]).parent == tmp_path
    assert "1 node(s) x 2 process(es)" in log and "world 2 = dp 1 x tp 2" in log, log
    assert f"rendezvous 127.0.0.1:{port}" in log, log  # an explicit RDZV_PORT wins over the per-job choice
    assert not (run_dir / LEASE_NAME).exists(), "a cleanly finished job left its lease behind"
    latest = _latest(run_dir)
    assert latest.name == f"step-{STEPS_PER_EPOCH:08d}"
    meta = _meta(latest)
    assert meta["progress"] == {"epoch": 1, "step": STEPS_PER_EPOCH, "step_in_epoch": 0}
    assert meta["layout"] == {"world_size": 2, "dp_size": 1, "tp_size": 2}
    assert not list(REPO.glob(f"*-{job}.out")), "the job wrote its log into the repository"


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    epochs = 3
    total = epochs * STEPS_PER_EPOCH
    job = _submit(
        slurm_cluster,
        tmp_path,
        [
            "--data",
            str(demo_shards),
            "--run-dir",
            str(run_dir),
            *SMALL_RUN,
            "--epochs",
            str(epochs),
            "--train.log-every",
            "1",
            "--train.control-every",
            "1",
        ],
    )
    try:
        # Wait until the first run has taken steps, then signal the batch shell the way Slurm does before
        # the time limit (#SBATCH --signal=B:USR1@120) and operators do by hand.
        deadline = time.monotonic() + 180
        while True:
            (record,) = slurm_cluster.jobs(job)
            if re.search(rf"step [2-9]/{total} ", _log(record)):
                break
            assert record["JobState"] not in TERMINAL, f"job ended before it was signalled:\n{_log(record)}"
            assert time.monotonic() < deadline, f"no training steps after 180 s:\n{_log(record)}"
            time.sleep(0.2)
        slurm_cluster.scancel(job, "-b", "--signal=USR1")

        # The job requeues itself (Restarts=1), runs again and finishes.
        deadline = time.monotonic() + 300
        while True:
            (record,) = slurm_cluster.jobs(job)
            if record.get("Restarts") == "1" and record["JobState"] in TERMINAL:
                break
            assert record.get("Restarts", "0") in ("0", "1"), record
            assert not (record.get("Restarts") == "0" and record["JobState"] in TERMINAL), (
                f"job ended without a requeue ({record['JobState']}):\n{_log(record)}"
            )
            assert time.monotonic() < deadline, f"requeued job not done after 300 s: {record}\n{_log(record)}"
            time.sleep(0.5)
    finally:
        _cancel(slurm_cluster, job)
    log = _log(record)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log

    # First run: the trap's stop request, a checkpoint at the next step, exit 0, `scontrol requeue`.
    first, _, second = log.partition(f"job {job} restart 1:")
    assert second, f"no second run in the log:\n{log}"
    assert "signal received" in first and f"requeueing job {job}" in first, first
    assert f"Slurm job {job} on cluster alexnet-local takes over from its previous incarnation" in second, second
    stopped = re.search(r"stopped at epoch \d+, step (\d+) ", first)
    assert stopped, first
    step = int(stopped.group(1))
    assert 2 <= step < total, step
    assert re.search(r"training stopped for preemption \(exit 0\)", first), first
    # Second run: resumed from exactly that checkpoint and trained to the end.
    resumed = re.search(r"resumed from (\S+): epoch (\d+), step (\d+)", second)
    assert resumed, second
    assert Path(resumed.group(1)).name == f"step-{step:08d}" and int(resumed.group(3)) == step, resumed.group(0)
    assert "signal received" not in second
    latest = _latest(run_dir)
    assert _meta(latest)["progress"] == {"epoch": epochs, "step": total, "step_in_epoch": 0}
    assert not (run_dir / "preempt.request").exists()
    assert not (run_dir / LEASE_NAME).exists()


def test_two_node_job_completes(slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    steps = 4
    job = _submit(
        slurm_cluster,
        tmp_path,
        [
            "--data",
            str(demo_shards),
            "--run-dir",
            str(run_dir),
            *SMALL_RUN,
            "--epochs",
            "1",
            "--max-steps",
            str(steps),
            "--train.log-every",
            "2",
        ],
        nodes=2,
    )
    try:
        (record,) = slurm_cluster.wait(job, timeout=300)
    finally:
        _cancel(slurm_cluster, job)
    log = _log(record)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log
    assert record["NodeList"] == "n[1-2]" and record["NumNodes"] == "2", record
    assert "2 node(s) x 2 process(es)" in log and "world 4 = dp 2 x tp 2" in log, log
    assert f"rendezvous 127.0.0.1:{rendezvous_port(job)}" in log, log  # the job's own port, as launch.submit's
    latest = _latest(run_dir)
    meta = _meta(latest)
    assert meta["progress"]["step"] == steps
    assert meta["layout"] == {"world_size": 4, "dp_size": 2, "tp_size": 2}
    weights = export_model(latest)  # the checkpoint loads offline, into the single-device model
    assert weights["conv1.weight"].shape == (16, 3, 11, 11) and weights["fc8.weight"].shape == (4, 64)
    assert all(bool(v.isfinite().all()) for v in weights.values())


def _wait_for_steps(cluster: SlurmCluster, job: str, pattern: str, timeout: float = 300) -> None:
    """Until the job's log matches `pattern` (a training step); fails if the job ends first."""
    deadline = time.monotonic() + timeout
    while True:
        (record,) = cluster.jobs(job)
        if re.search(pattern, _log(record)):
            return
        assert record["JobState"] not in TERMINAL, f"job {job} ended first:\n{_log(record)}"
        assert time.monotonic() < deadline, f"no {pattern!r} after {timeout:.0f} s:\n{_log(record)}"
        time.sleep(0.5)


def test_two_jobs_on_one_node_both_complete(slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path) -> None:
    """Two one-node jobs placed on the same node, the shorter ending first: neither joins the other's
    rendezvous (with a fixed port the longer one died when the shorter one's store went away)."""
    on_n1 = ["--nodelist=n1", "--gpus-per-node=0", "--cpus-per-task=1"]  # 1 CPU each: both fit on n1
    long_steps, short_steps = 2 * STEPS_PER_EPOCH, 4
    long_job = _submit(
        slurm_cluster,
        tmp_path,
        [
            "--data",
            str(demo_shards),
            "--run-dir",
            str(tmp_path / "long"),
            *SMALL_RUN,
            "--epochs",
            "2",
            "--train.log-every",
            "1",
        ],
        resources=on_n1,
    )
    short_job = _submit(
        slurm_cluster,
        tmp_path,
        [
            "--data",
            str(demo_shards),
            "--run-dir",
            str(tmp_path / "short"),
            *SMALL_RUN,
            "--epochs",
            "1",
            "--max-steps",
            str(short_steps),
        ],
        resources=on_n1,
    )
    try:
        (short,) = slurm_cluster.wait(short_job, timeout=400)
        (long,) = slurm_cluster.wait(long_job, timeout=600)
    finally:
        _cancel(slurm_cluster, short_job)
        _cancel(slurm_cluster, long_job)
    for record in (short, long):
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", _log(record)
    for record in (short, long):
        assert record["NodeList"] == "n1", record
        assert "rendezvous localhost:0" in _log(record), _log(record)
    # They did overlap, and the short one ended while the long one was running.
    assert long["StartTime"] <= short["EndTime"] <= long["EndTime"], (short, long)
    assert _meta(_latest(tmp_path / "short"))["progress"]["step"] == short_steps
    assert _meta(_latest(tmp_path / "long"))["progress"]["step"] == long_steps


def test_second_job_on_a_live_run_dir_fails_at_once(
    slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    epochs = 2
    first = _submit(
        slurm_cluster,
        tmp_path,
        [
            "--data",
            str(demo_shards),
            "--run-dir",
            str(run_dir),
            *SMALL_RUN,
            "--epochs",
            str(epochs),
            "--train.log-every",
            "1",
        ],
    )
    second = None
    try:
        _wait_for_steps(slurm_cluster, first, rf"step [1-9]/{epochs * STEPS_PER_EPOCH} ")
        lease = json.loads((run_dir / LEASE_NAME).read_text())
        assert lease["holder"] == f"Slurm job {first} on cluster alexnet-local", lease
        # The user resubmits (another seed) while the first job runs.
        second = _submit(
            slurm_cluster,
            tmp_path,
            ["--data", str(demo_shards), "--run-dir", str(run_dir), *SMALL_RUN, "--epochs", str(epochs), "--seed", "1"],
        )
        (refused,) = slurm_cluster.wait(second, timeout=300)
        assert slurm_cluster.job_state(first) == "RUNNING"  # refused while the first one still ran
        (done,) = slurm_cluster.wait(first, timeout=600)
    finally:
        _cancel(slurm_cluster, first)
        if second:
            _cancel(slurm_cluster, second)
    log = _log(refused)
    assert (refused["JobState"], refused["ExitCode"]) == ("FAILED", "2:0"), log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, log
    assert errors[0].startswith(
        f"error: {run_dir} is being written by Slurm job {first} on cluster alexnet-local (started "
    ), log
    assert f"stop it (scancel {first}), or use another --run-dir" in errors[0], log
    assert "Traceback" not in log and "step 1/" not in log, log
    assert done["JobState"] == "COMPLETED" and done["ExitCode"] == "0:0", _log(done)
    # Only the first job wrote: its seed in the config, its steps in the checkpoints, no lease left.
    assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == 0
    assert _meta(_latest(run_dir))["progress"]["step"] == epochs * STEPS_PER_EPOCH
    assert not (run_dir / LEASE_NAME).exists()


def _rank_pids(run_dir: Path, rank: int) -> list[int]:
    """launch.train processes of this run with RANK=rank (Slurm runs them on this host)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"launch.train" in cmd and str(run_dir).encode() in cmd and f"RANK={rank}".encode() in environ:
            found.append(int(proc.name))
    return found


def test_hung_job_is_requeued_and_finishes(slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path) -> None:
    """A rank SIGSTOPped with no elastic restarts left (MAX_RESTARTS=0): the watchdog names it, the job step
    fails, the script sees the hang it recorded and requeues the job, which resumes and completes."""
    run_dir = tmp_path / "run"
    total = 2 * STEPS_PER_EPOCH
    watch = ["--train.hang-timeout", "10", "--train.slow-phase-timeout", "20", "--train.collective-timeout-min", "2"]
    args = ["--data", str(demo_shards), "--run-dir", str(run_dir), *SMALL_RUN, "--epochs", "2"]
    args += ["--train.log-every", "1", "--checkpoint.every-steps", "4", *watch]
    job = _submit(slurm_cluster, tmp_path, args, env={"MAX_RESTARTS": "0", "PREFLIGHT": "off"})
    try:
        deadline = time.monotonic() + 180
        while True:
            (record,) = slurm_cluster.jobs(job)
            if re.search(rf"step ([6-9]|1[01])/{total} ", _log(record)):
                break
            assert record["JobState"] not in TERMINAL, f"job ended before the stop:\n{_log(record)}"
            assert time.monotonic() < deadline, f"no training steps after 180 s:\n{_log(record)}"
            time.sleep(0.05)
        (victim,) = _rank_pids(run_dir, 1)
        os.kill(victim, signal.SIGSTOP)

        deadline = time.monotonic() + 300
        while True:
            (record,) = slurm_cluster.jobs(job)
            if record.get("Restarts") == "1" and record["JobState"] in TERMINAL:
                break
            assert not (record.get("Restarts", "0") == "0" and record["JobState"] in TERMINAL), (
                f"job ended without a requeue ({record['JobState']}):\n{_log(record)}"
            )
            assert time.monotonic() < deadline, f"requeued job not done after 300 s: {record}\n{_log(record)}"
            time.sleep(0.5)
    finally:
        for pid in _rank_pids(run_dir, 1):
            os.kill(pid, signal.SIGCONT)
        _cancel(slurm_cluster, job)
    log = _log(record)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log
    first, _, second = log.partition(f"job {job} restart 1:")
    assert re.search(rf"hang: rank 1 \(host \S+, pid {victim}\)", first), first
    assert f"training failed after a hang ({run_dir}/hangs/" in first and f"requeueing job {job}" in first, first
    assert re.search(r"resumed from (\S+): epoch (\d+), step (\d+)", second), second
    assert _meta(_latest(run_dir))["progress"] == {"epoch": 2, "step": total, "step_in_epoch": 0}
