"""One short seeded chaos campaign (tests/support/chaos.py): four emulated nodes, faults of several kinds at
steps the seed draws, and the campaign's own checks (finished, every sample of every epoch once, the weights
of an uninterrupted run, every fault named in one line). ``make chaos`` runs longer ones."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support import PYTHON, REPO, flags
from tests.support.netns import netns_skip_reason
from tests.support.processes import small_env

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SEED = 3
# Kinds that resume exactly (so the weights are compared), one of each: a full disk under a checkpoint's file
# (the checkpointer's line, torchrun's restart), a preemption and a damaged `latest` after it (the requeue
# replays from the checkpoint before). ~3 min on 2 loaded cores; `make chaos` draws from every kind.
FAULTS = "full-disk,preempt,damaged-latest"
TIMEOUT = 600


def test_a_seeded_campaign_loses_nothing(demo_data: Path, tmp_path: Path) -> None:
    reason = netns_skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "chaos"
    proc = subprocess.run(
        [
            PYTHON,
            *flags(
                # --wait: after a campaign already running on this machine, not beside it
                "-m tests.support.chaos --seed {} --faults {} --data {} --out {} --wait",
                SEED,
                FAULTS,
                demo_data / "shards",
                out,
            ),
        ],
        cwd=REPO,
        env=small_env(),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=TIMEOUT,
    )
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    assert proc.returncode == 0 and report.get("ok"), proc.stdout[-4000:] + proc.stderr[-4000:]
    injected = [line for line in proc.stdout.splitlines() if line.startswith("chaos: injecting ")]
    assert sorted(line.split()[2] for line in injected) == sorted(FAULTS.split(",")), proc.stdout
    assert report["jobs"] >= 3  # the preemption and the damaged checkpoint each ended a job: both were requeued
    assert report["weights_max_abs_diff"] is not None and report["problems"] == [], report
    # the namespaces are gone
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert f"alexnet-{report['namespaces']}-" not in listed, listed
