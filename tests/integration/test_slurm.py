"""slurm/preprocess.sh as a real Slurm array job on a two-node local cluster (tests/support/slurm.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from preprocess import shards
from tests.support import flags
from tests.support.slurm import REPO, SlurmCluster

pytestmark = pytest.mark.slurm

TASKS = 3
SHARD_SIZE = 25


def _preprocess(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "preprocess", *args],
        cwd=REPO,
        check=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def demo_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("demo") / "src"
    _preprocess("make-demo", str(src), "--classes", "3", "--train-per-class", "40", "--val-per-class", "10")
    return src


def test_preprocess_array_job(slurm_cluster: SlurmCluster, demo_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    logs = tmp_path / "logs"
    logs.mkdir()
    job = slurm_cluster.sbatch(
        [
            f"--array=0-{TASKS - 1}",
            "--cpus-per-task=1",
            "--mem-per-cpu=500M",
            f"--output={logs}/%x-%A_%a.out",
            *flags(
                "{} --src {} --out {} --split train --shard-size {}",
                REPO / "slurm" / "preprocess.sh",
                demo_src / "train",
                out,
                SHARD_SIZE,
            ),
        ],
        env={"PYTHON": sys.executable},
        cwd=REPO,  # the job runs in SLURM_SUBMIT_DIR: the repo, so `-m preprocess` imports this clone
    )
    records = slurm_cluster.wait(job, timeout=120)
    task_logs = {int(r["ArrayTaskId"]): Path(r["StdOut"]) for r in records}
    texts = {i: p.read_text() if p.exists() else "(no log)" for i, p in task_logs.items()}
    report = "\n".join(
        f"--- task {i}: {records[n]['JobState']} on {records[n]['NodeList']}\n{texts[i]}"
        for n, i in enumerate(task_logs)
    )
    assert sorted(task_logs) == list(range(TASKS)), report
    assert all(r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0" for r in records), report

    # The array ran across both nodes' slots; each task knew its index and wrote only its shards.
    num_shards = len(json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"])
    assert num_shards == 5  # 120 images (2 are unreadable, skipped), 25 per shard
    written = {}
    for i, text in texts.items():
        assert f"preprocess task {i} of {TASKS} " in text, report
        m = re.search(r"this task owns (\d+), (\d+) already complete, (\d+) to write", text)
        assert m, report
        owns, done, todo = map(int, m.groups())
        mine = shards.tasks_shards(num_shards, i, TASKS)
        assert (owns, done, todo) == (len(mine), 0, len(mine)), report
        written[i] = mine
    every = sorted(s for mine in written.values() for s in mine)
    assert every == list(range(num_shards)), f"shards written more or less than once: {written}"
    # The last task to finish wrote the manifest (two finishing together may both write it).
    finalizers = [i for i, t in texts.items() if "manifest:" in t]
    assert len(finalizers) >= 1, report

    # Byte-identical to one local run with the same options.
    local = tmp_path / "local"
    _preprocess(
        "shard",
        "--src",
        str(demo_src / "train"),
        "--out",
        str(local),
        "--split",
        "train",
        "--shard-size",
        str(SHARD_SIZE),
        "--workers",
        "1",
        "--no-progress",
    )
    assert (out / "manifest.json").read_text() == (local / "manifest.json").read_text()
    for name in sorted(p.name for p in (local / "train").iterdir()):
        if name.endswith((".tar", ".idx")):
            assert (out / "train" / name).read_bytes() == (local / "train" / name).read_bytes(), name
    assert (out / "mean_image.npy").read_bytes() == (local / "mean_image.npy").read_bytes()
