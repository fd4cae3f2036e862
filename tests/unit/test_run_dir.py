"""The run directory's layout is named in one place (``pipeline/run_dir.py``), and its names are a file format."""

from __future__ import annotations

import ast
from pathlib import Path

from pipeline import run_dir
from pipeline.run_dir import RunDir
from tests.support import REPO

# Names no other module has a reason to spell: a path piece equal to one of them is the layout spelled again.
DISTINCT = {
    run_dir.CONFIG,
    run_dir.LEASE,
    run_dir.CHECKPOINTS,
    run_dir.TENSORBOARD,
    run_dir.HANGS,
    run_dir.PROFILES,
    run_dir.LR_DROP_REQUEST,
    run_dir.PROFILE_REQUEST,
    run_dir.PREEMPT_REQUEST,
    run_dir.CRASHES,
    run_dir.BAD_BATCHES,
    run_dir.NODE_LEDGER,
    RunDir(".").eval_ensemble.name,
}
# Modules that still spell their own names while issue 34's other branches move them onto RunDir; an entry
# whose module no longer spells one (or no longer exists) fails below: delete it then.
NOT_YET: set[str] = set()  # modules still to adopt RunDir (none)


def _spelled() -> dict[str, list[str]]:
    """Module path -> the layout names it holds as string constants (messages and docstrings never equal one)."""
    found: dict[str, list[str]] = {}
    for package in ("basics", "preprocess", "pipeline", "launch"):
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in DISTINCT:
                    found.setdefault(rel, []).append(f"line {node.lineno}: {node.value!r}")
    return found


def test_only_run_dir_spells_the_layout() -> None:
    spelled = _spelled()
    spelled.pop("pipeline/run_dir.py")
    again = {path: names for path, names in spelled.items() if path not in NOT_YET}
    assert not again, f"the run directory's names spelled outside pipeline/run_dir.py (use RunDir): {again}"
    stale = sorted(NOT_YET - set(spelled))
    assert not stale, f"these use RunDir now: remove them from NOT_YET: {stale}"


def test_the_names_are_those_earlier_runs_wrote(tmp_path: Path) -> None:
    layout = RunDir(tmp_path)
    assert layout.config == tmp_path / "config.json" and layout.lease == tmp_path / "writer.lease"
    assert layout.checkpoints == tmp_path / "checkpoints" and layout.tensorboard == tmp_path / "tensorboard"
    assert layout.preempt_request == tmp_path / "preempt.request"
    assert layout.eval_result("step-00000012") == tmp_path / "eval-step-00000012.json"
    assert layout.eval_result("step-00000012", ten_crop=False) == tmp_path / "eval-step-00000012-centre.json"
    assert layout.eval_ensemble == tmp_path / "eval-ensemble.json"
    assert layout.neighbours_figure("step-00000012") == tmp_path / "figures" / "neighbours-step-00000012.png"
    for name in ("eval-step-00000012.json", "eval-ensemble.json", "eval-step-00000012-centre.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "evaluation.json").write_text("{}")  # not a result
    assert [p.name for p in layout.eval_results()] == sorted(
        ["eval-ensemble.json", "eval-step-00000012-centre.json", "eval-step-00000012.json"]
    )
    assert not layout.is_run()
    layout.config.write_text("{}")
    assert layout.is_run()
