"""Emulated nodes on one host: Linux network namespaces joined by a veth pair or a bridge (no pytest here).

    with NodePair() as pair:                       # root (CAP_NET_ADMIN, CAP_SYS_ADMIN)
        a, b = pair.nodes                          # node-a 10.231.7.1, node-b 10.231.7.2
        proc = pair.popen(a, ["python", "-c", "..."], stdout=..., stderr=...)
        pair.run(b, ["ping", "-c1", a.addr], timeout=10)
    # torn down: every process in either namespace killed, namespaces (and so the veth pair) deleted

Each node is its own network namespace (lo + one end of the veth pair, a /30 that exists only inside
the two namespaces, no route anywhere else), with its own hostname (a UTS namespace) and its own
/etc/hosts (a mount namespace with a bind mount) naming both nodes, so the node's hostname resolves
to its veth address the way it does on a real cluster. Commands run as
`ip netns exec NS unshare --uts --mount ... sh -c 'mount --bind HOSTS /etc/hosts; hostname NAME; exec CMD'`.
Nothing on the host changes besides the two namespaces, which `down` (and the context manager, and
the next `up` for namespaces of dead processes) removes.

`NodeGroup(n)` makes `n` nodes the same way, each with a veth pair to one bridge that lives in a namespace of
its own (the "switch", never a node's and never the host's), in a private /24: the chaos campaign's four
nodes (tests/support/chaos.py). `set_link(node, False)` cuts a node off the switch in both cases.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "alexnet-"  # namespace names: alexnet-<tag>-a, alexnet-<tag>-b, ... (a group's switch: -<tag>-z)
_STALE = re.compile(rf"^{re.escape(PREFIX)}[a-z]?(\d+)-[a-z]$")  # the tag is (a letter and) the pid
_SWITCH = "z"  # the suffix of a NodeGroup's bridge namespace (so at most 25 nodes: a..y)


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no CAP_NET_ADMIN, no veth, no ip/unshare)."""


@dataclass(frozen=True)
class Node:
    hostname: str  # inside the node: `hostname` prints it, /etc/hosts resolves it to `addr`
    netns: str  # the network namespace's name (`ip netns exec NETNS ...`)
    addr: str  # the node's address on the veth pair
    ifname: str  # the node's end of the veth pair (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)


def _ip(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], text=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(netns: str) -> list[int]:
    proc = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()] if proc.returncode == 0 else []


def _kill_netns_processes(netns: str, grace: float = 3.0) -> None:
    """TERM every process in the namespace, then KILL what is left after `grace` seconds."""
    pids = _netns_pids(netns)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = _netns_pids(netns)
        if not pids:
            return


def delete_netns(netns: str) -> None:
    """Kill its processes and delete the namespace (and the veth end in it); quiet if absent."""
    _kill_netns_processes(netns)
    _ip("netns", "del", netns, check=False)


def remove_stale() -> None:
    """Namespaces left by earlier runs whose process is gone (a killed test session)."""
    proc = _ip("netns", "list", check=False)
    for line in proc.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _STALE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            delete_netns(name)


class _Nodes:
    """What every set of emulated nodes shares: the namespaces' lifecycle, the hosts file, running commands.
    A subclass names its nodes and wires them (`_wire`, `_links`)."""

    prefix_len: int
    nodes: tuple[Node, ...]

    def __init__(self, tag: str | None) -> None:
        tag = tag or str(os.getpid())
        if not re.fullmatch(r"[0-9a-z]{1,9}", tag):
            raise ValueError(f"tag must be 1-9 lowercase letters/digits (veth names are <= 15 chars): {tag!r}")
        self.tag = tag
        self._procs: list[subprocess.Popen[Any]] = []
        self._workdir: Path | None = None
        self._up = False

    def _namespaces(self) -> list[str]:
        return [node.netns for node in self.nodes]

    def _wire(self) -> None:
        raise NotImplementedError

    def _links(self) -> list[tuple[str, str]]:
        """(namespace, interface) of each end that must be up before traffic passes."""
        return [(node.netns, node.ifname) for node in self.nodes]

    # --- lifecycle -------------------------------------------------------------------------------

    def up(self) -> "_Nodes":
        for tool in ("ip", "unshare", "mount", "hostname"):
            if not shutil.which(tool):
                raise NetnsUnavailable(f"`{tool}` is not installed")
        remove_stale()
        for netns in self._namespaces():  # a leftover of the same name (same pid, earlier run in-process)
            delete_netns(netns)
        self._up = True
        try:
            for netns in self._namespaces():
                _ip("netns", "add", netns)
            self._wire()
            for node in self.nodes:
                _ip("-n", node.netns, "link", "set", "lo", "up")
                _ip("-n", node.netns, "addr", "add", f"{node.addr}/{self.prefix_len}", "dev", node.ifname)
                _ip("-n", node.netns, "link", "set", node.ifname, "up")
            self._workdir = Path(tempfile.mkdtemp(prefix=f"netns-{self.tag}-"))
            hosts = "127.0.0.1 localhost\n" + "".join(f"{n.addr} {n.hostname}\n" for n in self.nodes)
            (self._workdir / "hosts").write_text(hosts)
            # The veth pairs may need a moment before they pass traffic.
            for netns, ifname in self._links():
                self._wait_link(netns, ifname)
        except BaseException:
            self.down()
            raise
        return self

    @staticmethod
    def _wait_link(netns: str, ifname: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            state = _ip("-n", netns, "-o", "link", "show", ifname, check=False).stdout
            if "LOWER_UP" in state or "state UP" in state:
                return
            if time.monotonic() > deadline:
                raise NetnsUnavailable(f"veth {ifname} did not come up: {state.strip()}")
            time.sleep(0.05)

    def down(self) -> None:
        """Kill every process started here and everything else in the namespaces; delete them."""
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        if self._up:
            for netns in self._namespaces():
                delete_netns(netns)
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._up = False

    def __enter__(self):  # the subclass's own type, for `with NodePair() as pair:`
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def set_link(self, node: Node, up: bool) -> None:
        """The node's end of its veth pair up, or down: a cut link (no packet passes either way)."""
        _ip("-n", node.netns, "link", "set", node.ifname, "up" if up else "down")

    # --- running commands on a node --------------------------------------------------------------

    def command(self, node: Node, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` on `node` (its netns, hostname and /etc/hosts)."""
        if not self._up or self._workdir is None:
            raise RuntimeError("NodePair is not up")
        script = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
        return [
            "ip",
            "netns",
            "exec",
            node.netns,
            "unshare",
            "--uts",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(self._workdir / "hosts"),
            node.hostname,
            *argv,
        ]

    def popen(
        self, node: Node, argv: Sequence[str], env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start `argv` on `node` in a new session (its own process group); `down` kills it."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(
            self.command(node, argv), env=dict(env) if env is not None else None, start_new_session=True, **kwargs
        )
        self._procs.append(proc)
        return proc

    def run(
        self, node: Node, argv: Sequence[str], timeout: float = 30, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` on `node` to completion (text output captured); kill it on timeout."""
        proc = self.popen(node, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise
        finally:
            if proc.poll() is not None and proc in self._procs:
                self._procs.remove(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class NodePair(_Nodes):
    """Two emulated nodes, `nodes[0]` and `nodes[1]`, linked by a veth pair in a private /30."""

    def __init__(
        self, tag: str | None = None, subnet: str = "10.231.7", hostnames: Sequence[str] = ("node-a", "node-b")
    ):
        super().__init__(tag)
        self.nodes = tuple(
            Node(hostname=h, netns=f"{PREFIX}{self.tag}-{s}", addr=f"{subnet}.{i + 1}", ifname=f"ax{self.tag}{s}")
            for i, (h, s) in enumerate(zip(hostnames, "ab"))
        )
        self.prefix_len = 30

    def _wire(self) -> None:
        a, b = self.nodes
        _ip("link", "add", a.ifname, "netns", a.netns, "type", "veth", "peer", "name", b.ifname, "netns", b.netns)

    def _links(self) -> list[tuple[str, str]]:
        a = self.nodes[0]
        return [(a.netns, a.ifname)]


class NodeGroup(_Nodes):
    """`count` emulated nodes (node-a, node-b, ...; `subnet`.1, .2, ...) on one bridge in a private /24.

    The bridge lives in a namespace of its own (`alexnet-<tag>-z`), each node reaches it over a veth pair
    (`ax<tag><letter>` in the node, `ax<tag><letter>s` at the switch): cutting one node's link leaves the
    others talking to each other, as a failed cable or NIC does on a cluster."""

    def __init__(self, count: int, tag: str | None = None, subnet: str = "10.231.9"):
        if not 2 <= count <= 25:
            raise ValueError(f"a NodeGroup has 2 to 25 nodes, not {count}")
        super().__init__(tag)
        letters = "abcdefghijklmnopqrstuvwxy"[:count]
        self.nodes = tuple(
            Node(
                hostname=f"node-{s}",
                netns=f"{PREFIX}{self.tag}-{s}",
                addr=f"{subnet}.{i + 1}",
                ifname=f"ax{self.tag}{s}",
            )
            for i, s in enumerate(letters)
        )
        self.switch = f"{PREFIX}{self.tag}-{_SWITCH}"
        self.bridge = f"ax{self.tag}br"
        self.prefix_len = 24

    def _namespaces(self) -> list[str]:
        return [*super()._namespaces(), self.switch]

    def _wire(self) -> None:
        _ip("-n", self.switch, "link", "add", self.bridge, "type", "bridge")
        _ip("-n", self.switch, "link", "set", self.bridge, "up")
        for node in self.nodes:
            port = f"{node.ifname}s"
            _ip(
                "link",
                "add",
                node.ifname,
                "netns",
                node.netns,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                self.switch,
            )
            _ip("-n", self.switch, "link", "set", port, "master", self.bridge)
            _ip("-n", self.switch, "link", "set", port, "up")

    def _links(self) -> list[tuple[str, str]]:
        return [*super()._links(), *((self.switch, f"{n.ifname}s") for n in self.nodes)]


def netns_skip_reason() -> str | None:
    """Why emulated nodes cannot be made here (tried: namespaces, veth, hostname, bind mount); else None."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN); run the tests as root"
    try:
        with NodePair(tag=f"p{os.getpid() % 10**8}") as pair:
            proc = pair.run(pair.nodes[0], ["hostname"], timeout=10)
            if proc.returncode != 0 or proc.stdout.strip() != pair.nodes[0].hostname:
                return f"cannot run a command in a network namespace: {proc.stderr.strip() or proc.stdout.strip()}"
    except NetnsUnavailable as e:
        return f"network namespaces are not permitted here: {e}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"network namespaces are not usable here: {e}"
    return None
