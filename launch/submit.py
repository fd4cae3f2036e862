"""Submit the training job through submitit: the Python twin of ``sbatch slurm/train.sh``.

    python -m launch.submit -- --data /scratch/shards --run-dir /scratch/runs/alexnet
    python -m launch.submit --nodes 4 --gpus-per-node 8 --partition gpu -- --data /scratch/shards \\
        --run-dir /scratch/runs/a4 --config configs/paper_4node_8gpu.toml     # 16 replicas x 2 towers
    python -m launch.submit --gpus-per-node 0 --tasks-per-node 2 --cpus-per-task 4 -- --data ...   # CPU cluster
    python -m launch.submit --local --gpus-per-node 0 -- --data demo/shards --run-dir runs/laptop  # no Slurm
    python -m launch.submit --dry-run -- --data ...     # print the sbatch script; submit nothing

Options before ``--`` shape the job; everything after ``--`` goes to ``python -m launch.train``
and is checked here before anything is submitted (paths are made absolute). Returns once the job is
queued (``--wait``: once it ends, requeues included).

Every task runs ``TrainJob`` (no torchrun: submitit starts one task per GPU). submitit gives
``checkpoint()`` to global rank 0 only, but a checkpoint is collective, so each task turns USR2/TERM
into the trainer's stop flag; after the collective save, rank 0 goes through submitit's requeue. The
rendezvous port is derived from the job id, as in slurm/train.sh. How and why in docs/launching.md.
This module imports no torch at import time: tasks unpickle ``TrainJob`` quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basics.errors import UserError, run_cli
from pipeline.faults.lease import ENDED_STATES

REPO = Path(__file__).resolve().parents[1]
PORT_BASE, PORT_RANGE = 20000, 12000  # ports 20000-31999; slurm/train.sh has the same formula


class SubmitError(UserError):
    """A bad option or an impossible layout: reported as one `error:` line, exit status 2."""


# ---------------------------------------------------------------------------------- the job itself


def rendezvous_port(job_id: str) -> int:
    """MASTER_PORT for a job: stable across requeues (same id), spread over 20000-31999."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return PORT_BASE + int(digits) % PORT_RANGE


def node_address(name: str) -> str:
    """The address Slurm knows node `name` by (NodeAddr), else the name itself."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", "-o", name],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return name
    match = re.search(r"(?:^|\s)NodeAddr=(\S+)", out)
    return match.group(1) if match and match.group(1) not in ("(null)", "") else name


class TrainJob:
    """The submitted callable: ``launch.train.run(argv)`` in every task of the job.

    Picklable by design: it holds only ``argv`` (the runtime state of one run is dropped when it is
    pickled), so ``checkpoint()`` can always hand submitit a fresh copy to requeue.
    """

    def __init__(self, argv: list[str]):
        self.argv = list(argv)
        self._stop: threading.Event | None = None
        self._signals: list[int] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"argv": self.argv}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["argv"])

    def __repr__(self) -> str:
        return f"TrainJob({shlex.join(self.argv)})"

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook (global rank 0): resubmit the same arguments.

        The training state is on disk (the collective stop checkpoint, or else the newest one):
        the requeued job resumes from RUN_DIR's latest checkpoint, so nothing else is carried.
        """
        from submitit.helpers import DelayedSubmission

        if self._stop is None or not self._stop.is_set():
            # submitit called us on its own (a signal before __call__ replaced its handler): no
            # stop checkpoint was taken, the requeued job redoes the steps since the newest one.
            print(
                "launch.submit: requeued without a stop checkpoint; resuming from the latest one",
                file=sys.stderr,
                flush=True,
            )
        return DelayedSubmission(TrainJob(self.argv), *args, **kwargs)

    def __call__(self) -> dict[str, Any]:
        import submitit

        job_env = submitit.JobEnvironment()
        rank, world, local_rank = job_env.global_rank, job_env.num_tasks, job_env.local_rank
        preempt_sig = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        # submitit installed its handlers before calling us: keep its preemption handler (its
        # requeue path, used on rank 0 after the collective stop) and put ours in front.
        submitit_handler = signal.getsignal(preempt_sig)
        self._stop = stop = threading.Event()
        self._signals = []

        training = True

        def on_signal(signum: int, frame: object) -> None:
            self._signals.append(signum)
            stop.set()
            then = "checkpointing at the next step boundary" if training else "training has already ended"
            # os.write: a print here could re-enter a buffered write the main thread is in the middle of
            os.write(2, f"launch.submit: rank {rank} received {signal.Signals(signum).name}: {then}\n".encode())

        signal.signal(preempt_sig, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

        first = job_env.hostnames[0] if job_env.hostnames else socket.gethostname()
        master = node_address(first) if job_env.cluster == "slurm" else "127.0.0.1"
        os.environ["MASTER_ADDR"] = master
        os.environ["MASTER_PORT"] = str(rendezvous_port(job_env.raw_job_id))
        if "OMP_NUM_THREADS" not in os.environ:  # before torch is imported: one thread per CPU of the task
            per_node = max(1, world // max(job_env.num_nodes, 1))
            cpus = os.environ.get("SLURM_CPUS_PER_TASK") or str(max(1, (os.cpu_count() or 1) // per_node))
            os.environ["OMP_NUM_THREADS"] = cpus
        node = os.environ.get("SLURMD_NODENAME", job_env.hostname)
        print(
            f"launch.submit: job {job_env.job_id} restart {os.environ.get('SLURM_RESTART_COUNT', 0)}: "
            f"task {rank}/{world} (local {local_rank}) on {node}, rendezvous {master}:{os.environ['MASTER_PORT']}",
            file=sys.stderr,
            flush=True,
        )

        from launch.train import run
        from pipeline.process import ProcessEnv

        try:
            outcome = run(self.argv, stop=stop, env=ProcessEnv(rank=rank, world_size=world, local_rank=local_rank))
        finally:
            training = False
        summary = {
            "rank": rank,
            "preempted": outcome.preempted,
            "epoch": outcome.progress.epoch,
            "step": outcome.progress.step,
            "val_top1_error": outcome.val_top1_error,
        }
        if outcome.preempted and preempt_sig in self._signals and rank == 0 and callable(submitit_handler):
            print(
                f"launch.submit: stopped at step {outcome.progress.step} with a checkpoint; requeueing "
                f"job {job_env.job_id}",
                file=sys.stderr,
                flush=True,
            )
            # submitit's handler: checkpoint() -> dump the resubmission -> requeue -> sys.exit.
            submitit_handler(preempt_sig, None)
        elif outcome.preempted:
            print(
                f"launch.submit: rank {rank} stopped at step {outcome.progress.step} with a checkpoint"
                + ("; rank 0 requeues the job" if preempt_sig in self._signals and rank else ""),
                file=sys.stderr,
                flush=True,
            )
        return summary


# ---------------------------------------------------------------------------------- submission


@dataclass
class Submission:
    """What would be submitted: the executor, its parameters and the training arguments."""

    executor: str  # "slurm" or "local"
    parameters: dict[str, Any]
    folder: Path
    run_dir: Path
    train_argv: list[str]
    max_timeouts: int
    num_tasks: int
    dry_run: bool = False
    wait: bool = False
    notes: list[str] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.submit",
        usage="python -m launch.submit [options] -- <launch.train arguments>",
        description=__doc__.split("\n\n")[0] + " Options before `--` shape the job; the rest goes to "
        "`python -m launch.train` (see its --help).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    job = parser.add_argument_group("job layout")
    job.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default: %(default)s)")
    job.add_argument(
        "--gpus-per-node",
        type=int,
        default=2,
        metavar="G",
        help="GPUs per node; 0 on a CPU-only cluster (default: %(default)s)",
    )
    job.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        metavar="T",
        help="processes per node (default: G, one per GPU; 2 when G is 0, the paper's pair)",
    )
    job.add_argument(
        "--cpus-per-task",
        type=int,
        default=8,
        metavar="C",
        help="CPU cores per process: data loading, OMP_NUM_THREADS in the job (default: %(default)s)",
    )
    job.add_argument(
        "--mem-gb", type=float, default=None, metavar="GB", help="memory per node (default: the partition's default)"
    )
    job.add_argument("--partition", default=None, metavar="P", help="partition (default: the cluster's default)")
    job.add_argument(
        "--time-min", type=int, default=24 * 60, metavar="M", help="time limit in minutes (default: %(default)s)"
    )
    job.add_argument("--job-name", default="alexnet", help="job name (default: %(default)s)")
    pre = parser.add_argument_group("preemption")
    pre.add_argument(
        "--signal-delay-s",
        type=int,
        default=120,
        metavar="S",
        help="USR2 this many seconds before the time limit: checkpoint at the next step "
        "boundary, then requeue (default: %(default)s)",
    )
    pre.add_argument(
        "--max-timeouts",
        type=int,
        default=3,
        metavar="K",
        help="requeues after reaching the time limit before giving up (preemptions do not count; default: %(default)s)",
    )
    out = parser.add_argument_group("submission")
    out.add_argument(
        "--folder",
        type=Path,
        default=None,
        metavar="LOGDIR",
        help="submitit's folder: job pickles and per-task logs (default: RUN_DIR/submitit)",
    )
    out.add_argument(
        "--local", action="store_true", help="no Slurm: run the tasks on this machine with submitit's local executor"
    )
    out.add_argument(
        "--dry-run", action="store_true", help="print the job (the sbatch script for Slurm) and submit nothing"
    )
    out.add_argument(
        "--wait", action="store_true", help="wait for the job to end (requeues included); exit with its exit status"
    )
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Options before the first `--`, launch.train arguments after it."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _absolute(path: str | Path) -> str:
    return str(Path(path).expanduser().absolute())


def resolve_train_argv(train_argv: list[str]) -> tuple[list[str], Path, int]:
    """Check the launch.train arguments as it would; (argv with absolute paths, run dir, tp).

    Imports the training config (and with it torch): only here, at submission, never in the job's
    unpickling.
    """
    from basics.errors import UserError
    from pipeline import config

    try:
        cfg, args = config.parse(train_argv)
    except SystemExit as e:  # argparse already printed what was wrong
        raise SubmitError(
            f"bad launch.train arguments after `--` (exit {e.code}); see python -m launch.train --help"
        ) from None
    except UserError as e:
        raise SubmitError(str(e)) from None
    if not cfg.data.data:
        raise SubmitError("--data is required after `--`: the preprocessed dataset directory (with manifest.json)")
    data = Path(cfg.data.data).expanduser()
    if not (data / "manifest.json").exists():
        raise SubmitError(
            f"--data {cfg.data.data}: no manifest.json there (the job would fail at start); "
            "pass the directory `python -m preprocess shard --out` wrote"
        )
    run_dir = Path(_absolute(cfg.run_dir))
    # The job may start in another directory and is requeued: pin every path (the last flag wins).
    extra = []
    if str(data) != _absolute(data):
        extra += ["--data", _absolute(data)]
    if cfg.run_dir != str(run_dir):
        extra += ["--run-dir", str(run_dir)]
    if args.config is not None and not Path(args.config).is_absolute():
        extra += ["--config", _absolute(args.config)]
    if args.resume and not Path(args.resume).is_absolute():
        extra += ["--resume", _absolute(args.resume)]
    return [*train_argv, *extra], run_dir, cfg.train.tp


def make_submission(argv: list[str]) -> Submission:
    own, train_argv = split_argv(argv)
    opts = build_parser().parse_args(own)
    for name in ("nodes", "time_min", "cpus_per_task", "max_timeouts"):
        if getattr(opts, name) < (0 if name == "max_timeouts" else 1):
            raise SubmitError(f"--{name.replace('_', '-')} must be positive (got {getattr(opts, name)})")
    if opts.gpus_per_node < 0 or opts.signal_delay_s < 0:
        raise SubmitError("--gpus-per-node and --signal-delay-s must not be negative")
    tasks = opts.tasks_per_node if opts.tasks_per_node is not None else (opts.gpus_per_node or 2)
    if tasks < 1:
        raise SubmitError(f"--tasks-per-node must be positive (got {tasks})")
    if opts.gpus_per_node and tasks > opts.gpus_per_node:
        raise SubmitError(
            f"--tasks-per-node {tasks} > --gpus-per-node {opts.gpus_per_node}: each process "
            "drives one GPU (pass --gpus-per-node 0 for CPU-only processes)"
        )
    if opts.local and opts.nodes != 1:
        raise SubmitError("--local runs on this machine only: --nodes must be 1")
    train_argv, run_dir, tp = resolve_train_argv(train_argv)
    num_tasks = opts.nodes * tasks
    if num_tasks % tp:
        raise SubmitError(f"{opts.nodes} node(s) x {tasks} task(s) = {num_tasks} processes, not divisible by --tp {tp}")
    folder = Path(_absolute(opts.folder)) if opts.folder else run_dir / "submitit"
    # The job imports launch.submit to unpickle TrainJob: put this checkout first on its path.
    setup = [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    if opts.local:
        params: dict[str, Any] = {
            "timeout_min": opts.time_min,
            "tasks_per_node": tasks,
            "gpus_per_node": opts.gpus_per_node,
            "signal_delay_s": opts.signal_delay_s,
            "setup": setup,
        }
    else:
        params = {
            "job_name": opts.job_name,
            "nodes": opts.nodes,
            "ntasks_per_node": tasks,
            "cpus_per_task": opts.cpus_per_task,
            "time": opts.time_min,
            "signal_delay_s": opts.signal_delay_s,
            "setup": setup,
            # a crashed rank ends the step (the others would wait in a collective otherwise)
            "srun_args": ["--kill-on-bad-exit=1"],
            # `scontrol requeue` from inside the job needs a requeueable job
            "additional_parameters": {"requeue": True},
        }
        if opts.gpus_per_node:
            params["gpus_per_node"] = opts.gpus_per_node
        if opts.partition:
            params["partition"] = opts.partition
        if opts.mem_gb is not None:
            gb = opts.mem_gb
            params["mem"] = f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"
    submission = Submission(
        "local" if opts.local else "slurm",
        params,
        folder,
        run_dir,
        train_argv,
        opts.max_timeouts,
        num_tasks,
        dry_run=opts.dry_run,
        wait=opts.wait,
    )
    submission.notes.append(
        f"{opts.nodes} node(s) x {tasks} task(s) = world {num_tasks} = dp {num_tasks // tp} x tp {tp}"
    )
    return submission


def sbatch_script(submission: Submission) -> str:
    """The sbatch script submitit would write for `submission` (Slurm only)."""
    from submitit.slurm import slurm as submitit_slurm

    command = " ".join(
        [shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(submission.folder))]
    )
    return submitit_slurm._make_sbatch_string(command=command, folder=submission.folder, **submission.parameters)


def make_executor(submission: Submission) -> Any:
    import submitit

    if submission.executor == "local":
        executor = submitit.LocalExecutor(folder=submission.folder, max_num_timeout=submission.max_timeouts)
    else:
        executor = submitit.SlurmExecutor(folder=submission.folder, max_num_timeout=submission.max_timeouts)
    executor.update_parameters(**submission.parameters)
    return executor


def log_paths(submission: Submission, job_id: str) -> list[tuple[Path, Path]]:
    from submitit.core.utils import JobPaths

    return [
        (p.stdout, p.stderr)
        for p in (JobPaths(submission.folder, job_id=job_id, task_id=t) for t in range(submission.num_tasks))
    ]


# ---------------------------------------------------------------------------------- waiting


# `scontrol show job -o`: one line per job (per array task), space-separated Key=Value pairs whose
# values may hold spaces (Command=script args...); a new key starts with a letter after a space.
_FIELD_SPLIT = re.compile(r" (?=[A-Za-z][A-Za-z0-9_:/]*=)")


def parse_job_records(text: str) -> list[dict[str, str]]:
    """`scontrol show job -o` output -> one dict per line (job or array task)."""
    return [
        dict(item.partition("=")[::2] for item in _FIELD_SPLIT.split(line.strip()))
        for line in text.splitlines()
        if line.strip().startswith("JobId=")
    ]


def _job_record(job_id: str) -> dict[str, str] | None:
    """`scontrol show job -o JOB` as a dict; None once Slurm has forgotten the job."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    records = parse_job_records(proc.stdout)
    return records[0] if proc.returncode == 0 and records else None


def _results_status(job: Any) -> int:
    """0 if every task left a successful result, else 1 (printing the first failure)."""
    try:
        job.results()
    except Exception as e:  # submitit raises FailedJobError/UncompletedJobError with the log
        print(f"job {job.job_id} failed:\n{e}", file=sys.stderr)
        return 1
    return 0


def wait_slurm(job: Any) -> int:
    """Poll Slurm until the job has ended for good (through any requeues); its exit status."""
    start, last = time.monotonic(), None
    while True:
        record = _job_record(job.job_id)
        if record is None:  # no longer known to slurmctld (MinJobAge passed): ask the result files
            return _results_status(job)
        state, restarts = record.get("JobState", "?"), record.get("Restarts", "0")
        if (state, restarts) != last:
            print(f"{time.strftime('%H:%M:%S')} job {job.job_id}: {state} (restarts {restarts})", flush=True)
            last = (state, restarts)
        if state in ENDED_STATES:
            code = int(record.get("ExitCode", "1:0").split(":")[0] or 1)
            if state != "COMPLETED":
                print(
                    f"job {job.job_id} ended {state} (reason {record.get('Reason')}, exit code "
                    f"{record.get('ExitCode')})",
                    file=sys.stderr,
                )
                return code or 1
            return code
        time.sleep(min(30.0, 1.0 + (time.monotonic() - start) / 10))


# ---------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _submit(argv))


def _submit(argv: list[str]) -> int:
    submission = make_submission(argv)
    if submission.dry_run:
        print(f"# dry run: nothing submitted; {submission.notes[0]}")
        print(f"# executor: {submission.executor}; folder: {submission.folder}; run dir: {submission.run_dir}")
        print(f"# parameters: {json.dumps(submission.parameters, default=str, sort_keys=True)}")
        print(f"# each task runs: launch.train.run({json.dumps(submission.train_argv)})")
        if submission.executor == "slurm":
            print(sbatch_script(submission))
        return 0
    if submission.executor == "slurm" and shutil.which("sbatch") is None:
        print("error: no sbatch on PATH: not a Slurm login node (use --local to run here)", file=sys.stderr)
        return 2

    from pipeline.faults.lease import check

    check(submission.run_dir, None)  # another live job writes this run directory: say so now, not in the job's log
    submission.run_dir.mkdir(parents=True, exist_ok=True)
    executor = make_executor(submission)
    try:
        job = executor.submit(TrainJob(submission.train_argv))
    except Exception as e:  # sbatch refused the job: submitit raises with sbatch's message
        print(f"error: submission failed: {e}", file=sys.stderr)
        return 1
    logs = log_paths(submission, job.job_id)
    print(f"submitted job {job.job_id} ({submission.executor}): {submission.notes[0]}")
    print(f"  run dir: {submission.run_dir}")
    print(f"  logs:    {logs[0][0]}")
    print(f"           {logs[0][1]}  (rank 0; task t: {job.job_id}_<t>_log.out/.err)")
    if submission.executor == "slurm":
        print(f"  checkpoint and requeue now: scancel --signal=USR2 {job.job_id}")
    sys.stdout.flush()
    if not submission.wait:
        return 0
    if submission.executor == "local":
        job.wait()
        return _results_status(job)
    return wait_slurm(job)


if __name__ == "__main__":
    sys.exit(main())
