"""slurm/train.sh as real Slurm jobs on the two-node local cluster (tests/support/slurm.py, conftest.py):
one node (the tower pair as 2 processes), preemption by SIGUSR1 -> checkpoint -> requeue -> resume
(the run directory's lease passes to the requeued job), two nodes (dp=2 x tp=2, 4 processes), two
jobs sharing one node (their own rendezvous each), a second job on a run directory that a live
job writes (refused at once with one line), and a job that lands on a node of the node ledger (requeued
without it). The nodes have 2 CPUs and no GPUs, so jobs are submitted
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
from pipeline.faults import nodes
from pipeline.faults.lease import ENDED_STATES, LEASE_NAME
from tests.support import PYTHON, REPO, SMALL_RUN, flags
from tests.support.processes import free_port
from tests.support.slurm import SlurmCluster

pytestmark = pytest.mark.slurm

SCRIPT = str(REPO / "slurm" / "train.sh")
RESOURCES = ["--gpus-per-node=0", "--cpus-per-task=2"]
STEPS_PER_EPOCH = 12  # 94 demo train images, batch 8
# A run that cannot end by itself within any test's deadline: it trains until the test stops it with
# RUN_DIR/preempt.request (an operator's stop: checkpoint at the next control step, exit 0). A job
# "still running after N steps" would be a race on a fast machine.
UNTIL_STOPPED = ["--epochs", "10000"]


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
        if cluster.job_state(job) not in ENDED_STATES:
            cluster.scancel(job)
            cluster.wait(job, timeout=60)
    except Exception:
        pass


def _request_stop(run_dir: Path) -> None:
    """What slurm/train.sh's signal trap writes; without the signal the script does not requeue."""
    (run_dir / "preempt.request").touch()


def _stop_line(log: str) -> int:
    """The step at which the trainer stopped for a stop request (its one warning line)."""
    found = re.findall(r"stopped at epoch \d+, step (\d+) ", log)
    assert found, log
    return int(found[-1])


def _wait_for_requeued_training(cluster: SlurmCluster, job: str, timeout: float = 300) -> None:
    """Until the job's second run (Restarts=1) has resumed and logged a step; fails if the job ends first."""
    deadline = time.monotonic() + timeout
    while True:
        (record,) = cluster.jobs(job)
        assert record.get("Restarts", "0") in ("0", "1"), record
        assert record["JobState"] not in ENDED_STATES, f"job ended ({record['JobState']}):\n{_log(record)}"
        second = _log(record).partition(f"job {job} restart 1:")[2]
        if re.search(r"resumed from .*\n(.*\n)*.* step \d+/", second):
            return
        assert time.monotonic() < deadline, f"requeued job not training after {timeout:.0f} s: {record}\n{_log(record)}"
        time.sleep(0.5)


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
        [*flags("--data {} --run-dir {}", demo_shards, run_dir), *SMALL_RUN, *flags("--epochs 1 --train.log-every 4")],
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
    train_args = [*flags("--data {} --run-dir {}", demo_shards, run_dir), *SMALL_RUN, *UNTIL_STOPPED]
    job = _submit(slurm_cluster, tmp_path, [*train_args, *flags("--train.log-every 1 --train.control-every 1")])
    try:
        # Once the first run has taken steps, signal the batch shell the way Slurm does before the time
        # limit (#SBATCH --signal=B:USR1@120) and operators do by hand.
        _wait_for_steps(slurm_cluster, job, r"step [1-9]\d*/")
        slurm_cluster.scancel(job, "-b", "--signal=USR1")

        # The job requeues itself (Restarts=1) and resumes; once the resumed run has stepped on, the
        # operator stops it for good (no signal, so no requeue).
        _wait_for_requeued_training(slurm_cluster, job)
        _request_stop(run_dir)
        (record,) = slurm_cluster.wait(job, timeout=300)
    finally:
        _cancel(slurm_cluster, job)
    log = _log(record)
    assert (record["JobState"], record["ExitCode"], record.get("Restarts")) == ("COMPLETED", "0:0", "1"), log

    # First run: the trap's stop request, a checkpoint at the next step, exit 0, `scontrol requeue`.
    first, _, second = log.partition(f"job {job} restart 1:")
    assert second, f"no second run in the log:\n{log}"
    assert "signal received" in first and f"requeueing job {job}" in first, first
    assert f"Slurm job {job} on cluster alexnet-local takes over from its previous incarnation" in second, second
    step = _stop_line(first)
    assert step >= 1, step
    assert re.search(r"training stopped for preemption \(exit 0\)", first), first
    # Second run: resumed from exactly that checkpoint and trained on from it.
    resumed = re.search(r"resumed from (\S+): epoch (\d+), step (\d+)", second)
    assert resumed, second
    assert Path(resumed.group(1)).name == f"step-{step:08d}" and int(resumed.group(3)) == step, resumed.group(0)
    assert "signal received" not in second and "requeueing" not in second, second
    final = _stop_line(second)
    assert final > step, (step, final)
    assert _meta(_latest(run_dir))["progress"]["step"] == final
    assert not (run_dir / "preempt.request").exists()
    # Stopped without a requeue: the lease stays with this (ended) job; a later job takes it over.
    assert json.loads((run_dir / LEASE_NAME).read_text())["holder"] == f"Slurm job {job} on cluster alexnet-local"


def test_two_node_job_completes(slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    steps = 4
    job = _submit(
        slurm_cluster,
        tmp_path,
        [
            *flags("--data {} --run-dir {}", demo_shards, run_dir),
            *SMALL_RUN,
            *flags("--epochs 1 --max-steps {} --train.log-every 2", steps),
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
        assert record["JobState"] not in ENDED_STATES, f"job {job} ended first:\n{_log(record)}"
        assert time.monotonic() < deadline, f"no {pattern!r} after {timeout:.0f} s:\n{_log(record)}"
        time.sleep(0.5)


def test_two_jobs_on_one_node_both_complete(slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path) -> None:
    """Two one-node jobs placed on the same node, the shorter ending first: neither joins the other's
    rendezvous (with a fixed port the longer one died when the shorter one's store went away)."""
    on_n1 = flags("--nodelist=n1 --gpus-per-node=0 --cpus-per-task=1")  # 1 CPU each: both fit on n1
    short_steps = 4
    long_dir = tmp_path / "long"
    common = ["--data", str(demo_shards), *SMALL_RUN]
    long_args = ["--run-dir", str(long_dir), *common, *UNTIL_STOPPED, "--train.log-every", "1"]
    long_job = _submit(slurm_cluster, tmp_path, long_args, resources=on_n1)
    short_args = ["--run-dir", str(tmp_path / "short"), *common, *flags("--epochs 1 --max-steps {}", short_steps)]
    short_job = _submit(slurm_cluster, tmp_path, short_args, resources=on_n1)
    try:
        (short,) = slurm_cluster.wait(short_job, timeout=400)
        # The long one (it cannot end by itself) still runs, in its own rendezvous, when the short one is done.
        assert slurm_cluster.job_state(long_job) == "RUNNING", _log(slurm_cluster.jobs(long_job)[0])
        steps_then = _logged_steps(_log(slurm_cluster.jobs(long_job)[0]))
        _wait_for_steps(slurm_cluster, long_job, rf"step {steps_then + 1}/")
        _request_stop(long_dir)
        (long,) = slurm_cluster.wait(long_job, timeout=300)
    finally:
        _cancel(slurm_cluster, short_job)
        _cancel(slurm_cluster, long_job)
    for record in (short, long):
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", _log(record)
        assert record["NodeList"] == "n1", record
        assert "rendezvous localhost:0" in _log(record), _log(record)
    # They did overlap, and the long one trained on after the short one ended.
    assert long["StartTime"] <= short["EndTime"] <= long["EndTime"], (short, long)
    assert _meta(_latest(tmp_path / "short"))["progress"]["step"] == short_steps
    assert _meta(_latest(long_dir))["progress"]["step"] == _stop_line(_log(long)) > steps_then


def _logged_steps(log: str) -> int:
    """The newest step the trainer has logged (0 before the first)."""
    return max((int(s) for s in re.findall(r" step (\d+)/", log)), default=0)


def test_second_job_on_a_live_run_dir_fails_at_once(
    slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    first_args = [*flags("--data {} --run-dir {}", demo_shards, run_dir), *SMALL_RUN, *UNTIL_STOPPED]
    first = _submit(slurm_cluster, tmp_path, [*first_args, "--train.log-every", "1"])
    second = None
    try:
        _wait_for_steps(slurm_cluster, first, r"step [1-9]\d*/")
        lease = json.loads((run_dir / LEASE_NAME).read_text())
        assert lease["holder"] == f"Slurm job {first} on cluster alexnet-local", lease
        # The user resubmits (another seed) while the first job runs.
        second = _submit(
            slurm_cluster,
            tmp_path,
            [*flags("--data {} --run-dir {}", demo_shards, run_dir), *SMALL_RUN, *flags("--epochs 2 --seed 1")],
        )
        (refused,) = slurm_cluster.wait(second, timeout=300)
        # The first job cannot end by itself: it held the run dir through the whole refusal.
        assert slurm_cluster.job_state(first) == "RUNNING", _log(slurm_cluster.jobs(first)[0])
        _request_stop(run_dir)
        (done,) = slurm_cluster.wait(first, timeout=300)
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
    # Only the first job wrote: its seed in the config, its steps in the checkpoints, its lease.
    assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == 0
    assert _meta(_latest(run_dir))["progress"]["step"] == _stop_line(_log(done))
    assert json.loads((run_dir / LEASE_NAME).read_text())["holder"] == f"Slurm job {first} on cluster alexnet-local"


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
    fails, the script sees the hang it recorded and requeues the job, which resumes and trains on."""
    run_dir = tmp_path / "run"
    watch = flags("--faults.hang.timeout 10 --faults.hang.slow-phase-timeout 20 --faults.hang.collective-timeout-min 2")
    args = [*flags("--data {} --run-dir {}", demo_shards, run_dir), *SMALL_RUN, *UNTIL_STOPPED]
    args += [*flags("--train.log-every 1 --checkpoint.every-steps 4"), *watch]
    job = _submit(slurm_cluster, tmp_path, args, env={"MAX_RESTARTS": "0", "PREFLIGHT": "off"})
    try:
        _wait_for_steps(slurm_cluster, job, r" step ([6-9]|\d\d+)/", timeout=180)  # past the checkpoint at step 4
        (victim,) = _rank_pids(run_dir, 1)
        os.kill(victim, signal.SIGSTOP)

        # The job is requeued after the hang (Restarts=1); once the resumed run trains, the operator stops it.
        _wait_for_requeued_training(slurm_cluster, job)
        _request_stop(run_dir)
        (record,) = slurm_cluster.wait(job, timeout=300)
    finally:
        for pid in _rank_pids(run_dir, 1):
            os.kill(pid, signal.SIGCONT)
        _cancel(slurm_cluster, job)
    log = _log(record)
    assert (record["JobState"], record["ExitCode"], record.get("Restarts")) == ("COMPLETED", "0:0", "1"), log
    first, _, second = log.partition(f"job {job} restart 1:")
    assert re.search(rf"hang: rank 1 \(host \S+, pid {victim}\)", first), first
    assert f"training failed after a hang ({run_dir}/hangs/" in first and f"requeueing job {job}" in first, first
    resumed = re.search(r"resumed from (\S+): epoch (\d+), step (\d+)", second)
    assert resumed and int(resumed.group(3)) >= 4, second
    assert _meta(_latest(run_dir))["progress"]["step"] == _stop_line(second) > int(resumed.group(3))


def test_node_cut_off_is_named_and_the_job_requeued_without_it(
    slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path
) -> None:
    """Two nodes hung in the same collective, n2's probe listener answering nothing (a cut link, emulated by
    tests/support/hooks: both slurmd share one host). The watchdog names n2 in the line and in hang.json,
    both torchruns end, and the script requeues the job excluding n2: with one node left, the two-node job
    stays pending (BadConstraints) and is cancelled here."""
    run_dir = tmp_path / "run"
    watch = flags("--faults.hang.timeout 10 --faults.hang.slow-phase-timeout 20 --faults.hang.collective-timeout-min 2")
    args = [*flags("--data {} --run-dir {}", demo_shards, run_dir), *SMALL_RUN, *UNTIL_STOPPED, *watch]
    hooks = os.pathsep.join([str(REPO / "tests" / "support" / "hooks"), str(REPO)])
    env = {"PREFLIGHT": "off", "PYTHONPATH": hooks, "ALEXNET_TEST_HANG_AT": "3", "ALEXNET_TEST_UNREACHABLE_NODE": "n2"}
    job = _submit(slurm_cluster, tmp_path, [*args, "--train.log-every", "1"], nodes=2, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            (record,) = slurm_cluster.jobs(job)
            if record.get("Restarts") == "1" and record["Reason"] not in ("None", "BeginTime"):
                break
            assert record["JobState"] not in ENDED_STATES, _log(record)
            assert time.monotonic() < deadline, f"no requeue after 300 s: {record}\n{_log(record)}"
            time.sleep(0.5)
    finally:
        _cancel(slurm_cluster, job)
    log = _log(record)
    assert (record["JobState"], record["ExcNodeList"], record["Reason"]) == ("PENDING", "n2", "BadConstraints"), (
        record,
        log,
    )
    line = next(ln for ln in log.splitlines() if "hang: " in ln)
    assert re.search(r"rank \d \(host n1\) cannot reach rank \d \(host n2, [\d.]+:\d+\): the network", line), line
    folder = Path(re.search(r"Python in (\S+)/rank-N.txt", line).group(1))
    assert [u["node"] for u in json.loads((folder / "hang.json").read_text())["unreachable"]] == ["n2"]
    assert "n1: ending torchrun (pid " in log and "n2: ending torchrun (pid " in log, log
    assert f"n2 cannot reach the other nodes; requeueing job {job} excluding n2" in log, log


def test_strict_preflight_fails_the_job_on_real_slurm_without_requeue(
    slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path
) -> None:
    """PREFLIGHT=strict with rank 1's device measured slow (tests/support/hooks): the job ends FAILED with
    exit 1 before training, and Slurm does not requeue it (tests/*/test_train_script.py cover the
    script's decisions with stand-ins; this is Slurm acting on them)."""
    run_dir = tmp_path / "run"
    hooks = os.pathsep.join([str(REPO / "tests" / "support" / "hooks"), str(REPO)])
    env = {"PREFLIGHT": "strict", "PYTHONPATH": hooks, "ALEXNET_TEST_SLOW_MATMUL_RANK": "1"}
    args = [*flags("--data {} --run-dir {}", demo_shards, run_dir), *SMALL_RUN, *flags("--max-steps 2")]
    job = _submit(slurm_cluster, tmp_path, args, env=env)
    try:
        (record,) = slurm_cluster.wait(job, timeout=240)
    finally:
        _cancel(slurm_cluster, job)
    log = _log(record)
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "1:0", log
    assert record.get("Restarts") == "0", record
    assert "pre-flight failed (exit 1): not training on this allocation" in log, log
    assert re.search(r"preflight: rank 1 \(host \S+\) matmul GFLOP/s [\d.]+ is below", log), log
    assert not (run_dir / "checkpoints").exists(), log


def test_a_node_in_the_ledger_is_excluded_and_the_job_finishes_on_the_other(
    slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path
) -> None:
    """The ledger beside the run directories (RUN_DIR/../.alexnet-nodes.jsonl) names n1, as an earlier job's
    hang would have. A one-node job is placed on n1 (both nodes idle: Slurm takes the first), says so, is
    requeued excluding n1 before it trains, and trains to the end on n2 (tests/*/test_train_script.py cover
    the script's decision with stand-ins; this is Slurm acting on it)."""
    run_dir = tmp_path / "run"
    nodes.record(run_dir, "n1", "hang", "unreachable from the other nodes (an earlier job)")
    assert nodes.ledger(run_dir) == tmp_path / ".alexnet-nodes.jsonl"
    args = [*flags("--data {} --run-dir {}", demo_shards, run_dir), *SMALL_RUN, *flags("--max-steps 2")]
    job = _submit(slurm_cluster, tmp_path, args, env={"PREFLIGHT": "off"})
    try:
        (record,) = slurm_cluster.wait(job, timeout=300)
    finally:
        _cancel(slurm_cluster, job)
    log = _log(record)
    assert (record["JobState"], record["ExitCode"], record.get("Restarts")) == ("COMPLETED", "0:0", "1"), log
    assert (record["NodeList"], record["ExcNodeList"]) == ("n2", "n1"), (record, log)
    ledger = tmp_path / ".alexnet-nodes.jsonl"
    assert f"n1 failed in an earlier job ({ledger}): requeueing job {job} excluding n1" in log, log
    # The first allocation (n1) ended before its first job step; only the requeued one trained.
    assert f"job {job} restart 0:" not in log and f"job {job} restart 1: 1 node(s)" in log, log
    assert _meta(_latest(run_dir))["progress"]["step"] == 2
