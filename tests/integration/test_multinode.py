"""Training across two emulated nodes (network namespaces joined by a veth pair, tests/support/netns.py):
torchrun's c10d rendezvous at the first node's hostname, dp=2 x tp=2 over gloo on the veth, the same
weights as one process on the same fixed global batches."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint
from pipeline.checkpoint import export_model, read_towers
from tests.support import HARNESS, NARROW, PYTHON, flags
from tests.support.netns import Node, NodePair
from tests.support.node_torchrun import start_on_both, torchrun_argv
from tests.support.processes import run_logged, small_env, tail, wait_all

pytestmark = pytest.mark.netns
NETNS_TAG = "m"  # namespace names (conftest.py node_pair)

RDZV_PORT = 29413  # inside the namespaces only
TIMEOUT = 240  # seconds for the two-node run (~30 s on 2 cores)


def _latest(run_dir: Path) -> Path:
    path = checkpoint.latest(run_dir)
    assert path is not None, f"no checkpoint in {run_dir}"
    return path


def _veth_bytes(node: Node) -> int:
    """Bytes received on the node's end of the veth pair."""
    out = subprocess.run(
        ["ip", "-n", node.netns, *flags("-s -j link show dev"), node.ifname],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])


def test_two_nodes_equal_one_process(node_pair: NodePair, classes_only: Path, tmp_path: Path) -> None:
    a, b = node_pair.nodes
    common = [
        "--data",
        str(classes_only),
        *NARROW,
        *flags("--model.dropout 0 --batch-size 8 --lr 0.05 --epochs 1 --train.ten-crop false"),
        *flags("--checkpoint.every-minutes 0"),
    ]

    # One process, tp=1, on the host.
    single_out = tmp_path / "o1"
    single_out.mkdir()
    rc = run_logged(
        [PYTHON, HARNESS, *common, *flags("--tp 1 --run-dir {}", tmp_path / "r1")],
        tmp_path / "single.log",
        small_env({"HARNESS_OUT": str(single_out), "HARNESS_DATA": "fixed"}),
        timeout=TIMEOUT,
    )
    assert rc == 0, tail(tmp_path / "single.log")

    # Two nodes x 2 processes, tp=2 (a tower pair per node), dp=2 across the veth; as slurm/train.sh starts them.
    out = tmp_path / "o4"
    out.mkdir()
    env = small_env({"HARNESS_OUT": str(out), "HARNESS_DATA": "fixed"})
    rx_before = {n.hostname: _veth_bytes(n) for n in (a, b)}
    logs = {n.hostname: tmp_path / f"{n.hostname}.log" for n in (a, b)}
    argv = [
        *torchrun_argv(
            nproc=2,
            max_restarts=0,
            endpoint=f"{a.hostname}:{RDZV_PORT}",
            rdzv_id=f"mn-{node_pair.tag}",
            options=["--rdzv-conf=join_timeout=60,read_timeout=60,last_call_timeout=2"],
        ),
        HARNESS,
        *common,
        *flags("--tp 2 --run-dir {}", tmp_path / "r4"),
    ]
    procs = start_on_both(node_pair, argv, env, logs)
    codes, report = wait_all(procs, logs, TIMEOUT)
    assert codes == {a.hostname: 0, b.hostname: 0}, report

    # Every rank took the same steps; the ranks of each node are a tower pair on that node.
    outcomes = [json.loads((out / f"outcome-rank{r}.json").read_text()) for r in range(4)]
    assert all(
        o["progress"] == json.loads((single_out / "outcome-rank0.json").read_text())["progress"] for o in outcomes
    ), outcomes
    assert "world 4 = dp 2 x tp 2" in logs[a.hostname].read_text(errors="replace"), report
    # The gradients went over the veth pair (both directions), not over a host interface.
    traffic = {n.hostname: _veth_bytes(n) - rx_before[n.hostname] for n in (a, b)}
    assert min(traffic.values()) > 100_000, traffic

    single = export_model(_latest(tmp_path / "r1"))
    split = export_model(_latest(tmp_path / "r4"))
    assert single.keys() == split.keys()
    worst = {k: float((single[k] - split[k]).abs().max()) for k in single}
    assert max(worst.values()) <= 1e-6, worst

    torch.manual_seed(0)  # the trainer's init for seed 0: training really moved the weights
    from pipeline.model import ModelConfig, build_model

    init = build_model(ModelConfig(num_classes=4, widths=(16, 32, 48, 48, 32), fc_width=64)).state_dict()
    assert max(float((init[k] - single[k]).abs().max()) for k in init) > 1e-3
    towers = read_towers(_latest(tmp_path / "r4"))
    assert sorted(towers) == [0, 1] and towers[0]["model.conv1.weight"].shape == (8, 3, 11, 11)
