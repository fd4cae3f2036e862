"""The watchdog's network check (pipeline/faults/reach.py): probes, the conclusion from every node's findings,
and the hang line and hang.json of two watchdogs on two "nodes" whose link to the second is cut (its
listener answers nothing). The same on emulated nodes with a real link cut: test_network_hang.py."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest

from pipeline.faults import reach
from pipeline.faults.reach import Peer, conclude, probe
from pipeline.faults.watchdog import HANG_EXIT, VERDICT, Watchdog
from pipeline.phases import Allowance, PhaseMarks
from tests.support.harness import BlackholeListener
from tests.support.processes import wait_for


def test_probe_tells_a_cut_link_from_a_closed_port() -> None:
    listening = reach.Listener("127.0.0.1")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_addr = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens: the host answers with a reset, so the path works
    cut = BlackholeListener()
    try:
        started = time.monotonic()
        failed = probe({0: listening.addr, 1: closed_addr, 2: cut.addr, 3: "127.0.0.1:notaport"}, timeout_s=1.5)
        took = time.monotonic() - started
    finally:
        listening.close()
        cut.close()
    assert sorted(failed) == [2, 3], failed
    assert failed[2] == "no answer within 1.5 s", failed
    assert took < 3, took  # in parallel, one timeout in all


def _peers(*nodes: str) -> dict[str, Peer]:
    return {n: Peer(n, n, i, f"10.0.0.{i + 1}:5000", [i]) for i, n in enumerate(nodes)}


def test_conclusion_names_the_node_most_others_cannot_reach() -> None:
    # two nodes, each reports the other: the side of rank 0 is kept
    peers = _peers("a", "b")
    cut = conclude(peers, {"a": {1: "no answer"}, "b": {0: "no answer"}}, "a")
    assert [p.node for p in cut.named] == ["b"] and len(cut.pairs) == 2
    assert cut.describe().startswith(
        "rank 0 (host a) cannot reach rank 1 (host b, 10.0.0.2:5000): the network between them; rank 1 (host b)"
    )
    assert cut.as_json() == [
        {"node": "b", "host": "b", "rank": 1, "addr": "10.0.0.2:5000", "ranks": [1], "unreachable_from": ["a"]}
    ]
    # three nodes, c cut off: a and b cannot reach it, it reaches nobody
    peers = _peers("a", "b", "c")
    findings = {"a": {2: "x"}, "b": {2: "x"}, "c": {0: "x", 1: "x"}}
    assert [p.node for p in conclude(peers, findings, "a").named] == ["c"]
    # rank 0's own node cut off: it is the one named, not the two it cannot reach
    findings = {"a": {1: "x", 2: "x"}, "b": {0: "x"}, "c": {0: "x"}}
    assert [p.node for p in conclude(peers, findings, "a").named] == ["a"]
    # split in halves: rank 0's half is kept
    peers = _peers("a", "b", "c", "d")
    findings = {"a": {2: "x", 3: "x"}, "b": {2: "x", 3: "x"}, "c": {0: "x", 1: "x"}, "d": {0: "x", 1: "x"}}
    assert [p.node for p in conclude(peers, findings, "a").named] == ["c", "d"]
    # one report missing (its prober died): decided by those that came
    assert [p.node for p in conclude(peers, {"a": {3: "x"}, "b": {3: "x"}, "c": {3: "x"}}, "a").named] == ["d"]
    # everyone reaches everyone: nothing named, no pairs
    cut = conclude(peers, {n: {} for n in peers}, "a")
    assert cut.named == [] and cut.pairs == [] and cut.describe() == ""


CUT_REASON = "node-b and the other nodes cannot reach each other"


def test_two_watchdogs_name_the_node_they_cannot_reach(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranks 0 (node-a) and 1 (node-b) in one process, both stuck in the same all-reduce; node-b's listener
    answers nothing. Rank 0's line names the pair, hang.json names node-b, both nodes' launchers are told."""
    monkeypatch.setattr(reach, "PROBE_S", 1.0)
    exits: list[int] = []
    cuts: list[tuple[int, str]] = []
    dogs = []
    for rank, node in enumerate(["node-a", "node-b"]):
        marks = PhaseMarks()
        marks.enter("gradient-sync", 12)
        dog = Watchdog(
            tmp_path, rank, 2, "att", marks, Allowance(1.0, 30.0),
            on_cut=lambda reason, rank=rank: cuts.append((rank, reason)),
        )  # fmt: skip
        dog._exit = lambda code, dog=dog: (exits.append(code), dog._stop.set())  # the thread ends as the process would
        dog.node = node
        dogs.append(dog)
    dogs[1].listener = BlackholeListener()
    caplog.set_level(logging.ERROR, logger="alexnet")
    for dog in dogs:
        dog.start()
    try:
        wait_for(lambda: len(exits) == 2, 60, "both watchdogs' exits")
    finally:
        for dog in dogs:
            dog.close()
    assert exits == [HANG_EXIT, HANG_EXIT]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hang: ")]
    assert len(lines) == 1, lines
    addr = dogs[1].listener.addr
    assert "no rank is behind: all wait in phase gradient-sync at step 12 (a collective hangs)" in lines[0]
    assert f"rank 0 (host node-a) cannot reach rank 1 (host node-b, {addr}): the network between them" in lines[0]
    assert "the launchers end instead of restarting (a restart would wait for node-b)" in lines[0]
    (folder,) = (tmp_path / "hangs").iterdir()
    verdict = json.loads((folder / VERDICT).read_text())
    assert [(u["node"], u["ranks"], u["addr"]) for u in verdict["unreachable"]] == [("node-b", [1], addr)]
    assert verdict["line"] == lines[0] and verdict["probed_from"] == ["node-a", "node-b"]
    assert sorted(cuts) == [(0, CUT_REASON), (1, CUT_REASON)]


def test_a_stopped_rank_is_not_probed_and_nothing_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A silent rank explains the hang: no probe, hang.json lists no node."""
    from pipeline.faults.watchdog import Record

    marks, exits, cuts = PhaseMarks(), [], []
    marks.enter("backward", 5)
    dog = Watchdog(tmp_path, 0, 2, "att", marks, Allowance(1.0, 2.0), exit_process=exits.append, on_cut=cuts.append)
    dog.progress_dir.mkdir(parents=True)
    old = time.time() - 60
    peer = Record(1, "elsewhere", 4242, "att", 3, 5, "forward", old, old, "node-b", BlackholeListener().addr)
    (dog.progress_dir / "rank-1.json").write_text(json.dumps(vars(peer)))
    caplog.set_level(logging.ERROR, logger="alexnet")
    dog.start()
    try:
        wait_for(lambda: exits, 30, "the watchdog's exit")
    finally:
        dog.close()
    (folder,) = (tmp_path / "hangs").iterdir()
    verdict = json.loads((folder / VERDICT).read_text())
    assert verdict["unreachable"] == [] and verdict["silent"] == [1] and cuts == []
    assert not list(folder.glob("reach-rank-*.json"))
