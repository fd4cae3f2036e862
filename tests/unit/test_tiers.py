"""The tiers keep themselves honest: a test that starts multi-process work without its marker fails, in
either tier, with the marker it needs; the fixtures that imply a tier tag their tests; `make test-fast`
selects what tests/support/tiers.py calls the fast tier."""

from __future__ import annotations

import re

import pytest

from tests.support import REPO, TORCHRUN, tiers
from tests.support.tiers_cases import BODIES, CONFTEST

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


def test_a_heavy_test_in_tests_unit_fails_saying_where_it_belongs(suite: pytest.Pytester) -> None:
    """Where a test lives says what it is: a `slow` (or any heavy-tier) test under tests/unit/ fails, naming
    tests/integration/; the same test under tests/integration/, or an untagged one under tests/unit/, passes."""
    body = "import pytest\n@pytest.mark.slow\ndef test_heavy():\n    pass\n"
    for folder, text in (("unit", body), ("integration", body), ("unit", "def test_light():\n    pass\n")):
        (suite.path / "tests" / folder).mkdir(parents=True, exist_ok=True)
        (suite.path / "tests" / folder / f"test_{folder}_{len(text)}.py").write_text(text)
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "tests")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*test_heavy*tagged slow but lives in tests/unit/: move it to tests/integration/*"])
