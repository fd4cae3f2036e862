"""A crash that repeats: the same error at the same step in two attempts in a row ends the job instead of
using up torchrun's restarts and Slurm's requeues (restarting cannot fix a bug; NVIDIA's resiliency
extension stops on such errors too).

Each attempt (a start of ``launch.train`` under one job: torchrun's restart count and Slurm's requeue count
tell attempts apart) appends one ``start`` record to ``RUN_DIR/crashes.jsonl``; each rank that dies of an
exception appends one ``crash`` record: the step it was at, the error's first line and a signature of the
exception's type, its message with the numbers taken out (addresses, ports and pids differ between attempts)
and the functions on its traceback. Before the next attempt trains, :func:`repeated` compares the job's last
two attempts: a (step, signature) pair they share is a crash that will happen again, and the attempt ends at
once with one ``error:`` line and exit code :data:`EXIT_REPEATED` (3), which slurm/train.sh does not requeue.

Errors of ``torch.distributed`` (a peer's broken connection, a store time-out) are recorded but never count:
they are what the other ranks see of one rank's death, which a SIGKILL or a lost node causes as well.
A new job (another ``SLURM_JOB_ID``, another torchrun run id) starts afresh: a user who fixed the bug reruns.

    python -m pipeline.faults.crashes check RUN_DIR    # exit 3 (and the line) when the job's crash repeated
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from basics.files import append_json_line, read_json_lines
from pipeline.run_dir import RunDir

EXIT_REPEATED = 3  # distinct from an exception (1), a one-line error (2) and a hang (75): not restarted
TRACEBACK_FRAMES = 12  # the innermost frames that make the signature (the outer ones are the same for every crash)
_NUMBER = re.compile(r"0x[0-9a-fA-F]+|\d+")


def job_id() -> str:
    """The job this attempt belongs to: Slurm's job id, else torchrun's run id; a plain process is its own job."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or f"pid-{os.getpid()}"


def attempt_id() -> str:
    """This attempt of the job, the same on every rank of it: the job, Slurm's requeues, torchrun's restarts."""
    requeues = os.environ.get("SLURM_RESTART_COUNT", "0")
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"{job_id()}/{requeues}/{restarts}"


def signature(error: BaseException) -> str:
    """What makes two crashes the same: the type, the message without its numbers, the traceback's functions."""
    message = _NUMBER.sub("N", str(error))
    frames = traceback.extract_tb(error.__traceback__)[-TRACEBACK_FRAMES:]
    where = [f"{Path(f.filename).name}:{f.name}" for f in frames]
    text = "\n".join([type(error).__qualname__, message, *where])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def counts(error: BaseException) -> bool:
    """Whether a crash may repeat for its own reasons: not a collective's failure caused by another rank."""
    import torch.distributed as dist

    return not isinstance(error, dist.DistError)


def record_start(run_dir: str | Path, attempt: str | None = None) -> None:
    """Rank 0, after the check let the attempt train."""
    append_json_line(RunDir(run_dir).crashes, {"start": attempt or attempt_id(), "time": time.time()})


def record_crash(run_dir: str | Path, error: BaseException, *, step: int | None, rank: int) -> None:
    """Each rank that dies of ``error`` at ``step`` (steps done; None: before training)."""
    append_json_line(
        RunDir(run_dir).crashes,
        {
            "crash": attempt_id(),
            "rank": rank,
            "step": step,
            "error": describe(error),
            "signature": signature(error),
            "counts": counts(error),
            "time": time.time(),
        },
    )


@dataclass(frozen=True)
class Repeat:
    step: int | None
    error: str

    def line(self) -> str:
        where = f"at step {self.step}" if self.step is not None else "before training"
        return (
            f"the same crash twice {where} ({self.error}): not restarting (exit {EXIT_REPEATED}); "
            "fix the cause, then run the command again (a new job starts afresh)"
        )


def repeated(run_dir: str | Path, *, this: str | None = None) -> Repeat | None:
    """The crash the job's last two attempts (other than ``this`` one) both died of (same step, same
    signature), or None."""
    job = job_id()
    records = read_json_lines(RunDir(run_dir).crashes)
    started = [r["start"] for r in records if isinstance(r, dict) and "start" in r]
    attempts = [a for a in dict.fromkeys(started) if str(a).split("/")[0] == job and a != this][-2:]
    if len(attempts) < 2:
        return None
    crashes: list[list[dict[str, Any]]] = [[], []]
    for r in records:
        if isinstance(r, dict) and r.get("counts") and r.get("crash") in attempts:
            crashes[attempts.index(r["crash"])].append(r)
    earlier = {(r["step"], r["signature"]) for r in crashes[0]}
    same = [r for r in crashes[1] if (r["step"], r["signature"]) in earlier]
    return Repeat(same[0]["step"], same[0]["error"]) if same else None


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline.faults.crashes", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help=f"exit {EXIT_REPEATED} with one line when this job's crash repeated")
    check.add_argument("run_dir", metavar="RUN_DIR")
    args = p.parse_args(argv)
    found = repeated(args.run_dir)
    if found is None:
        return 0
    print(f"error: {found.line()}", file=sys.stderr)
    return EXIT_REPEATED


if __name__ == "__main__":
    sys.exit(main())
