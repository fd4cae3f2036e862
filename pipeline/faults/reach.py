"""Which nodes of a hung job cannot reach each other: the progress watchdog's network check.

When every rank waits in a collective and the verdict blames no stopped process, a broken link between
nodes is the usual cause, and neither NCCL's watchdog nor torchelastic names it (they time out). So:

- every rank listens on a TCP socket of its own (:class:`Listener`) at the address it is reached at on
  the job's network (:func:`job_address`) and publishes ``ADDR:PORT`` in its progress record;
- at a hang verdict one rank per node (the prober: the node's lowest rank) connects to the lowest rank
  of every other node at once, non-blocking, for ``PROBE_S`` (:func:`probe`). A finished handshake or
  a refusal (RST: the host answered) is reachable; no answer, or no route, is not. Its own listener
  rather than any port of the peer: a host firewall that drops packets to closed ports would make a
  closed port read as a dead link, while the listener's port is an ephemeral one like gloo's and NCCL's
  own, which the job's network must pass anyway. The listener never accepts: the kernel completes the
  handshake from its queue, which is all a probe needs (one connection per other node per hang);
- each prober writes what it could not reach to the hang folder (``reach-rank-N.json``); the reporting
  rank and each prober read all probers' findings and conclude alike (:func:`conclude`): a node is
  named when most of the other nodes that reported cannot reach it. When that names every node (two
  nodes, each reporting the other; a split in halves) the side of rank 0 is kept: the nodes rank 0's
  node still reaches.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import selectors
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from basics.files import write_json_atomic

# Three SYNs (at 0, 1 and 3 s, Linux's retransmission schedule) fit: a healthy link that loses a packet
# still answers; a cut one is named within seconds, small against the hang allowance.
PROBE_S = 5.0
FINDINGS = "reach-rank-{}.json"
_SIOCGIFADDR = 0x8915


def node_name() -> str:
    """The node as the scheduler names it (what ``sbatch --exclude`` takes), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def interface_address(ifname: str) -> str | None:
    """The IPv4 address of a network interface (Linux), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def job_address(environ: Mapping[str, str] = os.environ) -> str:
    """The address this rank is reached at on the job's network, in this order: the interface the
    collectives are told to use (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME: the site's choice), the source
    address the kernel routes traffic to MASTER_ADDR from (a UDP "connect" sends nothing), this host
    name's address."""
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        first = environ.get(var, "").split(",")[0].strip()
        if first and first[0] not in "^=":
            found = interface_address(first)
            if found:
                return found
    master = environ.get("MASTER_ADDR")
    if master:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((master, int(environ.get("MASTER_PORT") or 9)))
                return s.getsockname()[0]
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class Listener:
    """A listening TCP socket at the job address, port chosen by the kernel; ``addr`` is ``HOST:PORT``."""

    def __init__(self, host: str | None = None):
        host = host or job_address()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(socket.SOMAXCONN)
        self.addr = f"{host}:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def probe(targets: Mapping[int, str], timeout_s: float | None = None) -> dict[int, str]:
    """``{rank: "HOST:PORT"}`` -> ``{rank: why}`` for the targets not reachable within ``timeout_s``
    (``PROBE_S``), all connects in flight together (the whole probe takes at most ``timeout_s``)."""
    timeout_s = PROBE_S if timeout_s is None else timeout_s
    failed: dict[int, str] = {}
    selector = selectors.DefaultSelector()
    for rank, addr in targets.items():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            code = s.connect_ex(split_addr(addr))
        except (OSError, ValueError) as e:  # an unresolvable or malformed address
            failed[rank] = str(e)
            s.close()
            continue
        if code == errno.EINPROGRESS:
            selector.register(s, selectors.EVENT_WRITE, rank)
            continue
        if code not in (0, errno.ECONNREFUSED):
            failed[rank] = os.strerror(code)
        s.close()
    deadline = time.monotonic() + timeout_s
    while selector.get_map() and (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(left):
            s = key.fileobj
            code = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[union-attr]
            if code not in (0, errno.ECONNREFUSED):  # refused: the host answered, the path works
                failed[key.data] = os.strerror(code)
            selector.unregister(s)
            s.close()  # type: ignore[union-attr]
    for key in list(selector.get_map().values()):
        failed[key.data] = f"no answer within {timeout_s:g} s"
        key.fileobj.close()  # type: ignore[union-attr]
    selector.close()
    return failed


@dataclass(frozen=True)
class Peer:
    """A node as the probes see it: its lowest rank (the one probed and probing) and its ranks."""

    node: str
    host: str
    rank: int
    addr: str
    ranks: list[int]


def nodes_of(records: Mapping[int, Any]) -> dict[str, Peer]:
    """Progress records (pipeline.faults.watchdog.Record) -> one Peer per node, by node name."""
    peers: dict[str, Peer] = {}
    for rank in sorted(records):
        rec = records[rank]
        node = rec.node or rec.host
        if node in peers:
            peers[node].ranks.append(rank)
        else:
            peers[node] = Peer(node, rec.host, rank, rec.addr, [rank])
    return peers


@dataclass
class Cut:
    """What the probers found: who could not reach whom, and the nodes named for exclusion."""

    pairs: list[tuple[Peer, Peer, str]] = field(default_factory=list)  # (from, to, why)
    named: list[Peer] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)  # the nodes whose prober's findings arrived

    def describe(self, limit: int = 3) -> str:
        """``rank 0 (host a) cannot reach rank 1 (host b, ADDR): the network between them`` per pair."""
        texts = [
            f"rank {a.rank} (host {a.node}) cannot reach rank {b.rank} (host {b.node}, {b.addr}): the network "
            "between them"
            for a, b, _ in self.pairs[:limit]
        ]
        if len(self.pairs) > limit:
            texts.append(f"and {len(self.pairs) - limit} more node pairs")
        return "; ".join(texts)

    def as_json(self) -> list[dict[str, object]]:
        """``[{node, host, addr, ranks, unreachable_from}]`` for the named nodes (what a script excludes)."""
        return [
            {
                **asdict(p),
                "unreachable_from": sorted({a.node for a, b, _ in self.pairs if b.node == p.node}),
            }
            for p in self.named
        ]


def write_findings(folder: Path, me: Peer, failed: Mapping[int, str]) -> None:
    path = folder / FINDINGS.format(me.rank)
    unreachable = {str(r): why for r, why in failed.items()}
    write_json_atomic(path, {"node": me.node, "rank": me.rank, "unreachable": unreachable}, durable=False)


def read_findings(folder: Path, peers: Mapping[str, Peer]) -> dict[str, dict[int, str]]:
    """The findings that have arrived: ``{prober's node: {unreachable rank: why}}``."""
    found = {}
    for peer in peers.values():
        try:
            data = json.loads((folder / FINDINGS.format(peer.rank)).read_text())
        except (OSError, ValueError):
            continue
        found[peer.node] = {int(r): w for r, w in data["unreachable"].items()}
    return found


def conclude(peers: Mapping[str, Peer], findings: Mapping[str, Mapping[int, str]], first_node: str) -> Cut:
    """The pairs that cannot talk and the nodes named (see the module docstring); ``first_node``: rank 0's."""
    by_rank = {p.rank: p for p in peers.values()}
    cut = Cut(reported=sorted(findings))
    for node in sorted(findings, key=lambda n: peers[n].rank):
        for rank, why in sorted(findings[node].items()):
            if rank in by_rank:
                cut.pairs.append((peers[node], by_rank[rank], why))
    if not cut.pairs:
        return cut
    named = []
    for peer in sorted(peers.values(), key=lambda p: p.rank):
        voters = [n for n in findings if n != peer.node]
        against = [n for n in voters if peer.rank in findings[n]]
        if voters and 2 * len(against) > len(voters):
            named.append(peer)
    if len(named) == len(peers) and first_node in findings:
        kept = {first_node} | {p.node for p in peers.values() if p.rank not in findings[first_node]}
        named = [p for p in named if p.node not in kept]
    cut.named = named
    return cut
