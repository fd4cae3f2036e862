"""`python -m launch.preflight` on 2 CPU ranks (gloo): one table; a rank slowed by a stop/continue duty cycle
is named, and --strict turns that into exit 1."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import PYTHON, REPO, flags
from tests.support.netns import NodePair, netns_skip_reason
from tests.support.processes import (
    children,
    cmdline,
    kill_group,
    rank_of,
    resume,
    run_captured,
    small_env,
    start_logged,
    wait_for,
)

TIMEOUT = 240


def _argv(data: Path, *extra: str) -> list[str]:
    return [
        PYTHON,
        *flags("-m torch.distributed.run --standalone --nproc_per_node=2 -m launch.preflight"),
        *flags("--data {}", data),
        *extra,
    ]


def _rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if re.match(r"\s*\d+\s+\S+\s+[\d.]+\s+[\d.]+", line)]


@pytest.mark.multiprocess
def test_preflight_prints_one_table_of_every_rank(demo_shards: Path) -> None:
    proc = run_captured(_argv(demo_shards, "--seconds", "0.3"), TIMEOUT)
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


@pytest.mark.multiprocess
def test_preflight_names_a_slow_rank_and_strict_fails(demo_shards: Path, tmp_path: Path) -> None:
    log = tmp_path / "preflight.log"
    agent = start_logged(_argv(demo_shards, "--seconds", "2", "--strict"), log, small_env())
    victim = None
    try:

        def rank1() -> int | None:
            for pid in children(agent.pid):
                if "launch.preflight" in cmdline(pid) and rank_of(pid) == 1:
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
        resume(victim)
        kill_group(agent)
    text = log.read_text(errors="replace")
    assert re.search(r"preflight: rank 1 \(host \S+\) matmul GFLOP/s [\d.]+ is below 0.5 x", text), text[-4000:]
    assert "preflight: rank 0" not in text, text[-4000:]
    assert rc != 0, text[-4000:]


# ------------------------------------------------------------------------------------------------
# A slow link between two emulated nodes (network namespaces + veth, tc netem on one end)


@pytest.mark.netns
def test_preflight_names_the_node_behind_a_slow_link(demo_shards: Path, tmp_path: Path) -> None:
    reason = netns_skip_reason()
    if reason:
        pytest.skip(reason)
    if not shutil.which("tc"):
        pytest.skip("no tc (iproute2) to slow the link")
    # Own tag and subnet: no clash with test_netns.py's pair or another run's.
    with NodePair(tag="pf20", subnet="10.231.20", hostnames=("pf-a", "pf-b")) as pair:
        a, b = pair.nodes
        # node-b's end of the veth pair at 16 Mbit/s: netem where the kernel has it, else a token bucket
        qdisc = ["tc", "qdisc", "add", "dev", b.ifname, "root"]
        done = pair.run(b, [*qdisc, "netem", "delay", "5ms", "rate", "16mbit"], timeout=30)
        if done.returncode != 0:
            done = pair.run(b, [*qdisc, "tbf", "rate", "16mbit", "burst", "32kbit", "latency", "400ms"], timeout=30)
        if done.returncode != 0:
            pytest.skip(f"tc refused to slow the link: {done.stderr.strip()}")
        logs = {n.hostname: tmp_path / f"{n.hostname}.log" for n in (a, b)}
        argv = [
            PYTHON,
            *flags("-m torch.distributed.run --nnodes=2 --nproc-per-node=2"),
            *flags("--rdzv-backend=c10d"),
            f"--rdzv-endpoint={a.addr}:29420",
            "--rdzv-id=preflight-pf20",
            "--local-addr={}",
            *flags("-m launch.preflight --data {} --seconds 0.3 --strict", demo_shards),
        ]
        env = small_env({"PYTHONPATH": str(REPO)})
        procs = {}
        for node in (b, a):  # the client first: it waits for the host's store
            node_argv = [w.replace("{}", node.addr) if w.startswith("--local-addr") else w for w in argv]
            env_node = {**env, "GLOO_SOCKET_IFNAME": node.ifname}
            procs[node.hostname] = pair.popen(
                node, node_argv, env=env_node, cwd=REPO, stdout=logs[node.hostname].open("wb"), stderr=subprocess.STDOUT
            )
        codes = {h: p.wait(timeout=TIMEOUT) for h, p in procs.items()}
    text = logs[a.hostname].read_text(errors="replace")
    report = text[-4000:] + "\n---\n" + logs[b.hostname].read_text(errors="replace")[-3000:]
    rows = _rows(text)
    assert [(r[0], r[1]) for r in rows] == [("0", "pf-a"), ("1", "pf-a"), ("2", "pf-b"), ("3", "pf-b")], report
    named = re.findall(r"preflight: rank (\d) \(host (\S+)\) link to 0 MB/s", text)
    assert sorted(named) == [("2", "pf-b"), ("3", "pf-b")], report
    assert float(rows[1][5]) > 4 * max(float(rows[2][5]), float(rows[3][5])), rows
    assert codes[a.hostname] != 0, report  # --strict


def _allreduce_with_a_late_rank(rank: int, store: str) -> None:
    """Rank 1 starts its timing 0.4 s after rank 0: timed loops per rank would end at different call counts."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from launch.preflight import allreduce_gb_per_s

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    try:
        late = [False]

        def sync() -> None:  # the first sync after the warm-up call: rank 1 is held up there once
            if rank == 1 and not late[0]:
                late[0] = True
                time.sleep(0.4)

        assert allreduce_gb_per_s(torch.device("cpu"), 0.3, sync) > 0
        dist.barrier()  # a rank still inside the measurement would never get here
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_allreduce_measurement_makes_the_same_calls_on_every_rank(tmp_path: Path) -> None:
    """The ranks agree on the number of all-reduces; a loop timed by each rank's clock hung under load."""
    from tests.support.tensor_parallel import spawn_two_ranks

    spawn_two_ranks(_allreduce_with_a_late_rank, (str(tmp_path / "store"),), timeout_s=90)
