"""The ablation runner (a tiny real table, the seed-spread verdicts, Slurm submission) and the run report."""

from __future__ import annotations

import json
import os
import stat
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


def fake_results(values: dict[str, list[float]]) -> dict[str, list[dict]]:
    return {
        name: [
            {
                "val_top1_error": v,
                "train_top1_error": v,
                "val_top5_error": v / 2,
                "steps_to_target": 10,
                "train_curve": [[1, v]],
                "val_curve": [[1, v]],
            }
            for v in vs
        ]
        for name, vs in values.items()
    }


def test_table_says_when_a_difference_is_within_the_seed_spread() -> None:
    results = fake_results(
        {
            "base": [0.30, 0.32, 0.34],
            "no-lrn": [0.40, 0.41, 0.42],
            "no-overlap": [0.31, 0.35, 0.29],
            "no-dropout": [0.20, 0.21, 0.19],
        }
    )
    rows = {
        line.split("|")[1].strip(): line
        for line in ablate.table(results, [0, 1, 2], 0.25).splitlines()
        if line.startswith("| ")
    }
    assert "reproduced (worse without it)" in rows["no-lrn"] and "+9.0" in rows["no-lrn"]
    assert "within seed spread: add seeds" in rows["no-overlap"]
    assert "not reproduced" in rows["no-dropout"]
    assert "32.0 ± 2.0" in rows["base"]


def test_submit_queues_one_sbatch_job_per_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 4242\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert (
        ablate.main(
            [
                *flags("--out {} --data {} --switches no-dropout --seeds 0,1 --submit", tmp_path / "a", tmp_path),
                *flags("--sbatch-args"),
                "-p gpu",
                *flags("-- --epochs 3"),
            ]
        )
        == 0
    )
    lines = calls.read_text().splitlines()
    assert len(lines) == 4  # base and no-dropout, two seeds each
    assert all("-p gpu" in line and "slurm/train.sh" in line and "--epochs 3" in line for line in lines)
    assert sum("--model.dropout 0" in line for line in lines) == 2
    assert "job 4242" in capsys.readouterr().out


def test_unknown_switch_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ablate.main(flags("--out {} --switches no-lrn,no-batchnorm", tmp_path)) == 2
    assert capsys.readouterr().err.startswith("error: --switches: unknown no-batchnorm")


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
