"""The tiers keep themselves honest: a test that starts multi-process work without its marker fails, in
either tier, with the marker it needs; the fixtures that imply a tier tag their tests; `make test-fast`
selects what tests/support/tiers.py calls the fast tier."""

from __future__ import annotations

import re

import pytest

from tests.support import REPO, TORCHRUN, tiers

pytest_plugins = ("pytester",)

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
# spawned torch ranks import torch in each process: ~20 s on 2 loaded cores
MULTIPROCESS = ["two_trainers", pytest.param("torch_ranks", marks=pytest.mark.slow), "torchrun"]
FAST = ["trainers_one_after_another", "a_process_pool"]


def test_torchrun_is_recognised_however_it_is_started() -> None:
    assert tiers.is_torchrun([TORCHRUN, "--nproc_per_node=2", "x.py"])
    assert tiers.is_torchrun(["python3", "-m", "torch.distributed.run", "--standalone", "x.py"])
    assert tiers.is_torchrun("torchrun --standalone -m launch.train")
    assert not tiers.is_torchrun(["python3", "-m", "launch.train", "--run-dir", "torchrun"])
    assert tiers.is_training(["python3", "-m", "launch.train", "--run-dir", "r"])
    assert tiers.is_training(["/venv/bin/python", "-u", "/repo/tests/support/harness.py", "--data", "d"])
    assert not tiers.is_training(["python3", "-m", "preprocess", "shard", "--out", "launch.train"])


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


@pytest.mark.parametrize("body", MULTIPROCESS)
def test_untagged_multiprocess_work_fails_naming_the_marker(suite: pytest.Pytester, body: str) -> None:
    suite.makepyfile(test_case=BODIES[body])
    result = suite.runpytest_subprocess("-q")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*tag it @pytest.mark.multiprocess*"])


@pytest.mark.parametrize("body", MULTIPROCESS)
def test_tagged_multiprocess_work_passes_and_leaves_the_fast_tier(suite: pytest.Pytester, body: str) -> None:
    suite.makepyfile(test_case="import pytest\npytestmark = pytest.mark.multiprocess\n" + BODIES[body])
    suite.runpytest_subprocess("-q").assert_outcomes(passed=1)
    suite.runpytest_subprocess("-q", "-m", tiers.FAST_EXPRESSION).assert_outcomes(deselected=1)


@pytest.mark.parametrize("body", FAST)
def test_one_trainer_at_a_time_or_a_pool_is_fast_tier_work(suite: pytest.Pytester, body: str) -> None:
    suite.makepyfile(test_case=BODIES[body])
    suite.runpytest_subprocess("-q").assert_outcomes(passed=1)


def test_a_fixture_that_implies_a_tier_tags_its_tests(suite: pytest.Pytester) -> None:
    suite.makeconftest(CONFTEST + "import pytest\n@pytest.fixture\ndef slurm_cluster():\n    return None\n")
    suite.makepyfile(test_case="def test_on_slurm(slurm_cluster):\n    pass\ndef test_plain():\n    pass\n")
    result = suite.runpytest_subprocess("-q", "-m", tiers.FAST_EXPRESSION)
    result.assert_outcomes(passed=1, deselected=1)


def test_make_test_fast_selects_the_fast_tier() -> None:
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^test-fast:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "Makefile has no test-fast target"
    assert f'-m "{tiers.FAST_EXPRESSION}"' in recipe.group(1)
