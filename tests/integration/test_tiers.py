"""The tiers keep themselves honest: a test that starts multi-process work without its marker fails, in
either tier, with the marker it needs; the fixtures that imply a tier tag their tests; `make test-fast`
selects what tests/support/tiers.py calls the fast tier."""

from __future__ import annotations

import pytest

from tests.support import tiers
from tests.support.tiers_cases import BODIES

# spawned torch ranks import torch in each process: ~20 s on 2 loaded cores
MULTIPROCESS = ["two_trainers", pytest.param("torch_ranks", marks=pytest.mark.slow), "torchrun"]


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
