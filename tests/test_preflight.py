"""`python -m launch.preflight` on 2 CPU ranks (gloo): one table; a rank slowed by a stop/continue duty cycle
is named, and --strict turns that into exit 1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from tests._fixtures import PYTHON, REPO, children, cmdline, kill_group, small_env, wait_for

TIMEOUT = 240


def _argv(data: Path, *extra: str) -> list[str]:
    return [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "launch.preflight",
        "--data",
        str(data),
        *extra,
    ]


def _rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if re.match(r"\s*\d+\s+\S+\s+[\d.]+\s+[\d.]+", line)]


def test_preflight_prints_one_table_of_every_rank(demo_shards: Path) -> None:
    proc = subprocess.run(
        _argv(demo_shards, "--seconds", "0.3"),
        cwd=REPO,
        env=small_env(),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=TIMEOUT,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert text.count("matmul GFLOP/s") == 1, text  # one table, from rank 0
    rows = _rows(proc.stdout)
    assert [r[0] for r in rows] == ["0", "1"], proc.stdout
    for _rank, _host, matmul, read, memory, _link in rows:
        assert float(matmul) > 0 and float(read) > 0 and float(memory) > 0, rows
    assert rows[0][5] == "-" and float(rows[1][5]) > 0, rows  # rank 0's link to itself is not a figure
    assert re.search(r"all-reduce bus bandwidth [\d.]+ GB/s over 2 ranks; transport gloo/TCP", proc.stdout)
    print(proc.stdout)


def test_preflight_bad_data_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "launch.preflight", "--data", str(tmp_path)],
        cwd=REPO,
        env=small_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: --data"), proc.stderr


def test_preflight_names_a_slow_rank_and_strict_fails(demo_shards: Path, tmp_path: Path) -> None:
    log = tmp_path / "preflight.log"
    with log.open("wb") as sink:
        agent = subprocess.Popen(
            _argv(demo_shards, "--seconds", "2", "--strict"),
            cwd=REPO,
            env=small_env(),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    victim = None
    try:

        def rank1() -> int | None:
            for pid in children(agent.pid):
                if "launch.preflight" in cmdline(pid) and _rank_of(pid) == 1:
                    return pid
            return None

        victim = wait_for(rank1, TIMEOUT, "rank 1", agent, poll=0.01)
        while agent.poll() is None:  # stopped 80% of the time: a node with a fifth of its peers' speed
            os.kill(victim, signal.SIGSTOP)
            time.sleep(0.08)
            os.kill(victim, signal.SIGCONT)
            time.sleep(0.02)
        rc = agent.wait(timeout=TIMEOUT)
    except ProcessLookupError:
        rc = agent.wait(timeout=TIMEOUT)
    finally:
        if victim is not None:
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass
        kill_group(agent)
    text = log.read_text(errors="replace")
    assert re.search(r"preflight: rank 1 \(host \S+\) matmul GFLOP/s [\d.]+ is below 0.5 x", text), text[-4000:]
    assert "preflight: rank 0" not in text, text[-4000:]
    assert rc != 0, text[-4000:]


def _rank_of(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    env = dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)
    return int(env["RANK"]) if "RANK" in env else None
