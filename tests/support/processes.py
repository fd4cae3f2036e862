"""Processes for the end-to-end tests: an environment, a free port, waiting for a state with a deadline,
running a command to completion with its log, and killing a whole process tree (torchrun's workers live in
sessions of their own)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support import REPO

# --------------------------------------------------------------------------------------------
# Processes


def small_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment with one OpenMP thread and the repository importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


def interruptible() -> None:
    """``preexec_fn`` for a process a test interrupts: SIGINT at its default, as in a terminal's foreground
    job. A suite started in the background by a non-interactive shell (``nohup make test &``) passes
    SIGINT down ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return []


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found, then theirs), from /proc."""
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def environ(pid: int) -> dict[str, str]:
    """The environment ``pid`` started with ({} once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def rank_of(pid: int) -> int | None:
    """The ``RANK`` torchrun gave worker ``pid`` (None: not a worker, or gone)."""
    env = environ(pid)
    return int(env["RANK"]) if "RANK" in env else None


def resume(*pids: int | None) -> None:
    """SIGCONT to each stopped process still there (None: none was stopped), so that it can be ended."""
    for pid in pids:
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_group(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """TERM, then KILL, ``proc`` (started with start_new_session=True), its group and all its descendants.

    torchrun starts its workers in sessions of their own, so the group alone misses them; and the
    trainer turns SIGTERM into a stop request, so a worker stuck in a collective ignores it: whatever
    is below ``proc`` (collected before anything dies and is re-parented) gets SIGKILL in the end.
    """
    below = descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    below += [p for p in (descendants(proc.pid) if proc.poll() is None else []) if p not in below]
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _signal(below, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=5)


def wait_for(
    predicate: Any, timeout: float, what: str, proc: subprocess.Popen[Any] | None = None, poll: float = 0.05
) -> Any:
    """Poll ``predicate()`` until it is truthy (its value); fail after ``timeout`` s or if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def start_logged(
    argv: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path = REPO, **popen: Any
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own (``kill_group`` ends it), stdout+stderr appended to ``log``, no
    stdin; ``popen`` adds Popen's other arguments (``preexec_fn=interruptible``)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen,
        )


def run_captured(
    argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run to completion in the repository (``small_env()`` unless ``env``), no stdin, its output captured as text."""
    return subprocess.run(
        list(argv),
        cwd=REPO,
        env=dict(env) if env is not None else small_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_logged(argv: Sequence[str], log: Path, env: Mapping[str, str], timeout: float, cwd: Path = REPO) -> int:
    """Run to completion with stdout+stderr into ``log``; kill its whole group on timeout."""
    proc = start_logged(argv, log, env, cwd)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"{' '.join(argv[:4])} ... ran past {timeout:.0f} s:\n{tail(log)}") from None
    finally:
        if proc.poll() is None:
            kill_group(proc)


def wait_all(
    procs: Mapping[str, subprocess.Popen[Any]], logs: Mapping[str, Path], timeout: float
) -> tuple[dict[str, int | None], str]:
    """Wait for every process (by name) within one deadline, then kill those still running: their exit codes
    (None: killed here) and a report of each log's tail for an assertion."""
    deadline = time.monotonic() + timeout
    for proc in procs.values():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    codes = {name: proc.poll() for name, proc in procs.items()}
    report = "\n".join(f"--- {name} (exit {codes[name]})\n{tail(logs[name])}" for name in logs)
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
    return codes, report


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return f"({path} missing)"
