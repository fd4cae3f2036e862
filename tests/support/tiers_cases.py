"""What tests/unit/test_tiers.py and tests/integration/test_tiers.py share."""

from __future__ import annotations

import pytest

from tests.support import REPO

CONFTEST = 'pytest_plugins = ("tests.support.tiers",)\n'


BODIES = {
    "two_trainers": """
import subprocess, sys
def test_it():
    procs = [subprocess.Popen([sys.executable, "harness.py"]) for _ in range(2)]
    for p in procs:
        p.wait()
""",
    "trainers_one_after_another": """
import subprocess, sys
def test_it():
    for _ in range(2):
        subprocess.run([sys.executable, "harness.py"], check=True)
""",
    "a_process_pool": """
import multiprocessing as mp
def test_it():
    with mp.get_context("spawn").Pool(2) as pool:
        assert pool.map(abs, [-1, -2]) == [1, 2]
""",
    "torch_ranks": """
import torch.multiprocessing as mp
def rank(i):
    pass
def test_it():
    mp.start_processes(rank, nprocs=2, start_method="spawn")
""",
    "torchrun": """
import subprocess
def test_it():
    subprocess.run(["./torchrun", "--standalone"], check=True)
""",
}


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A test directory with the tiers plugin, a stand-in training entry point (the harness's name: what the
    watch goes by) and a stand-in torchrun, both of which train nothing and exit at once."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(harness="import time\ntime.sleep(0.5)\n")
    torchrun = pytester.path / "torchrun"
    torchrun.write_text("#!/bin/sh\nexit 0\n")
    torchrun.chmod(0o755)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the inner pytest imports the plugin from this checkout
    return pytester
