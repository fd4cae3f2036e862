"""`python -m launch.preflight` on 2 CPU ranks (gloo): one table; a rank slowed by a stop/continue duty cycle
is named, and --strict turns that into exit 1."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from launch.preflight import far_below, nccl_transports, socket_fallback
from tests.support import PYTHON, REPO, flags
from tests.support.processes import small_env

TIMEOUT = 240


def test_preflight_bad_data_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [PYTHON, *flags("-m launch.preflight --data {}", tmp_path)],
        cwd=REPO,
        env=small_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: --data"), proc.stderr


def test_nccl_transport_is_read_from_its_info_output(tmp_path: Path) -> None:
    """NCCL's INFO lines (as NCCL 2.2x writes them to NCCL_DEBUG_FILE) give the transports; sockets between
    nodes are warned about, on one node they are not."""
    (tmp_path / f"nccl.node1.{os.getpid()}.log").write_text(
        "node1:11:12 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read\n"
        "node1:11:12 [1] NCCL INFO Channel 00/0 : 1[1] -> 2[0] [send] via NET/Socket/0\n"
        "node1:11:12 [0] NCCL INFO Channel 01/0 : 3[1] -> 0[0] [receive] via NET/IB/0/GDRDMA\n"
    )
    (tmp_path / "nccl.node1.1.log").write_text("x NCCL INFO Channel 00/0 : 0[0] -> 1[1] via SHM/direct/direct\n")
    found = nccl_transports(tmp_path)
    assert found == {"P2P/CUMEM", "NET/Socket", "NET/IB"}, found  # another process's file is not read
    assert "NET/Socket" in socket_fallback(sorted(found), {"node1", "node2"})
    assert socket_fallback(sorted(found), {"node1"}) is None
    assert socket_fallback(["NET/IB", "P2P/CUMEM"], {"node1", "node2"}) is None


def test_far_below_compares_with_the_other_ranks() -> None:
    inf = float("inf")
    rows = [
        {"host": "a", "matmul": 100.0, "read": 300.0, "memory": 70.0, "link": inf},
        {"host": "b", "matmul": 40.0, "read": 290.0, "memory": 70.0, "link": 900.0},
        {"host": "c", "matmul": 95.0, "read": 310.0, "memory": 69.0, "link": 80.0},
    ]
    lines = far_below(rows, 0.5)
    assert len(lines) == 2, lines
    assert lines[0].startswith("preflight: rank 1 (host b) matmul GFLOP/s 40 is below 0.5 x")
    assert lines[1].startswith("preflight: rank 2 (host c) link to 0 MB/s 80 is below 0.5 x")
