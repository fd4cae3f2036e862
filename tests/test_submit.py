"""launch.submit: the CLI and its executor parameters (no Slurm), then real jobs through submitit on the
local two-node Slurm cluster (tests/support/slurm.py): a short run, a preemption (USR2 -> collective
checkpoint -> requeue -> resume -> COMPLETED, the run directory's lease passing to the requeued job;
a resubmission into the live run directory refused) and dp 2 x tp 2 over two nodes."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch import submit
from pipeline.faults.lease import ENDED_STATES
from tests.support import REPO, SMALL_RUN, flags
from tests.support.slurm import SlurmCluster

# The test cluster: 2 nodes of 2 CPUs, no GPUs; a short limit (the preemption signal is sent by hand).
CPU_JOB = flags("--gpus-per-node 0 --cpus-per-task 1 --time-min 10")


# ------------------------------------------------------------------------------- CLI, no Slurm


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Path:
    data = tmp_path / "shards"
    data.mkdir()
    (data / "manifest.json").write_text("{}")  # the submitter only checks that it is there
    return data


def test_help_lists_every_option_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        submit.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--nodes",
        "--gpus-per-node",
        "--tasks-per-node",
        "--cpus-per-task",
        "--partition",
        "--time-min",
        "--mem-gb",
        "--folder",
        "--signal-delay-s",
        "--local",
        "--dry-run",
        "--wait",
        "--max-timeouts",
    ):
        assert flag in text, flag
    assert "(default: 120)" in text and "(default: 1440)" in text and "RUN_DIR/submitit" in text


def test_executor_parameters_follow_the_flags(
    manifest_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # Defaults: one node, one task per GPU (the paper's pair), paths made absolute, logs in RUN_DIR/submitit.
    submission = submit.make_submission(flags("-- --data shards --run-dir runs/a"))
    assert submission.executor == "slurm" and submission.num_tasks == 2
    p = submission.parameters
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["cpus_per_task"]) == (1, 2, 2, 8)
    assert (p["time"], p["signal_delay_s"], p["additional_parameters"]) == (1440, 120, {"requeue": True})
    assert "--kill-on-bad-exit=1" in p["srun_args"] and "mem" not in p and "partition" not in p
    assert submission.run_dir == tmp_path / "runs" / "a" and submission.folder == submission.run_dir / "submitit"
    assert submission.train_argv[-4:] == flags("--data {} --run-dir {}", manifest_dir, tmp_path / "runs" / "a")

    submission = submit.make_submission(
        [
            *flags("--nodes 4 --gpus-per-node 8 --partition gpu --mem-gb 64 --time-min 90"),
            *flags("--signal-delay-s 300 --folder logs --max-timeouts 5 -- --data {}", manifest_dir),
            *flags("--run-dir {}", tmp_path / "r"),
        ]
    )
    p = submission.parameters
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["partition"], p["mem"]) == (4, 8, 8, "gpu", "64GB")
    assert (p["time"], p["signal_delay_s"], submission.max_timeouts) == (90, 300, 5)
    assert (
        submission.folder == tmp_path / "logs" and submission.num_tasks == 32 and "dp 16 x tp 2" in submission.notes[0]
    )
    assert submission.train_argv == flags("--data {} --run-dir {}", manifest_dir, tmp_path / "r")  # already absolute

    # CPU-only: no GPU request, two tasks per node unless told; --tp 1 allows odd counts.
    p = submit.make_submission([*CPU_JOB, *flags("-- --data {}", manifest_dir)]).parameters
    assert "gpus_per_node" not in p and p["ntasks_per_node"] == 2 and p["cpus_per_task"] == 1
    assert (
        submit.make_submission(
            flags("--gpus-per-node 0 --tasks-per-node 3 -- --data {} --tp 1", manifest_dir)
        ).num_tasks
        == 3
    )

    local = submit.make_submission(flags("--local --gpus-per-node 0 --time-min 30 -- --data {}", manifest_dir))
    assert local.executor == "local"
    assert {k: local.parameters[k] for k in ("tasks_per_node", "gpus_per_node", "timeout_min", "signal_delay_s")} == {
        "tasks_per_node": 2,
        "gpus_per_node": 0,
        "timeout_min": 30,
        "signal_delay_s": 120,
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (flags("--gpus-per-node 0 --tasks-per-node 3"), "not divisible by --tp 2"),
        (flags("--gpus-per-node 2 --tasks-per-node 4"), "> --gpus-per-node 2"),
        (flags("--local --nodes 2"), "--nodes must be 1"),
        (["--nodes", "0"], "--nodes must be positive"),
    ],
)
def test_impossible_layouts_are_refused(
    args: list[str], message: str, manifest_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert submit.main([*args, *flags("--dry-run -- --data {}", manifest_dir)]) == 2
    assert message in capsys.readouterr().err


def test_bad_training_arguments_are_refused_before_submission(
    tmp_path: Path, manifest_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert submit.main(flags("--dry-run -- --data {}", tmp_path / "nowhere")) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert submit.main(flags("--dry-run -- --data {} --no-such-flag", manifest_dir)) == 2
    assert "bad launch.train arguments" in capsys.readouterr().err


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(
    manifest_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert submit.main(["--dry-run", *CPU_JOB, *flags("-- --data {} --run-dir {}", manifest_dir, run_dir)]) == 0
    out = capsys.readouterr().out
    assert "nothing submitted" in out and "world 2 = dp 1 x tp 2" in out
    for line in (
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --time=10",
        "#SBATCH --requeue",
        "#SBATCH --cpus-per-task=1",
        "export SUBMITIT_EXECUTOR=slurm",
        f"export PYTHONPATH={REPO}",
    ):
        assert line in out, line
    assert re.search(r"^srun .*--kill-on-bad-exit=1 .* -m submitit.core._submit " + re.escape(str(run_dir)), out, re.M)
    assert "--gpus-per-node" not in out
    assert not run_dir.exists()


def test_the_callable_pickles_small_and_checkpoints_a_fresh_copy() -> None:
    job = submit.TrainJob(flags("--data /d --run-dir /r"))
    job._stop = threading.Event()  # runtime state, as inside __call__: never pickled
    job._stop.set()
    copy = pickle.loads(pickle.dumps(job))
    assert copy.argv == job.argv and copy._stop is None
    resubmission = job.checkpoint()
    assert type(resubmission).__name__ == "DelayedSubmission"
    assert isinstance(resubmission.function, submit.TrainJob) and resubmission.function is not job
    assert resubmission.function.argv == job.argv and resubmission.args == () and resubmission.kwargs == {}
    pickle.dumps(resubmission)  # submitit dumps it as the requeued job's pickle
    assert submit.rendezvous_port("7") == 20007 and submit.rendezvous_port("45007") == 29007


@pytest.mark.parametrize(
    "rank, sig, requeues", [(0, signal.SIGUSR2, True), (1, signal.SIGUSR2, False), (0, signal.SIGTERM, False)]
)
def test_signal_only_stops_then_rank0_requeues_through_submitit(
    rank: int, sig: int, requeues: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signal/requeue path in one process, with submitit's job environment and the trainer faked."""
    import submitit

    import launch.train
    from pipeline.process import ProcessEnv

    class FakeJobEnvironment:  # what submitit.JobEnvironment() gives a task of job 5
        USR_SIG = "USR2"

        def __init__(self) -> None:
            self.global_rank, self.num_tasks, self.local_rank, self.num_nodes = rank, 2, rank, 1
            self.hostnames, self.hostname, self.cluster, self.job_id, self.raw_job_id = ["n1"], "n1", "local", "5", "5"

    calls: list[tuple] = []

    def fake_run(argv: list[str], stop: threading.Event, env: ProcessEnv) -> SimpleNamespace:
        calls.append(("run", argv, env))
        os.kill(os.getpid(), sig)  # arrives mid-"training": only sets the Event
        assert stop.wait(10)
        calls.append(("stopped",))
        return SimpleNamespace(preempted=True, progress=SimpleNamespace(epoch=0, step=6), val_top1_error=None)

    job = submit.TrainJob(flags("--data /d --run-dir /r"))

    def submitit_handler(signum: int, frame: object) -> None:  # submitit's SignalHandler on rank 0
        calls.append(("submitit", signum, job.checkpoint()))
        raise SystemExit(-1)  # it requeues, then sys.exit(-1)

    monkeypatch.setattr(submitit, "JobEnvironment", FakeJobEnvironment)
    monkeypatch.setattr(launch.train, "run", fake_run)
    for name in ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, "unset" if name != "OMP_NUM_THREADS" else "1")  # restored afterwards
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    signal.signal(signal.SIGUSR2, submitit_handler)  # submitit installs it before calling the job
    try:
        if requeues:
            with pytest.raises(SystemExit):
                job()
            result = None
        else:
            result = job()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)

    assert calls[0] == ("run", job.argv, ProcessEnv(rank=rank, world_size=2, local_rank=rank))
    assert calls[1] == ("stopped",)  # the signal did not end the process: the trainer stopped it
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("127.0.0.1", "20005")
    if requeues:
        assert calls[2][:2] == ("submitit", signal.SIGUSR2) and calls[2][2].function.argv == job.argv
    else:
        assert len(calls) == 2 and result == {
            "rank": rank,
            "preempted": True,
            "epoch": 0,
            "step": 6,
            "val_top1_error": None,
        }


def test_import_is_light() -> None:
    """The job's tasks unpickle TrainJob by importing launch.submit: no torch, no training code (the lease
    module, stdlib only, is all it takes from pipeline)."""
    heavy = "('torch', 'submitit', 'numpy', 'pipeline.train', 'pipeline.checkpoint', 'pipeline.config')"
    code = f"import sys, launch.submit; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


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
