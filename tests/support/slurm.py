"""A real single-host Slurm cluster for tests (no pytest here; the fixture is in conftest.py).

    cluster = SlurmCluster(state_dir=Path("/tmp/alexnet-slurm-pytest")).start()
    job = cluster.sbatch(["--array=0-2", "slurm/preprocess.sh", "--src", ...], env={"PYTHON": ...})
    records = cluster.wait(job, timeout=120)          # every task of an array, in a terminal state
    assert {r["JobState"] for r in records} == {"COMPLETED"}
    cluster.stop()

`SlurmCluster.start` runs `slurm/local_cluster.sh up` (which installs slurm-wlm + munge with apt when
they are missing, as root) and raises `SlurmUnavailable` when Slurm cannot be had on this machine:
tests skip on that, and fail on any other error. Client commands get SLURM_CONF of this cluster only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from launch.submit import parse_job_records  # the launcher's own reading of Slurm
from pipeline.faults.lease import ENDED_STATES
from tests.support import REPO

SCRIPT = REPO / "slurm" / "local_cluster.sh"

UNAVAILABLE_EXIT = 3  # slurm/local_cluster.sh: Slurm is not installed and cannot be installed here


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run on this machine (not root, no apt, install failed): a reason to skip."""


class SlurmError(RuntimeError):
    """A Slurm command failed, a job did not reach the wanted state, or the cluster did not start."""


def slurm_skip_reason() -> str | None:
    """Why a local Slurm cluster cannot run here, as far as can be told without trying; else None."""
    if not sys.platform.startswith("linux"):
        return f"a local Slurm cluster needs Linux (this is {sys.platform})"
    if os.environ.get("ALEXNET_SKIP_SLURM"):
        return "ALEXNET_SKIP_SLURM is set"
    if not shutil.which("bash"):
        return "no bash"
    if os.geteuid() != 0:
        return "a local Slurm cluster runs its daemons as root (SlurmUser=root); run the tests as root"
    installed = all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not installed and not shutil.which("apt-get"):
        return "Slurm (slurm-wlm, munge) is not installed and there is no apt-get to install it"
    return None


@dataclass
class SlurmCluster:
    """A cluster brought up by slurm/local_cluster.sh under `state_dir` (its own ports: `port_base`)."""

    state_dir: Path = Path("/tmp/alexnet-slurm")
    nodes: int = 2
    gpus: int = 0
    port_base: int | None = None
    up_timeout: int = 30
    conf: Path | None = field(default=None, init=False)

    # --- lifecycle -------------------------------------------------------------------------------

    def _script_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_STATE_DIR"] = str(self.state_dir)
        env["SLURM_UP_TIMEOUT"] = str(self.up_timeout)
        if self.port_base is not None:
            env["SLURM_PORT_BASE"] = str(self.port_base)
        return env

    def _script(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            env=self._script_env(),
            text=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )

    def start(self, fresh: bool = False) -> "SlurmCluster":
        """Bring the cluster up (idempotent; `fresh`: tear down whatever runs under state_dir first)."""
        reason = slurm_skip_reason()
        if reason:
            raise SlurmUnavailable(reason)
        if fresh:
            self.stop()
        # Installing slurm-wlm takes ~30 s on a fresh machine; bring-up itself about a second.
        proc = self._script("up", "--nodes", str(self.nodes), "--gpus", str(self.gpus), timeout=600 + self.up_timeout)
        if proc.returncode == UNAVAILABLE_EXIT:
            raise SlurmUnavailable(
                proc.stderr.strip().splitlines()[-1]
                if proc.stderr.strip()
                else "slurm/local_cluster.sh could not install Slurm"
            )
        if proc.returncode != 0:
            raise SlurmError(
                f"slurm/local_cluster.sh up failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        match = re.search(r"^export SLURM_CONF=(\S+)$", proc.stdout, re.M)
        if not match:
            raise SlurmError(f"slurm/local_cluster.sh up printed no SLURM_CONF:\n{proc.stdout}")
        self.conf = Path(match.group(1))
        return self

    def stop(self) -> None:
        """Cancel every job, stop every daemon, kill leftover job processes (bounded: ~1 min)."""
        proc = self._script("down", timeout=120)
        if proc.returncode != 0:
            raise SlurmError(f"slurm/local_cluster.sh down failed (exit {proc.returncode}):\n{proc.stderr}")
        self.conf = None

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- clients ---------------------------------------------------------------------------------

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """This process's environment for a client of this cluster (and for jobs it submits)."""
        if self.conf is None:
            raise SlurmError("the cluster is not started")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    def run(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | str = REPO,
        timeout: float = 30,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """A Slurm client command (sbatch, squeue, scontrol, srun, ...) against this cluster."""
        proc = subprocess.run(
            list(args),
            env=self.env(env),
            cwd=cwd,
            text=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, args: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | str = REPO) -> str:
        """Submit (`sbatch --parsable ARGS`) from `cwd` (the job's SLURM_SUBMIT_DIR); the job id."""
        out = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip()
        job_id = out.split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"sbatch printed no job id: {out!r}")
        return job_id

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job -o JOB`: one record per job, or per task of an array job."""
        return parse_job_records(self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout)

    def job_state(self, job_id: str) -> str:
        """The job's state (an array job: its tasks' states, comma-joined when they differ)."""
        states = sorted({r["JobState"] for r in self.jobs(job_id)})
        return ",".join(states)

    def wait(
        self, job_id: str, states: Iterable[str] = ENDED_STATES, timeout: float = 120, poll: float = 0.5
    ) -> list[dict[str, str]]:
        """Poll until every record of the job is in one of `states`; the records.

        An array job counts once all of its tasks exist as records and are done (a pending array
        shows as one record `ArrayTaskId=0-2`; it is split up as tasks start).
        """
        wanted = frozenset(states)
        deadline = time.monotonic() + timeout
        records: list[dict[str, str]] = []
        while True:
            records = self.jobs(job_id)
            pending_range = any(not r.get("ArrayTaskId", "0").isdigit() for r in records if "ArrayTaskId" in r)
            if records and not pending_range and all(r["JobState"] in wanted for r in records):
                return records
            if time.monotonic() > deadline:
                summary = ", ".join(f"{_task_name(r)}={r.get('JobState')} ({r.get('Reason')})" for r in records)
                raise SlurmError(
                    f"job {job_id} not in {sorted(wanted)} after {timeout:.0f} s: {summary}\n{self.diagnostics()}"
                )
            time.sleep(poll)

    def scancel(self, job_id: str, *args: str) -> None:
        """`scancel ARGS JOB` (e.g. "--signal=USR1", "-b")."""
        self.run(["scancel", *args, str(job_id)])

    def squeue(self) -> list[str]:
        """Job ids in the queue (pending, running, completing)."""
        return self.run(["squeue", "-h", "-o", "%i"]).stdout.split()

    def sinfo(self) -> dict[str, str]:
        """node name -> state."""
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of each daemon log (for failure messages)."""
        parts = []
        for log in sorted((self.state_dir / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"----- {log}\n" + "\n".join(text))
        return "\n".join(parts)

    def diagnostics(self) -> str:
        """squeue, sinfo and the daemon logs' tails, best effort."""
        parts = []
        for args in (["squeue"], ["sinfo", "-N", "-l"]):
            try:
                proc = self.run(args, check=False, timeout=10)
                parts.append(f"$ {' '.join(args)}\n{proc.stdout}{proc.stderr}")
            except (subprocess.TimeoutExpired, SlurmError) as e:
                parts.append(f"$ {' '.join(args)}: {e}")
        parts.append(self.log_tails())
        return "\n".join(parts)


def _task_name(record: Mapping[str, str]) -> str:
    if "ArrayTaskId" in record:
        return f"{record.get('ArrayJobId')}_{record['ArrayTaskId']}"
    return record.get("JobId", "?")
