"""A link between two emulated nodes cut for good (tests/support/netns.py: network namespaces joined by a
veth pair, one rank each, gloo, c10d rendezvous, --max-restarts=1, the run directory shared): mid-step and
inside a checkpoint save. Each time the hang line comes within the step allowance (a save's collectives no
longer get the slow one), names the pair of nodes that cannot talk, hang.json names node-b, and both
torchruns end at once instead of re-rendezvousing with a node they cannot reach."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from pipeline.faults.reach import PROBE_S
from tests.support import HARNESS, NARROW, flags
from tests.support.netns import NodePair
from tests.support.node_torchrun import start_on_both, torchrun_argv
from tests.support.processes import small_env, tail, wait_for

pytestmark = pytest.mark.netns
NETNS_TAG = "h"  # namespace names (conftest.py node_pair)

RDZV_PORT = 29415  # inside the namespaces only
# ALEXNET_TEST_NETWORK_DEFAULTS=1 runs the same cases at the trainer's defaults (docs/BENCHMARKS.md, Faults).
AT_DEFAULTS = bool(os.environ.get("ALEXNET_TEST_NETWORK_DEFAULTS"))
HANG_S = 120 if AT_DEFAULTS else 10  # --faults.hang.timeout (default 120)
SLOW_S = 480 if AT_DEFAULTS else 60  # --faults.hang.slow-phase-timeout (default 480): what a save's collectives got
WATCH = [] if AT_DEFAULTS else flags("--faults.hang.timeout {} --faults.hang.slow-phase-timeout {}", HANG_S, SLOW_S)
WATCH += [] if AT_DEFAULTS else flags("--faults.hang.collective-timeout-min 5")
# The line: the step allowance, a poll, the probe, the wait for the other node's findings (2 beats), slack
# for two loaded cores. Below SLOW_S: a save's hung collective judged by the slow allowance fails it.
LINE_BOUND_S = HANG_S + PROBE_S + 2 * max(HANG_S / 10, 0.2) + 15
EXIT_BOUND_S = 30  # from the line to both torchruns' exit (SIGTERM: they stop their workers and leave)


def _hang_line(log: Path) -> str | None:
    return next((ln for ln in log.read_text(errors="replace").splitlines() if "hang: " in ln), None)


@pytest.mark.parametrize("where", ["mid-step", "checkpoint"])
def test_cut_link_is_named_and_both_launchers_end(
    node_pair: NodePair, classes_only: Path, tmp_path: Path, where: str
) -> None:
    a, b = node_pair.nodes
    node_pair.set_link(b, up=True)  # the link of an earlier case
    run_dir, gate, out = tmp_path / "run", tmp_path / "gate", tmp_path / "out"
    gate.mkdir()
    out.mkdir()
    env = small_env({"HARNESS_OUT": str(out), "HARNESS_DATA": "fixed", "HARNESS_GATE": str(gate)})
    if where == "mid-step":
        env["HARNESS_PAUSE_AT"] = "5"  # every rank holds before its batch of step 5, then the all-reduce hangs
        held = "paused-rank"
    else:
        env["HARNESS_GATE_SAVE"] = "1"  # every rank holds at the start of the step-3 save's file collectives
        held = "saving-rank"
    logs = {n.hostname: tmp_path / f"{n.hostname}.log" for n in (a, b)}
    argv = [
        *torchrun_argv(
            nproc=1,
            max_restarts=1,
            endpoint=f"{a.hostname}:{RDZV_PORT}",
            rdzv_id=f"cut-{where}-{node_pair.tag}",
            options=["--monitor-interval=0.5"],
        ),
        HARNESS,
        *flags("--data {} --run-dir {} --tp 1", classes_only, run_dir),
        *NARROW,
        *flags("--model.dropout 0 --batch-size 8 --epochs 100 --train.ten-crop false"),
        *flags("--checkpoint.every-minutes 0 --checkpoint.every-steps 3 --train.log-every 1"),
        *WATCH,
    ]
    procs = start_on_both(node_pair, argv, env, logs)

    def report() -> str:
        return "\n".join(f"--- {h} (exit {p.poll()})\n{tail(logs[h], 6000)}" for h, p in procs.items())

    try:
        try:
            wait_for(lambda: all((gate / f"{held}{r}").exists() for r in (0, 1)), 240, f"both ranks at {where}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{report()}") from None
        node_pair.set_link(b, up=False)  # node-b's end of the link, down for good
        cut_at = time.monotonic()
        (gate / "go").touch()
        line = None
        while line is None and time.monotonic() - cut_at < LINE_BOUND_S + 30:
            line = _hang_line(logs[a.hostname])
            time.sleep(0.05)
        line_at = time.monotonic()
        ended = {}
        while len(ended) < 2 and time.monotonic() - line_at < EXIT_BOUND_S + 60:
            for host, proc in procs.items():
                if host not in ended and proc.poll() is not None:
                    ended[host] = time.monotonic()
            time.sleep(0.05)
    finally:
        text = report()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        node_pair.set_link(b, up=True)
    assert line is not None, text
    print(
        f"{where}: hang line {line_at - cut_at:.1f} s after the cut, torchruns ended "
        + ", ".join(f"{h} {t - cut_at:.1f} s" for h, t in sorted(ended.items()))
        + " after the cut"
    )
    assert line_at - cut_at < LINE_BOUND_S, (line_at - cut_at, line)
    phases = ("gradient-sync", "backward") if where == "mid-step" else ("checkpoint-sync",)
    assert re.search(rf"all wait in phase ({'|'.join(phases)}) at step", line), line
    assert re.search(rf"rank 0 \(host {a.hostname}\) cannot reach rank 1 \(host {b.hostname}, {b.addr}:\d+\)", line)
    assert ": the network between them" in line, line
    folder = Path(re.search(r"Python in (\S+)/rank-N.txt", line).group(1))
    verdict = json.loads((folder / "hang.json").read_text())
    assert [(u["node"], u["ranks"]) for u in verdict["unreachable"]] == [(b.hostname, [1])], verdict

    # Both launchers ended promptly, each after one line saying why, without a new rendezvous.
    assert sorted(ended) == [a.hostname, b.hostname], text
    assert max(ended.values()) - line_at < EXIT_BOUND_S, (ended, line_at, text)
    for host, log in logs.items():
        body = log.read_text(errors="replace")
        why = f"{b.hostname} and the other nodes cannot reach each other"
        # launch.train.end_torchrun SIGKILLs its parent, the agent: the process started here (ip netns exec,
        # unshare and sh each exec the next, so the agent keeps this pid). A torchrun that ended any other way
        # (its restarts used up, a rendezvous error) exits with a code, not by the signal.
        assert f"{host}: ending torchrun (pid {procs[host].pid})" in body and why in body, body[-6000:]
        assert "RendezvousTimeoutError" not in body and "RendezvousConnectionError" not in body, body[-6000:]
        assert procs[host].returncode == -signal.SIGKILL, (host, procs[host].returncode)
