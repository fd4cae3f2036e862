"""One writer per run directory: a lease file, ``RUN_DIR/writer.lease``, taken before anything is written.

The holder is a job, not a process, so that a restart continues the same run: a Slurm job id (a requeued
incarnation is the same holder), a torchrun (its ``--rdzv-id``, else its agent: an elastic restart is the
same holder), a submitit local job, else host + pid. A lease held by another holder is refused with one
line naming it, unless it is stale: its heartbeat is older than the timeout the holder wrote into it, or
its holder is known to be gone (a pid that no longer runs on this host, a Slurm job that has ended).

Only primitives every shared filesystem has (NFS, Lustre, GPFS; no flock): a lease is written under a
unique name and hard-linked into place (``link`` fails if the name exists, and its ``st_nlink`` tells an
NFS retry apart from a loss); replacing one moves it aside under a unique name first (``rename``: of
several racing takers exactly one gets the file) and checks it is the one judged; the heartbeat is an
atomic replace that first checks the lease is still ours. Clocks of different nodes are compared, so
the timeout must be far above their skew (minutes, not seconds).

    python -m pipeline.faults.lease check RUN_DIR     # exit 2 with the holder when another live writer has it
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from basics import procfs
from basics.errors import UserError, run_cli
from basics.files import fsync_dir
from pipeline.run_dir import LEASE, RunDir

LEASE_NAME = LEASE  # the name tests and tools import from here
log = logging.getLogger("alexnet")

# Slurm job states (`squeue -o %T`, `scontrol show job`) of a job that will not run again by itself (a
# SPECIAL_EXIT job is held until someone releases it): its lease is free, and `launch.submit --wait` is done.
ENDED_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "REVOKED",
        "SPECIAL_EXIT",
    }
)


class LeaseHeld(UserError):
    """Another live writer holds the run directory."""


class LeaseLost(UserError):
    """This run's lease was taken over (it was judged stale): stop writing."""


# ------------------------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class Holder:
    """Who writes: ``key`` is equal across restarts of one job and differs between jobs."""

    key: str
    name: str  # for messages: "Slurm job 123", "process 4711 on host"
    stop_hint: str  # how to end it: "scancel 123"
    probe_pid: int | None  # a process whose life is the holder's (None: not a local process)
    slurm_job: str | None
    slurm_cluster: str | None

    @classmethod
    def from_environ(
        cls, env: Mapping[str, str] | None = None, pid: int | None = None, parent_pid: int | None = None
    ) -> "Holder":
        env = os.environ if env is None else env
        host = socket.gethostname()
        pid = os.getpid() if pid is None else pid
        job = env.get("SLURM_JOB_ID")
        if job:
            cluster = env.get("SLURM_CLUSTER_NAME", "")
            return cls(
                f"slurm:{cluster}:{job}",
                f"Slurm job {job}" + (f" on cluster {cluster}" if cluster else ""),
                f"scancel {job}",
                None,
                job,
                cluster or None,
            )
        run_id = env.get("TORCHELASTIC_RUN_ID")
        if run_id is not None:
            # torchrun's workers are children of its agent, which lives through elastic restarts.
            agent = os.getppid() if parent_pid is None else parent_pid
            key = f"torchrun:{host}:{agent}" if run_id in ("", "none") else f"torchrun:{run_id}"
            return cls(
                key,
                f"torchrun (agent pid {agent} on {host}, rdzv id {run_id})",
                f"kill {agent} on {host}",
                agent,
                None,
                None,
            )
        local_job = env.get("SUBMITIT_LOCAL_JOB_ID")
        if local_job:
            controller = int(local_job) if local_job.isdigit() else None
            return cls(
                f"submitit-local:{host}:{local_job}",
                f"submitit local job {local_job} on {host}",
                f"kill {local_job} on {host}",
                controller,
                None,
                None,
            )
        return cls(
            f"process:{host}:{pid}:{_boot_id()}", f"process {pid} on {host}", f"kill {pid} on {host}", pid, None, None
        )


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_ns() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------- the lease


def _record(holder: Holder, token: str, timeout_s: float, started: float, heartbeat: float) -> dict[str, Any]:
    probe = holder.probe_pid
    return {
        "version": 1,
        "token": token,
        "key": holder.key,
        "holder": holder.name,
        "stop_hint": holder.stop_hint,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "boot_id": _boot_id(),
        "pid_ns": _pid_ns(),
        "probe_pid": probe,
        "probe_start": procfs.start_ticks(probe) if probe else None,
        "slurm_job": holder.slurm_job,
        "slurm_cluster": holder.slurm_cluster,
        "timeout_s": timeout_s,
        "started": started,
        "heartbeat": heartbeat,
    }


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


class Lease:
    """This process's hold on RUN_DIR: take it, refresh it (``heartbeat``), give it back (``release``)."""

    def __init__(self, run_dir: Path, holder: Holder, token: str, timeout_s: float, started: float):
        self.path = RunDir(run_dir).lease
        self.holder = holder
        self.token = token
        self.timeout_s = timeout_s
        self.started = started
        self.last_beat = time.time()

    # --------------------------------------------------------------------------------- taking

    @classmethod
    def take(cls, run_dir: str | Path, holder: Holder, timeout_s: float) -> "Lease":
        """The lease on ``run_dir`` (created if missing); LeaseHeld if another live writer has it."""
        if not timeout_s > 0:
            raise UserError(f"the lease timeout must be positive (got {timeout_s / 60:g} minutes)")
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = RunDir(run_dir).lease
        token = uuid.uuid4().hex
        for _ in range(20):  # each round ends in a win, a refusal, or a lost race that changed the file
            now = time.time()
            mine = _record(holder, token, timeout_s, now, now)
            if _link_new(path, mine):
                return cls(run_dir, holder, token, timeout_s, now)
            current = _read(path)
            if current is None:
                continue  # released (or replaced) under us: look again
            if current.get("key") == holder.key:
                how = "takes over from its previous incarnation"
            else:
                why = stale_reason(current)
                if why is None:
                    raise LeaseHeld(held_message(path, current))
                how = f"takes over a stale lease ({why})"
            if _replace(path, current, mine):
                level = logging.INFO if current.get("key") == holder.key else logging.WARNING
                log.log(level, "%s %s on %s from %s", holder.name, how, run_dir, current.get("holder", "?"))
                return cls(run_dir, holder, token, timeout_s, now)
            time.sleep(0.02)  # another taker is mid-takeover: look again once it is done
        raise UserError(
            f"{path}: could not take the writer lease (it kept changing); is another job starting "
            "on this run directory? Try again"
        )

    # --------------------------------------------------------------------------------- holding

    def heartbeat(self, force: bool = False) -> None:
        """Refresh the heartbeat (rate-limited: a fraction of the timeout); LeaseLost if taken over."""
        now = time.time()
        if not force and now - self.last_beat < min(self.timeout_s / 10, 60.0):
            return
        current = _read(self.path)
        if current is None or current.get("token") != self.token:
            by = current.get("holder", "another writer") if current else "nobody (the file is gone)"
            raise LeaseLost(
                f"{self.path}: this run's writer lease is now held by {by} (no heartbeat for "
                f"{_ago(now - self.last_beat)}, judged stale); stopped to avoid two writers in one run "
                "directory; resume later from its latest checkpoint, or use another --run-dir"
            )
        try:
            _write_replace(self.path, _record(self.holder, self.token, self.timeout_s, self.started, now))
            self.last_beat = now
        except OSError as e:  # a passing storage hiccup must not stop training; the next beat retries
            log.warning("could not refresh the writer lease %s: %s", self.path, e)

    def release(self) -> None:
        """Give the run directory back (a clean end). Leaves a lease that is no longer ours alone.

        Never raises OSError: it runs on the way out, where it must not hide the run's own error.
        """
        try:
            current = _read(self.path)
            if current is not None and current.get("token") == self.token:
                _remove(self.path, current)
        except OSError as e:
            log.warning(
                "could not release the writer lease %s (%s); the next run takes it over once it is stale, or delete it",
                self.path,
                e,
            )


def stale_reason(record: Mapping[str, Any], now: float | None = None) -> str | None:
    """Why a lease is free to take (its heartbeat is too old, its holder is gone), or None."""
    now = time.time() if now is None else now
    try:
        age, timeout = now - float(record["heartbeat"]), float(record["timeout_s"])
    except (KeyError, TypeError, ValueError):
        return "unreadable lease"
    if age > timeout:
        return f"no heartbeat for {_ago(age)}, timeout {_ago(timeout)}"
    return _holder_gone(record)


def _holder_gone(record: Mapping[str, Any]) -> str | None:
    """Proof that the holder has ended: its process is gone from this host, or Slurm says its job ended."""
    probe = record.get("probe_pid")
    if (
        probe
        and record.get("host") == socket.gethostname()
        and record.get("boot_id") == _boot_id()
        and record.get("pid_ns") == _pid_ns()
        and _boot_id()
    ):
        if procfs.start_ticks(int(probe)) != record.get("probe_start"):
            return f"process {probe} on {record['host']} has ended"
    job = record.get("slurm_job")
    if job:
        state = _slurm_job_state(str(job), record.get("slurm_cluster"))
        if state is not None and state in ENDED_STATES | {"UNKNOWN_JOB"}:
            return f"Slurm job {job} has ended ({state.lower().replace('_', ' ')})"
    return None


def _slurm_job_state(job: str, cluster: str | None) -> str | None:
    """The job's state as this machine's Slurm sees it ("UNKNOWN_JOB" once forgotten); None: cannot tell."""
    env = os.environ
    here = env.get("SLURM_CLUSTER_NAME") or _slurm_cluster_name()
    if not here or (cluster or "") != here:
        return None  # another cluster's job (or no Slurm here): only the heartbeat can tell
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode == 0:
        states = proc.stdout.split()
        return states[0] if states else "UNKNOWN_JOB"  # squeue no longer lists it
    return "UNKNOWN_JOB" if "Invalid job id" in proc.stderr else None


def _slurm_cluster_name() -> str | None:
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ClusterName":
            return value.strip() or None
    return None


def held_message(path: Path, record: Mapping[str, Any], now: float | None = None) -> str:
    """One line: who writes the run directory and what to do."""
    now = time.time() if now is None else now
    holder = record.get("holder", "another writer")
    try:
        started, beat = _ago(now - float(record["started"])), _ago(now - float(record["heartbeat"]))
        since, timeout = f"started {started} ago, last heartbeat {beat} ago", _ago(float(record["timeout_s"]))
    except (KeyError, TypeError, ValueError):
        since, timeout = "no readable times", "?"
    return (
        f"{path.parent} is being written by {holder} ({since}); wait for it to end, stop it "
        f"({record.get('stop_hint', 'its job')}), or use another --run-dir; a lease without a heartbeat for "
        f"{timeout} is taken over automatically, or delete {path} once that writer is surely gone"
    )


def check(run_dir: str | Path, holder: Holder | None) -> None:
    """LeaseHeld if a writer other than ``holder`` (None: anyone) holds ``run_dir``; nothing is written."""
    path = RunDir(run_dir).lease
    current = _read(path)
    if current is None or (holder is not None and current.get("key") == holder.key):
        return
    if stale_reason(current) is None:
        raise LeaseHeld(held_message(path, current))


def live_writer(run_dir: str | Path) -> dict[str, Any] | None:
    """The lease record of the job that writes ``run_dir`` now (a running, or requeued and pending, job);
    None when no live writer holds it (never started, finished, or its holder is gone or stale)."""
    current = _read(RunDir(run_dir).lease)
    if current is None or stale_reason(current) is not None:
        return None
    return current


# ------------------------------------------------------------------------------------------- file primitives


def _read(path: Path) -> dict[str, Any] | None:
    """The lease record, None if there is none. A lease always appears complete (link or rename)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}  # not ours (hand-written?): stale_reason calls it unreadable


def _tmp_name(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}.{uuid.uuid4().hex}")


def _write_tmp(path: Path, record: Mapping[str, Any]) -> Path:
    tmp = _tmp_name(path, "new")
    try:
        with open(tmp, "x") as f:
            f.write(json.dumps(record, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk leaves no half-written lease behind
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _link_new(path: Path, record: Mapping[str, Any]) -> bool:
    """Create ``path`` with ``record`` if it does not exist (atomically); whether this call created it."""
    tmp = _write_tmp(path, record)
    try:
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            # NFS: a retried LINK whose first reply was lost says EEXIST; the link count tells the truth.
            created = os.stat(tmp).st_nlink == 2
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            created = _create_exclusive(path, record)  # no hard links here: O_EXCL (atomic on NFSv3+)
    finally:
        tmp.unlink(missing_ok=True)
    if created:
        fsync_dir(path.parent)
    return created


def _create_exclusive(path: Path, record: Mapping[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def _write_replace(path: Path, record: Mapping[str, Any]) -> None:
    tmp = _write_tmp(path, record)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _move_aside(path: Path, expected: Mapping[str, Any]) -> Path | None:
    """Move the lease away iff it is still ``expected`` (compare-and-swap by rename); the aside name or None."""
    aside = _tmp_name(path, "old")
    try:
        os.rename(path, aside)  # of several racing movers, exactly one gets this file
    except FileNotFoundError:
        return None
    moved = _read(aside)
    if moved is not None and moved == dict(expected):
        return aside
    # We moved a newer lease than the one judged: put it back unless someone has created one meanwhile.
    try:
        os.link(aside, path)
    except FileExistsError:
        pass
    except OSError:  # no hard links on this filesystem
        if not path.exists():
            os.rename(aside, path)
    aside.unlink(missing_ok=True)
    return None


def _replace(path: Path, judged: Mapping[str, Any], mine: Mapping[str, Any]) -> bool:
    """Swap the lease ``judged`` for ``mine``; False if someone else changed it first.

    Takeovers are serialised by an exclusive-create file: moving a lease aside empties its name for a
    moment, and without it a third taker could create its own lease in that moment beside a winner.
    """
    lock = path.with_name(path.name + ".takeover")
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        try:
            if time.time() - lock.stat().st_mtime > 60:  # a taker died in the middle of its takeover
                lock.unlink(missing_ok=True)
        except OSError:
            pass
        return False
    try:
        if _read(path) != dict(judged):
            return False
        aside = _move_aside(path, judged)
        if aside is None:
            return False
        try:
            return _link_new(path, mine)
        finally:
            aside.unlink(missing_ok=True)
    finally:
        lock.unlink(missing_ok=True)


def _remove(path: Path, judged: Mapping[str, Any]) -> None:
    aside = _move_aside(path, judged)
    if aside is not None:
        aside.unlink(missing_ok=True)
        fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)

    usage = "usage: " + __doc__.strip().splitlines()[-1].strip()

    def body() -> int:
        if "-h" in args or "--help" in args:
            print(usage)
            return 0
        if len(args) != 2 or args[0] != "check":
            print(usage, file=sys.stderr)
            return 2
        check(args[1], Holder.from_environ())
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
