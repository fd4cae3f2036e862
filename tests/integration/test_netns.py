"""Two emulated nodes (network namespaces + veth, tests/support/netns.py): torchrun's c10d rendezvous and a
gloo all-reduce across them, 2 nodes x 2 processes, the way slurm/train.sh starts training."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.netns import Node, NodePair
from tests.support.node_torchrun import torchrun_argv
from tests.support.processes import wait_all

pytestmark = pytest.mark.netns

RDZV_PORT = 29411  # inside the namespaces only: no clash with anything on the host
TIMEOUT = 90  # seconds for the whole run (it takes ~15 s on 2 cores)

WORKER = r"""
import json, os, socket, sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

dist.init_process_group("gloo", timeout=timedelta(seconds=30))
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1), 1.0])
dist.all_reduce(t)
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps({
    "rank": rank, "world": world, "sum": t.tolist(), "hostname": socket.gethostname(),
    "local_rank": int(os.environ["LOCAL_RANK"]), "group_rank": int(os.environ["GROUP_RANK"]),
    "master_addr": os.environ.get("MASTER_ADDR"),
}))
dist.destroy_process_group()
"""


def _torchrun(
    pair: NodePair, node: Node, endpoint: str, local_addr: bool, script: Path, out: Path, log: Path
) -> subprocess.Popen[bytes]:
    conf = "--rdzv-conf=join_timeout=60,read_timeout=30,last_call_timeout=2"
    argv = torchrun_argv(nproc=2, max_restarts=0, endpoint=endpoint, rdzv_id=f"netns-{pair.tag}", options=[conf])
    if local_addr:
        argv.append(f"--local-addr={node.addr}")  # what the node advertises (MASTER_ADDR of its ranks)
    argv += [str(script), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return pair.popen(node, argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


@pytest.mark.parametrize("style", ["ip-endpoint+local-addr", "hostname-endpoint"])
def test_gloo_allreduce_two_nodes(node_pair: NodePair, tmp_path: Path, style: str) -> None:
    a, b = node_pair.nodes
    script = tmp_path / "allreduce.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    if style == "ip-endpoint+local-addr":
        # The rendezvous host is the node whose own hostname resolves to the endpoint's address
        # (torch's _matches_machine_hostname); each node advertises its veth address.
        endpoint, local_addr = f"{a.addr}:{RDZV_PORT}", True
    else:
        # As slurm/train.sh does it: the first node's hostname, resolved through /etc/hosts.
        endpoint, local_addr = f"{a.hostname}:{RDZV_PORT}", False
    logs = {n.hostname: tmp_path / f"{n.hostname}.log" for n in (a, b)}
    procs = {
        n.hostname: _torchrun(node_pair, n, endpoint, local_addr, script, out, logs[n.hostname]) for n in (b, a)
    }  # the client first: it must wait for the host's store

    codes, report = wait_all(procs, logs, TIMEOUT)
    assert codes == {a.hostname: 0, b.hostname: 0}, report

    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    assert all(r["world"] == 4 for r in results), results
    assert all(r["sum"] == [1.0 + 2.0 + 3.0 + 4.0, 4.0] for r in results), results
    # Two ranks on each node, with local ranks 0 and 1 and one group rank per node.
    by_host: dict[str, list[dict]] = {}
    for r in results:
        by_host.setdefault(r["hostname"], []).append(r)
    assert sorted(by_host) == [a.hostname, b.hostname], results
    for ranks in by_host.values():
        assert sorted(r["local_rank"] for r in ranks) == [0, 1], results
        assert len({r["group_rank"] for r in ranks}) == 1, results
