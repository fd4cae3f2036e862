"""Training entry point for torchrun, srun and plain python.

    python -m launch.train --data SHARDS --run-dir RUN --tp 1          # one process
    torchrun --nproc_per_node=2 -m launch.train --data SHARDS --run-dir RUN      # the paper's 2-GPU split

With torchrun's elastic restarts (--max-restarts), workers that share torchrun's rendezvous store
(the default) read the previous group's addresses from it after a restart and fail to connect
(gloo "connectFullMesh failed ... Connection refused"; PyTorch issues #135712, #167288): torch's
env:// set-up adds no per-attempt key prefix on that store. ``pipeline.process`` adds one, so
restarts work either way; slurm/train.sh also sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh
store per worker group).
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        -m launch.train --data SHARDS --run-dir RUN                    # 16 replicas x 2 towers

It takes the process's place (RANK, WORLD_SIZE, LOCAL_RANK, set by torchrun or by ``launch.submit``
under srun) and its process group (NCCL on GPUs, gloo on CPU) from ``pipeline.process``, builds the
(dp x tp) mesh, turns SIGUSR1/SIGTERM into a stop request that the trainer
acts on at the next step boundary (checkpoint, then exit 0 so the Slurm script can requeue), and
resumes from the run directory's latest checkpoint automatically (also after an elastic restart).
Before anything is written, global rank 0 takes the run directory's writer lease (pipeline.faults.lease):
a second job on the same --run-dir fails at once, on every rank, with one line naming the holder.
Then every rank starts its progress watchdog (pipeline.faults.watchdog): a hang is named in one line, the
live ranks' stacks go to RUN_DIR/hangs/, and they exit with code 75 for torchrun to restart them.
When the hang is a node the others cannot reach, torchrun is ended instead (``end_torchrun``).
A rank that dies of an exception records it in RUN_DIR/crashes.jsonl (pipeline.faults.crashes); when the
job's last two attempts died of the same error at the same step, the next one ends before training with one
``error:`` line and exit code 3, and ends torchrun too, so no restart or requeue repeats it a third time.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from basics.errors import UserError, run_cli
from pipeline.faults import crashes
from pipeline.process import ProcessEnv, process_group, select_device

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.faults.lease import Lease
    from pipeline.faults.watchdog import Watchdog
    from pipeline.goodput import Recorder
    from pipeline.phases import PhaseMarks

SAME_INTERRUPT_S = 1.0


def setup_logging(rank: int) -> None:
    """Rank 0 logs progress; other ranks only warnings and errors (no print-patching)."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def install_stop_handlers(
    stop: threading.Event, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
) -> None:
    """A signal only sets a flag: every rank checkpoints together at the next control step, then exits 0.

    A second SIGTERM or SIGINT means "now": the rank dies of the signal at once, without a traceback; the
    checkpoint the first one asked for is kept if it finished, and a half-written one is never visible.
    Under torchrun, Ctrl-C reaches a rank twice within milliseconds (the terminal's SIGINT to the process
    group, then torchrun's forwarded copy): a repeat within ``SAME_INTERRUPT_S`` counts as the same one.
    """
    first_at: dict[int, float] = {}
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ

    def handler(signum: int, frame: object) -> None:
        now = time.monotonic()
        echo = under_torchrun and signum in first_at and now - first_at[signum] < SAME_INTERRUPT_S
        if stop.is_set() and signum in (signal.SIGTERM, signal.SIGINT) and not echo:
            # A rank stuck in a collective must not outlive its launcher or an impatient operator.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        first_at.setdefault(signum, now)
        if not stop.is_set():
            logging.getLogger("alexnet").warning(
                "received %s: checkpointing at the next step boundary (again to stop at once)",
                signal.Signals(signum).name,
            )
        stop.set()

    for sig in signals:
        signal.signal(sig, handler)


def run(
    argv: list[str] | None = None,
    stop: threading.Event | None = None,
    env: ProcessEnv | None = None,
    loaders: Any = None,
):
    """Parse, check, set up, train; returns the trainer's Outcome. Shared by the CLI and launch.submit.

    Every option and path is checked before anything is written to the run directory.
    """
    from pipeline import config
    from pipeline.goodput import end_reason
    from pipeline.mesh import ParallelDims, build_mesh
    from pipeline.perf import oom_snapshot
    from pipeline.phases import PhaseMarks
    from pipeline.train import Loaders, build_trainer, write_run_config
    from preprocess.format import read_manifest

    entry = time.time()  # the goodput ledger's end of "imports" (from the process's start)
    env = env or ProcessEnv.from_environ()
    setup_logging(env.rank)
    cfg, args = config.parse(argv)
    config.check_paths(cfg)
    config.resolve_num_classes(cfg, len(read_manifest(cfg.data.data).classes))
    dims = ParallelDims(env.world_size, env.rank, cfg.train.tp)
    device = select_device(cfg.train.device, env.local_rank)
    if stop is None:
        stop = threading.Event()
        install_stop_handlers(stop)
    refuse_repeated_crash(cfg.run_dir, env.rank)
    lease, outcome, watchdog, ledger, error, trainer = None, None, None, None, None, None
    with process_group(env, device, timedelta(minutes=cfg.faults.hang.collective_timeout_min)):
        try:
            lease = take_lease(cfg.run_dir, cfg.faults.lease.minutes, env.rank)  # before anything is written
            if env.rank == 0:
                crashes.record_start(cfg.run_dir)
            marks = PhaseMarks()
            ledger = start_goodput(cfg, env, marks, entry)
            watchdog = start_watchdog(cfg, env, marks)
            mesh = build_mesh(dims, device.type)
            if dims.is_main:
                write_run_config(cfg)
                logging.getLogger("alexnet").info("%s on %s; run dir %s", dims.describe(), device, cfg.run_dir)
            heartbeat = lease.heartbeat if lease else None
            # A CUDA out-of-memory error leaves a memory snapshot in RUN_DIR/memory and one line naming it.
            with oom_snapshot(cfg.run_dir, env.rank, device, cfg.profile.memory_history):
                trainer = build_trainer(cfg, mesh, device, stop, loaders or Loaders(), heartbeat=heartbeat, marks=marks)
                if ledger is not None:
                    ledger.attach(trainer)
                outcome = trainer.fit(resume=args.resume)
            return outcome
        except BaseException as e:
            error = e
            if isinstance(e, Exception) and not isinstance(e, UserError):
                # a one-line error says what to fix; a restart does not repeat it
                step = trainer.progress.step if trainer is not None else None
                crashes.record_crash(cfg.run_dir, e, step=step, rank=env.rank)
            raise
        finally:
            if ledger is not None:
                ledger.end(end_reason(outcome, error))
            if watchdog is not None:
                watchdog.close()
            # A run stopped for preemption keeps its lease: the requeued job (the same holder) takes it over.
            if lease is not None and not (outcome is not None and outcome.preempted):
                lease.release()


def start_goodput(cfg: RunConfig, env: ProcessEnv, marks: PhaseMarks, entry: float) -> Recorder | None:
    """Global rank 0's record of this attempt in RUN_DIR/goodput/ledger.jsonl (pipeline.goodput); under
    --model.compile, torch.compile's caches go to RUN_DIR/compile-cache so a restart does not compile again."""
    from pipeline.goodput import Recorder
    from pipeline.run_dir import RunDir

    if cfg.model.compile:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        # Not setdefault: importing torch with TORCH_LOGS naming an inductor module already sets the variable to
        # inductor's default (/tmp/torchinductor_USER); only a directory the user chose is kept.
        given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if given is None or os.path.abspath(given) == os.path.abspath(default_cache_dir()):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(RunDir(cfg.run_dir).compile_cache)
    if env.rank != 0:
        return None
    return Recorder(cfg.run_dir, marks, entry=entry, marks_at=time.time())


def start_watchdog(cfg: RunConfig, env: ProcessEnv, marks: PhaseMarks) -> Watchdog | None:
    """The progress watchdog's thread on this rank (pipeline.faults.watchdog), or None with --faults.hang.timeout 0.

    Rank 0 names the attempt, so records a killed attempt left in RUN_DIR/progress are never mistaken
    for this one's.
    """
    from pipeline.faults.watchdog import Watchdog
    from pipeline.phases import Allowance

    if not cfg.faults.hang.timeout:
        return None
    box = [f"{os.getpid()}-{time.time_ns()}"]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    allowance = Allowance(cfg.faults.hang.timeout, cfg.faults.hang.slow_phase_timeout)
    return Watchdog(cfg.run_dir, env.rank, env.world_size, box[0], marks, allowance, on_cut=end_torchrun).start()


def refuse_repeated_crash(run_dir: str, rank: int) -> None:
    """Before this attempt trains: when the job's last two attempts crashed alike, every rank ends its node's
    torchrun (a restart would crash a third time), rank 0 prints the one line, and the rank exits 3."""
    found = crashes.repeated(run_dir, this=crashes.attempt_id())
    if found is None:
        return
    agent = torchrun_agent()
    if agent is not None:
        os.kill(agent, signal.SIGKILL)  # before exiting: torchrun must not see a failed worker and restart it
    if rank == 0:
        print(f"error: {found.line()}", file=sys.stderr, flush=True)
    sys.exit(crashes.EXIT_REPEATED)


def torchrun_agent() -> int | None:
    """The pid of the torchrun agent that started this process, or None (plain python, srun tasks)."""
    from pathlib import Path

    parent = os.getppid()
    try:
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if "TORCHELASTIC_RUN_ID" not in os.environ or not any(
        a.endswith((b"torchrun", b"torch.distributed.run")) for a in argv[:3]
    ):
        return None
    return parent


def end_torchrun(reason: str) -> None:
    """Ends this node's torchrun agent (SIGKILL) when a node of the job cannot be reached.

    Its restart would re-rendezvous with every node, the one it cannot reach included: the node hosting the
    rendezvous waits the join timeout (600 s by default), the others fail only when their store connection
    does (measured 12-18 minutes, issue 28), and under Slurm the requeue waits for the last of them. SIGKILL,
    not SIGTERM: an agent cut off from the rendezvous store sits in a store call for its read timeout (60 s
    each, retried) before Python sees a signal (seen: SIGTERM unanswered for over 90 s). The agent's workers
    live in sessions of their own and exit by themselves (their watchdogs act on the same verdict); under
    srun the task's bad exit ends the job step. Outside torchrun (plain python, srun tasks) nothing is done.
    """
    from pipeline.faults.reach import node_name

    parent = torchrun_agent()
    if parent is None:
        return
    logging.getLogger("alexnet").error(
        "%s: ending torchrun (pid %d) on this node instead of restarting: %s, so a new rendezvous would wait for it",
        node_name(),
        parent,
        reason,
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(parent, signal.SIGKILL)


def take_lease(run_dir: str, minutes: float, rank: int) -> Lease | None:
    """Global rank 0 takes RUN_DIR's writer lease (pipeline.faults.lease); every rank learns the outcome and a
    refusal fails all of them with the same one-line error. The lease on rank 0, else None."""
    from pipeline.faults.lease import Holder, Lease

    lease, error = None, None
    if rank == 0:
        try:
            lease = Lease.take(run_dir, Holder.from_environ(), timeout_s=minutes * 60)
        except UserError as e:
            error = str(e)
        except OSError as e:
            error = (
                f"--run-dir {run_dir}: cannot take the writer lease ({e.strerror or e}); "
                "check the path and its permissions"
            )
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UserError(error)
    return lease


def name_leftover_threads() -> None:
    """Everything a run starts ends with it (pipeline.data.Ahead, the watchdog, the checkpoint writer): a daemon
    thread still in native code at the interpreter's exit is ended by pthread_exit, which aborts a finished
    rank (SIGABRT, "terminate called without an active exception"). One that is left is named, to be fixed."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and thread.daemon and thread.is_alive():
            logging.getLogger("alexnet").warning(
                "thread %r still running at exit: it may abort the process", thread.name
            )


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        run(argv)  # a stop by signal is a clean exit: the trainer logged where and how to continue
        name_leftover_threads()
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
