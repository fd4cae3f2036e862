"""preprocess.locks: mutual exclusion without flock, stale-lock breaking, and an array job on storage that
refuses flock (simulated by tests/support/hooks/sitecustomize.py in every subprocess)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from basics.errors import UserError
from preprocess import format as fmt
from preprocess.locks import FileLock
from tests.support import REPO, flags

HOOKS = REPO / "tests" / "support" / "hooks"

# Each process: take the lock, check nobody else is inside (an O_EXCL marker), bump a counter
# non-atomically (read, pause, write), leave. Overlapping holders would fail the marker or lose counts.
_CONTENDER = """
import os, sys, time
from pathlib import Path
from preprocess.locks import FileLock
lock, inside, counter, rounds = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
for _ in range(rounds):
    with FileLock(lock, poll=0.001):
        fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # FileExistsError = two holders
        value = int(counter.read_text())
        time.sleep(0.002)
        counter.write_text(str(value + 1))
        os.close(fd)
        os.unlink(inside)
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HOOKS), str(REPO)]), **extra}


def test_concurrent_lockers_never_both_hold_it(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, str(tmp_path / "lock"), str(tmp_path / "inside"), str(counter), "25"],
            cwd=REPO,
            env=_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert counter.read_text() == "75"
    assert not (tmp_path / "lock").exists()


def _write_holder(path: Path, host: str, pid: int, age_s: float) -> None:
    path.write_text(json.dumps({"host": host, "pid": pid, "time": time.time() - age_s}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_of_a_dead_process_on_this_host_is_broken_with_a_warning(tmp_path: Path, capfd) -> None:
    lock = tmp_path / "lock"
    _write_holder(lock, socket.gethostname(), _dead_pid(), age_s=1)
    with FileLock(lock, timeout=30):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    err = capfd.readouterr().err
    assert err.count("warning:") == 1 and "stale lock" in err and "that process is gone" in err, err
    assert not list(tmp_path.iterdir())  # released, and the broken file was not left aside


def test_old_lock_of_another_host_is_broken_a_fresh_one_is_not(tmp_path: Path, capfd) -> None:
    lock = tmp_path / "lock"
    _write_holder(lock, "some-other-node", 12345, age_s=30)
    with FileLock(lock, stale_after=10, timeout=30):
        pass
    assert "older than 10 s" in capfd.readouterr().err

    _write_holder(lock, "some-other-node", 12345, age_s=1)
    with pytest.raises(UserError, match="pid 12345 on some-other-node"):
        with FileLock(lock, stale_after=60, timeout=0.3):
            pass
    assert json.loads(lock.read_text())["host"] == "some-other-node"  # a live holder's lock is left alone


def test_a_live_holder_on_this_host_is_waited_for(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    _write_holder(lock, socket.gethostname(), os.getpid(), age_s=0)  # alive: this very process
    with pytest.raises(UserError, match="lock held by"):
        with FileLock(lock, timeout=0.3):
            pass


def test_release_never_deletes_another_holders_lock(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    held = FileLock(lock)
    held.acquire()
    lock.unlink()  # broken as stale by someone else, who then took it
    _write_holder(lock, "other", 1, age_s=0)
    held.release()
    assert json.loads(lock.read_text())["host"] == "other"


def test_array_job_completes_where_flock_is_refused(image_folder: Path, tmp_path: Path) -> None:
    env = _env(ALEXNET_TEST_FLOCK_REFUSED="1")
    probe = subprocess.run(
        [sys.executable, "-c", "import fcntl; fcntl.flock(0, fcntl.LOCK_EX)"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode != 0 and "flock refused" in probe.stderr  # the hook is active

    def command(out: Path, *extra: str) -> list[str]:
        return [
            sys.executable,
            *flags("-m preprocess shard --src {} --out {} --split train --shard-size 3", image_folder, out),
            *flags("--workers 1 --no-progress"),
            *extra,
        ]

    reference = tmp_path / "reference"
    subprocess.run(command(reference), cwd=REPO, env=_env(), check=True, capture_output=True, timeout=120)

    out = tmp_path / "shards"
    tasks = 3
    procs = [
        subprocess.Popen(
            command(out, "--task-index", str(i), "--task-count", str(tasks)),
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(tasks)
    ]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        errors.append(err)
        assert proc.returncode == 0, err
    assert not any("Traceback" in e for e in errors), errors
    assert fmt.manifest_path(out).read_text() == fmt.manifest_path(reference).read_text()
    assert not (out / ".manifest.lock").exists()
