"""Shared fixtures: a real single-host Slurm cluster (session-scoped) and the `slurm` marker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import SlurmCluster, SlurmUnavailable, slurm_skip_reason

# Not the default state dir and ports of slurm/local_cluster.sh, so a developer's own local cluster
# (/tmp/alexnet-slurm, port 6917) is left alone by the test session's bring-up and tear-down.
TEST_STATE_DIR = Path(os.environ.get("ALEXNET_TEST_SLURM_STATE_DIR", "/tmp/alexnet-slurm-pytest"))
TEST_PORT_BASE = int(os.environ.get("ALEXNET_TEST_SLURM_PORT_BASE", "6947"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slurm: runs jobs on a real local Slurm cluster (root; installs slurm-wlm with apt when missing)",
    )
    config.addinivalue_line(
        "markers", "netns: emulated nodes in Linux network namespaces (root: CAP_NET_ADMIN, CAP_SYS_ADMIN)",
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Two slurmd nodes (n1, n2) on this host, partition `debug`; up once per session, down at its end.

    Skips (with the reason) where Slurm cannot run: not root, or slurm-wlm not installable.
    """
    reason = slurm_skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(state_dir=TEST_STATE_DIR, nodes=2, port_base=TEST_PORT_BASE)
    try:
        # fresh: a cluster left behind by a killed session (with its jobs) is torn down first.
        cluster.start(fresh=True)
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()
