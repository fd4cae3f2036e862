"""The ablation runner (a tiny real table, the seed-spread verdicts, Slurm submission) and the run report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.tools import ablate, report
from tests.support import NARROW, flags

TINY = [
    "--",
    *NARROW,
    *flags("--batch-size 16 --data.workers 1 --train.ten-crop false --epochs 1"),
    *flags("--checkpoint.every-minutes 0 --train.log-every 1 --model.init kaiming"),
    *flags("--data.mean channel"),
]


def non_empty_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100
        assert len(np.unique(np.asarray(image.convert("L")))) > 10


@pytest.mark.slow
def test_runner_trains_one_switch_per_run_and_tabulates(
    demo_shards: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "ablate"
    args = [*flags("--out {} --data {} --switches no-lrn,tanh --seeds 0", out, demo_shards), *TINY]
    assert ablate.main(args) == 0
    table = (out / "ablation.md").read_text()
    rows = {
        line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "---" not in line
    }
    assert set(rows) == {"run", "base", "no-lrn", "tanh"}
    assert "1 seed: spread unknown" in rows["no-lrn"] and "LRN off" in rows["no-lrn"]
    assert "Seeds 0;" in table
    non_empty_png(out / "ablation.png")
    for name, option in (
        ("no-lrn-seed0", ("lrn", False)),
        ("tanh-seed0", ("activation", "tanh")),
        ("base-seed0", ("lrn", True)),
    ):
        config = json.loads((out / name / "config.json").read_text())
        assert config["model"][option[0]] == option[1]  # each run flipped its own switch and nothing else
        other = ("activation", "relu") if option[0] == "lrn" else ("lrn", True)
        assert config["model"][other[0]] == other[1]
    logs = {p: p.stat().st_mtime_ns for p in out.glob("*/train.log")}
    capsys.readouterr()
    assert ablate.main(args) == 0  # finished runs are not trained again
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/train.log")} == logs
    assert "training" not in capsys.readouterr().out
    (out / "tanh-seed0" / ablate.RESULT).unlink()  # as after --submit: a finished run without a summary
    assert ablate.main([*args[: args.index("--")], "--collect"]) == 0
    assert "| tanh |" in (out / "ablation.md").read_text() and (out / "tanh-seed0" / ablate.RESULT).exists()
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/train.log")} == logs


def test_run_report(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("report", "figures", "eval-*"))
    assert report.main([str(run)]) == 0  # the documented command (test_documented_commands.py)
    text = (run / "report" / "report.md").read_text()
    assert "| 10-crop | 24 |" in text and "| centre crop | 24 |" in text
    assert "40.7%" in text and "18.2%" in text
    assert "`model.widths`" in text and "`train.epochs`" in text and "`optim.momentum`" not in text
    assert "throughput: median" in text and "time waiting for data" in text
    assert "step-00000006" in text and "step-00000012" in text and "latest, best" in text
    non_empty_png(run / "report" / "curves.png")
    non_empty_png(run / "figures" / "conv1-filters-step-00000012.png")
    best = json.loads((run / "checkpoints" / "step-00000012" / "meta.json").read_text())["best_top1_error"]
    centre = json.loads((run / "eval-step-00000012-centre.json").read_text())
    assert centre["top1_error"] == pytest.approx(best)  # the report's centre crop is training's validation
