"""What tests/unit/test_lease.py and tests/integration/test_lease.py share."""

from __future__ import annotations

from pathlib import Path

from pipeline.faults.lease import Holder, Lease

MINUTE = 60.0


def remote(key: str, name: str = "Slurm job 7 on cluster far", hint: str = "scancel 7") -> Holder:
    """A holder this machine cannot probe (another cluster's job): only its heartbeat tells."""
    return Holder(key, name, hint, probe_pid=None, slurm_job=None, slurm_cluster=None)


def _foreign_lease(run_dir: Path) -> None:
    Lease.take(run_dir, remote("slurm:far:7"), timeout_s=30 * MINUTE)
