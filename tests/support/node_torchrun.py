"""torchrun on the two emulated nodes of a ``NodePair`` (tests/support/netns.py), as slurm/train.sh starts it:
one agent per node, c10d rendezvous at an endpoint on the first node, the second node started first (a client
must wait for the host's store). ``processes.wait_all`` then waits for both agents."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support import PYTHON, REPO, flags
from tests.support.netns import NodePair


def torchrun_argv(
    *, nproc: int, max_restarts: int, endpoint: str, rdzv_id: str, options: Sequence[str] = ()
) -> list[str]:
    """torchrun's own arguments for one agent of a two-node job (the script and its arguments follow)."""
    return [
        PYTHON,
        *flags("-m torch.distributed.run --nnodes=2"),
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={rdzv_id}",
        *options,
    ]


def start_on_both(
    pair: NodePair, argv: Sequence[str], env: Mapping[str, str], logs: Mapping[str, Path], cwd: Path = REPO
) -> dict[str, subprocess.Popen[bytes]]:
    """``argv`` on each node of ``pair`` (the second first), its output into ``logs[hostname]``; by hostname."""
    a, b = pair.nodes
    procs = {}
    for node in (b, a):  # the client first: it must wait for the host's store
        with logs[node.hostname].open("wb") as log:
            procs[node.hostname] = pair.popen(node, argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    return procs
