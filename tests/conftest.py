"""Shared fixtures: the demo dataset through the real preprocessing, and a real single-host Slurm cluster
(both session-scoped), and the tiers (markers and their check: tests/support/tiers.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from preprocess import format as fmt
from tests.support import DEMO_CLASSES
from tests.support.datasets import build_demo, make_image_folder
from tests.support.netns import NodePair, netns_skip_reason
from tests.support.slurm import SlurmCluster, SlurmUnavailable, slurm_skip_reason
from tests.support.trained_run import train

# Not the default state dir and ports of slurm/local_cluster.sh, so a developer's own local cluster
# (/tmp/alexnet-slurm, port 6917) is left alone by the test session's bring-up and tear-down.
TEST_STATE_DIR = Path(os.environ.get("ALEXNET_TEST_SLURM_STATE_DIR", "/tmp/alexnet-slurm-pytest"))
TEST_PORT_BASE = int(os.environ.get("ALEXNET_TEST_SLURM_PORT_BASE", "6947"))


# tiers: the markers and their check; pytester: tests of that plugin; the others: fixtures that a unit and an
# integration module of the same topic share.
pytest_plugins = (
    "tests.support.tiers",
    "pytester",
    "tests.support.data_scale",
    "tests.support.documented_commands",
    "tests.support.tiers_cases",
)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Two slurmd nodes (n1, n2) on this host, partition `debug`; up once per session, down at its end.

    Skips (with the reason) where Slurm cannot run: not root, or slurm-wlm not installable.
    """
    yield from _session_cluster(SlurmCluster(state_dir=TEST_STATE_DIR, nodes=2, port_base=TEST_PORT_BASE))


@pytest.fixture(scope="session")
def slurm_cluster_4nodes() -> Iterator[SlurmCluster]:
    """Four slurmd nodes (n1-n4) for node-range jobs (`sbatch -N 3-4`): a cluster of its own (state dir, munged,
    ports; the two-node one uses TEST_PORT_BASE to +2), so both can be up in one session."""
    state_dir = TEST_STATE_DIR.with_name(TEST_STATE_DIR.name + "-4nodes")
    yield from _session_cluster(SlurmCluster(state_dir=state_dir, nodes=4, port_base=TEST_PORT_BASE + 10))


def _session_cluster(cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    reason = slurm_skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        # fresh: a cluster left behind by a killed session (with its jobs) is torn down first.
        cluster.start(fresh=True)
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT with ROOT/src (demo source tree, 4 classes) and ROOT/shards (train + val); read-only: a test that
    damages data copies it first."""
    return build_demo(tmp_path_factory.mktemp("demo-shared"))


@pytest.fixture(scope="session")
def demo_shards(demo_data: Path) -> Path:
    """The preprocessed demo dataset directory (manifest.json, train/, val/); read-only."""
    return demo_data / "shards"


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A small ImageFolder source tree (3 classes x 7 images, one undecodable file) under tmp_path/train."""
    return make_image_folder(tmp_path / "train")


@pytest.fixture(scope="session")
def trained_run(demo_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN_DIR of a tiny tp=2 run on the demo data (checkpoints at steps 6 and 12, best = 12); read-only."""
    return train(demo_shards, tmp_path_factory.mktemp("trained") / "run")


@pytest.fixture(scope="session")
def classes_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset directory with a manifest of the demo's class count and no shards: runs on the harness's fixed
    synthetic batches (``HARNESS_DATA=fixed``) need only the classes."""
    root = tmp_path_factory.mktemp("fixed")
    classes = [{"index": i, "wnid": f"n{i:08d}", "name": ""} for i in range(DEMO_CLASSES)]
    fmt.write_manifest(root, fmt.Manifest(classes=classes))
    return root


@pytest.fixture(scope="module")
def node_pair(request: pytest.FixtureRequest) -> Iterator[NodePair]:
    """Two emulated nodes (tests/support/netns.py) for one test module; skips where namespaces cannot be made.
    Named by a letter of the module's own (``NETNS_TAG``) and this process's pid, so modules (and parallel
    sessions) never share, and a later session removes them if this one dies."""
    reason = netns_skip_reason()
    if reason:
        pytest.skip(reason)
    with NodePair(tag=f"{getattr(request.module, 'NETNS_TAG', '')}{os.getpid()}") as pair:
        yield pair
