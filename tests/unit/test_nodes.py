"""pipeline.faults.nodes: the node ledger beside the run directories, fed by hangs, read by slurm/train.sh."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.faults import nodes


def _hang(run_dir: Path, when: str, *unreachable: str) -> None:
    folder = run_dir / "hangs" / when
    folder.mkdir(parents=True)
    (folder / "hang.json").write_text(json.dumps({"unreachable": [{"node": n, "rank": 0} for n in unreachable]}))


def test_hangs_feed_the_ledger_beside_the_run_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv(nodes.ENV, raising=False)
    a, b = tmp_path / "a", tmp_path / "b"
    _hang(a, "1", "n2")
    _hang(a, "2", "n2", "n5")
    assert nodes.main(["record-hangs", str(a)]) == 0  # what slurm/train.sh runs after a hang
    assert capsys.readouterr().out.strip() == "n2,n5"
    assert nodes.record_hangs(a) == []  # each node once
    assert (tmp_path / ".alexnet-nodes.jsonl").is_file()
    assert nodes.main(["exclude", str(b)]) == 0  # another run under the same parent reads it
    assert capsys.readouterr().out.strip() == "n2,n5"
    nodes.record(b, "n7", "preflight", "matmul far below")
    assert nodes.failed_nodes(a) == ["n2", "n5", "n7"]


def test_the_environment_names_another_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(nodes.ENV, str(tmp_path / "site" / "nodes.jsonl"))
    nodes.record(tmp_path / "run", "n3", "divergence-rerun")
    assert nodes.failed_nodes(tmp_path / "elsewhere") == ["n3"]
    assert not (tmp_path / ".alexnet-nodes.jsonl").exists()
