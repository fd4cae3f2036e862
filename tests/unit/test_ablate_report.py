"""The ablation runner (a tiny real table, the seed-spread verdicts, Slurm submission) and the run report."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.tools import ablate
from tests.support import flags


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
