"""A lock file that works on every filesystem a cluster job writes to, flock or not.

``fcntl.flock`` is refused by Lustre mounted without ``-o flock`` (ENOSYS) and is unreliable on
some NFS setups, so the lock is an exclusive create (``O_CREAT | O_EXCL``, atomic on local
filesystems, NFSv3+, Lustre, GPFS) of a small file naming its holder (host, pid, time). It is
released by deleting that file. A holder that died leaves its file behind; such a lock is *stale*
and is broken with a warning when its holder is on this host and its pid is gone, or when it is
older than ``stale_after`` seconds (holders keep it for well under a second; another host's pid
cannot be checked). Breaking renames the stale file away and checks that the file moved is the
one judged stale (a fresh lock moved by mistake is linked back), so two waiters that both judge a
lock stale do not both end up holding it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from basics.errors import UserError

STALE_AFTER_S = 300.0
_SAY_WAITING_AFTER_S = 10.0


class FileLock:
    """``with FileLock(path):`` holds the lock; waits (polling) while another process holds it."""

    def __init__(
        self, path: str | Path, *, stale_after: float = STALE_AFTER_S, timeout: float | None = None, poll: float = 0.05
    ):
        self.path = Path(path)
        self.stale_after = stale_after
        self.timeout = timeout  # None: wait until the holder releases it or it goes stale
        self.poll = poll
        # Kept open while held, so that the inode cannot be freed and reused: release compares inodes.
        self._fd: int | None = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        started = time.monotonic()
        delay, said = self.poll, False
        while not self._try_create():
            self._break_if_stale()
            waited = time.monotonic() - started
            if self.timeout is not None and waited > self.timeout:
                raise UserError(
                    f"{self.path}: lock held by {_describe(_read_holder(self.path))} for more than "
                    f"{self.timeout:.0f} s; if that process is gone, delete {self.path}"
                )
            if waited > _SAY_WAITING_AFTER_S and not said:
                print(
                    f"waiting for {self.path}, held by {_describe(_read_holder(self.path))}",
                    file=sys.stderr,
                    flush=True,
                )
                said = True
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def release(self) -> None:
        if self._fd is None:
            return
        # Delete only our own file: if ours was broken as stale, the file there now is another holder's.
        try:
            if _same_file(os.stat(self.path), os.fstat(self._fd)):
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            holder = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
            os.write(fd, json.dumps(holder).encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        self._fd = fd
        return True

    def _break_if_stale(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:  # fd stays open until the end, so the judged file's inode cannot be reused meanwhile
            judged = os.fstat(fd)
            try:
                holder = _parse_holder(os.read(fd, 4096))
            except OSError:  # not a file we wrote (e.g. a directory someone made there): judged by age
                holder = None
            why = self._stale_reason(holder, judged.st_mtime)
            if why is None:
                return
            aside = self.path.with_name(f"{self.path.name}.stale.{socket.gethostname()}.{os.getpid()}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return  # another waiter broke it first
            if not _same_file(os.stat(aside), judged):
                # Between our look and the rename, someone broke the stale lock and took a fresh one:
                # put theirs back (link fails rather than replace a lock taken meanwhile).
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                os.unlink(aside)
                return
            os.unlink(aside)
        finally:
            os.close(fd)
        print(
            f"warning: {self.path}: broke a stale lock held by {_describe(holder)} ({why})", file=sys.stderr, flush=True
        )

    def _stale_reason(self, holder: dict | None, mtime: float) -> str | None:
        age = time.time() - (holder or {}).get("time", mtime)
        if age > self.stale_after:
            return f"older than {self.stale_after:.0f} s"
        if holder and holder["host"] == socket.gethostname() and not _alive(holder["pid"]):
            return "that process is gone"
        return None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _parse_holder(raw: bytes) -> dict | None:
    """The holder record, or None if it is being written right now or damaged (then judged by its age)."""
    try:
        holder = json.loads(raw)
        return {"host": str(holder["host"]), "pid": int(holder["pid"]), "time": float(holder["time"])}
    except (ValueError, TypeError, KeyError):
        return None


def _read_holder(path: Path) -> dict | None:
    try:
        return _parse_holder(path.read_bytes()[:4096])
    except OSError:
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "an unknown process"
    try:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["time"]))
    except (OverflowError, OSError, ValueError):
        when = "an unknown time"
    return f"pid {holder['pid']} on {holder['host']} since {when}"
