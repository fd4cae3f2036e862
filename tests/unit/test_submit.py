"""launch.submit: the CLI and its executor parameters (no Slurm), then real jobs through submitit on the
local two-node Slurm cluster (tests/support/slurm.py): a short run, a preemption (USR2 -> collective
checkpoint -> requeue -> resume -> COMPLETED, the run directory's lease passing to the requeued job;
a resubmission into the live run directory refused) and dp 2 x tp 2 over two nodes."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch import submit
from tests.support import REPO, flags

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
