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
# Torchrun started every other way a test may start it (the stand-in ./torchrun, a stand-in
# torch.distributed.run package and slurm/train.sh in the test's directory): one inner run judges them all.
WAYS = {
    "bash_c": 'import subprocess\ndef test_it():\n    subprocess.run(["bash", "-c", "true; ./torchrun"], check=True)\n',
    "os_system": 'import os\ndef test_it():\n    assert os.system("./torchrun --standalone") == 0\n',
    "env": 'import subprocess\ndef test_it():\n    subprocess.run(["env", "A=1", "B=2", "./torchrun"], check=True)\n',
    "python_u_m": """
import subprocess, sys
def test_it():
    subprocess.run([sys.executable, "-u", "-m", "torch.distributed.run", "--standalone"], check=True)
""",
    "bash_slurm_train": """
import subprocess
def test_it():
    subprocess.run(["bash", "slurm/train.sh", "--data", "d"], check=True)
""",
    "a_fixture": """
import subprocess, pytest
@pytest.fixture
def job():
    subprocess.run(["./torchrun", "--standalone"], check=True)
def test_it(job):
    pass
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
    # Through a shell, env, a Python with options, a wrapper, the project's script; not an argument or code.
    assert tiers.is_torchrun(["bash", "-c", f"cd /tmp && {TORCHRUN} --standalone x.py"])
    assert tiers.is_torchrun(["sh", "-ec", "echo start\ntorchrun --standalone x.py"])
    assert tiers.is_torchrun("A=1 B=2 torchrun x.py > torchrun.log 2>&1")
    assert tiers.is_torchrun(["env", "-u", "RANK", "OMP_NUM_THREADS=1", TORCHRUN, "x.py"])
    assert tiers.is_torchrun(["/venv/bin/python3.11", "-u", "-X", "dev", "-m", "torch.distributed.run", "x.py"])
    assert tiers.is_torchrun(["timeout", "-s", "KILL", "60", "torchrun", "x.py"])
    assert tiers.is_torchrun(["bash", "slurm/train.sh", "--data", "d"]) and tiers.is_torchrun(["./slurm/train.sh"])
    assert not tiers.is_torchrun(["bash", "slurm/train.sh"], {"PYTHON": "/tmp/bin/python-stand-in"})
    assert tiers.is_torchrun(["bash", "slurm/train.sh"], {"PYTHON": "/venv/bin/python3.11"})
    assert not tiers.is_torchrun(["python3", "-c", "import torchrun"])
    assert not tiers.is_torchrun(["bash", "-c", "echo torchrun"])
    assert tiers.is_training(["bash", "-c", "exec python -u -m launch.train --run-dir r"])


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


def test_torchrun_started_any_other_way_fails_naming_the_marker(suite: pytest.Pytester) -> None:
    package = suite.path / "torch" / "distributed"  # `python -m torch.distributed.run` from here finds this
    package.mkdir(parents=True)
    for stub in (suite.path / "torch" / "__init__.py", package / "__init__.py", package / "run.py"):
        stub.write_text("")
    (suite.path / "slurm").mkdir()
    (suite.path / "slurm" / "train.sh").write_text("exit 0\n")
    suite.makepyfile(**{f"test_{way}": body for way, body in WAYS.items()})
    result = suite.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=len(WAYS))
    result.stdout.fnmatch_lines_random([f"*test_{way}.py::test_it: it starts torchrun; tag it*" for way in WAYS])


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
