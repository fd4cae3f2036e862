"""What tests/unit/test_evaluate.py and tests/integration/test_evaluate.py share."""

from __future__ import annotations

import pytest

from pipeline.tools.evaluate import main


def evaluate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command line in this process: (exit status, stdout, stderr)."""
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err
