"""A short training run, then the real TensorBoard server on its logs: the scalars come back over HTTP."""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.support import HARNESS, PYTHON, SMALL_RUN, flags
from tests.support.processes import kill_group, run_logged, small_env, start_logged, tail

pytestmark = pytest.mark.multiprocess  # two gloo ranks spawned per case

TENSORBOARD = str(Path(PYTHON).with_name("tensorboard"))
STARTUP_TIMEOUT = 90  # s until the server answers with the run's scalars (~5 s on 2 cores)


def _get(base: str, path: str, **query: str) -> object:
    url = base + path + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_serves_the_runs_scalars(demo_shards: Path, tmp_path: Path) -> None:
    if not Path(TENSORBOARD).exists():
        pytest.skip(f"no tensorboard executable next to {PYTHON}")
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    log = tmp_path / "train.log"
    # One epoch (12 steps of 8 images) with a scalar every step, then validation at the epoch end.
    rc = run_logged(
        [
            PYTHON,
            HARNESS,
            *flags("--data {} --run-dir {}", demo_shards, run_dir),
            *SMALL_RUN,
            *flags("--tp 1 --epochs 1 --train.log-every 1"),
        ],
        log,
        small_env({"HARNESS_OUT": str(out), "HARNESS_DATA": "real"}),
        timeout=240,
    )
    assert rc == 0, tail(log)
    outcome = json.loads((out / "outcome-rank0.json").read_text())
    steps = outcome["progress"]["step"]
    assert steps == 12, outcome

    server_log = tmp_path / "tensorboard.log"
    server = start_logged(
        [TENSORBOARD, *flags("--logdir {} --host 127.0.0.1 --port 0 --reload_interval 1", run_dir / "tensorboard")],
        server_log,
        small_env(),
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        base = None
        while base is None:
            m = re.search(r"TensorBoard \S+ at (http://127\.0\.0\.1:\d+)/", server_log.read_text(errors="replace"))
            if m:
                base = m.group(1)
            elif server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tensorboard did not start (exit {server.poll()}):\n{tail(server_log)}")
            else:
                time.sleep(0.2)

        tags: dict = {}
        while True:  # the server loads the event files in the background
            try:
                tags = _get(base, "/data/plugin/scalars/tags")  # type: ignore[assignment]
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                tags = {}
            if {"train/loss", "val/top1_error"} <= set(tags.get(".", {})):
                break
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tensorboard never served the run's scalars (tags {tags}):\n{tail(server_log)}")
            time.sleep(0.5)

        assert _get(base, "/data/runs") == ["."]
        assert {"train/lr", "train/top1_error", "perf/images_per_s", "val/top5_error", "val/loss"} <= set(tags["."])

        loss = _get(base, "/data/plugin/scalars/scalars", run=".", tag="train/loss")
        assert [step for _, step, _ in loss] == list(range(1, steps + 1))  # [wall_time, step, value] rows
        assert all(math.isfinite(v) and 0 < v < 20 for _, _, v in loss), loss

        val = _get(base, "/data/plugin/scalars/scalars", run=".", tag="val/top1_error")
        assert len(val) == 1 and val[0][1] == steps, val
        assert val[0][2] == pytest.approx(outcome["val_top1_error"], abs=1e-6)  # the value the trainer returned

        lr = _get(base, "/data/plugin/scalars/scalars", run=".", tag="train/lr")
        assert all(v == pytest.approx(0.01) for _, _, v in lr), lr  # the default LR, no drop in one epoch
    finally:
        kill_group(server)
    assert server.poll() is not None
