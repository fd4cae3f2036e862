"""Shard integrity at training time: the bytes a rank reads are the bytes the manifest describes.

The size check in ``dataset.open_split`` catches truncation; a same-size corruption (a flipped bit
on a disk, a bad copy) is caught only by the sha256, which costs a full read of the shard (~40 GB
for ImageNet). So before a rank reads a shard it makes sure that the shard has been hashed since
its bytes last changed:

- **Remembered per dataset**, not per run: one small record per shard in the dataset's cache
  (:func:`dataset_cache`: ``DATA/.alexnet-cache``, or a user cache directory when the dataset
  is read-only), holding the sha256 it matched and the file's size, mtime, ctime and inode. A
  record counts only while all four are unchanged: writing the file changes mtime and ctime, and
  resetting the mtime (``touch -d``, ``os.utime``) changes the ctime, which no user can set; a
  copy over it is a new inode. So a second run, an ablation, or the next epoch hashes nothing,
  and a shard whose bytes changed is hashed again before it is read. (Bits that rot on the disk
  without any write are not seen by any stat: delete the cache directory to re-hash everything.)
- **In parallel**: a pool of threads per rank (``hashlib`` releases the GIL while it hashes).
- **Split between the ranks that read the same shards** (the two ranks of a tensor-parallel pair
  read identical shards; the ranks of a node share the dataset's cache): a shard is hashed under
  an exclusive ``flock`` on its lock file, taken without waiting; a rank that finds it taken goes
  on to the next shard and comes back at the end, when the holder has written its record (the
  kernel drops the lock of a holder that died, and the waiter then hashes the shard itself).
  The lock only saves work, correctness never depends on it: where ``flock`` is refused (Lustre
  without ``-o flock``) every rank hashes what it reads, as before.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from basics.errors import UserError
from basics.files import file_sha256, write_json_atomic
from pipeline.data.dataset import Split
from preprocess import format as fmt

CACHE_NAME = ".alexnet-cache"  # inside the dataset directory, when it is writable
_HASH_THREADS = 8  # at most; hashing is disk- or memory-bound well before this many cores

Signature = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode


class Cancelled(Exception):
    """Raised inside :func:`verify_shards` when its ``cancel`` event is set (an epoch prepared ahead, not needed)."""


@dataclass
class Verified:
    """What :func:`verify_shards` did, and the file signatures it vouches for."""

    hashed: list[int] = field(default_factory=list)  # shards this process hashed
    recorded: list[int] = field(default_factory=list)  # found verified (an earlier run, or another rank)
    signatures: dict[int, Signature] = field(default_factory=dict)

    def changed(self, split: Split) -> list[int]:
        """The shards whose files changed since they were verified (a stat each: cheap)."""
        return [i for i, sig in self.signatures.items() if _signature(os.stat(split.shards[i])) != sig]


def user_cache_root() -> Path:
    """``$XDG_CACHE_HOME/alexnet`` (default ``~/.cache/alexnet``): per user, for read-only datasets."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "alexnet"


def dataset_cache(root: Path) -> Path:
    """Where the verified-shard records (and the parsed index files) of the dataset at ``root`` live.

    Created if needed: ``root/.alexnet-cache`` when the dataset directory is writable, so every user and run of the
    dataset shares it; else a directory under :func:`user_cache_root` named by the manifest's path
    and contents (a re-sharded dataset gets a fresh one).
    """
    inside = Path(root) / CACHE_NAME
    try:
        inside.mkdir(exist_ok=True)
        if os.access(inside, os.W_OK):
            return inside
    except OSError:
        pass  # a read-only dataset directory
    manifest = fmt.manifest_path(Path(root))
    identity = hashlib.sha256(os.path.abspath(manifest).encode() + b"\0" + manifest.read_bytes()).hexdigest()
    fallback = user_cache_root() / "datasets" / identity[:32]
    try:
        fallback.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"{fallback}: cannot record verified shards ({e.strerror}); {root} is read-only, so set "
            "XDG_CACHE_HOME to a writable directory (or use --data.verify size)"
        ) from None
    return fallback


def verify_shards(
    split: Split,
    which: Sequence[int],
    *,
    cache: Path | None,
    threads: int = _HASH_THREADS,
    cancel: threading.Event | None = None,
) -> Verified:
    """Check shards ``which`` of ``split`` against their manifest sha256; raise UserError naming a mismatch.

    ``cache`` is the records directory (:func:`dataset_cache`); ``None`` hashes every shard and
    remembers nothing.
    """
    done = Verified()
    lock = threading.Lock()
    if cache is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{cache}: cannot record verified shards there ({e.strerror})") from None

    def check(i: int, wait: bool) -> bool:
        if cancel is not None and cancel.is_set():
            raise Cancelled
        outcome = _check(split, i, cache, wait=wait)
        if outcome is None:
            return False  # another rank is hashing it: come back later
        how, sig = outcome
        with lock:
            (done.hashed if how == "hashed" else done.recorded).append(i)
            done.signatures[i] = sig
        return True

    todo = list(dict.fromkeys(int(i) for i in which))
    with ThreadPoolExecutor(max(1, min(threads, len(todo)))) as pool:
        first = list(pool.map(lambda i: check(i, wait=False), todo))
        later = [i for i, ok in zip(todo, first) if not ok]
        list(pool.map(lambda i: check(i, wait=True), later))
    return done


def _check(split: Split, i: int, cache: Path | None, *, wait: bool) -> tuple[str, Signature] | None:
    """("recorded"|"hashed", the signature vouched for); None when another rank holds the shard's lock."""
    path, expected = split.shards[i], split.sha256[i]
    record = _record_file(cache, split, i) if cache is not None else None
    if record is not None:
        sig = _signature(path.stat())
        if _recorded(record, sig, expected):
            return "recorded", sig
    with _hash_lock(record, wait=wait) as held:
        if not held:
            return None
        sig = _signature(path.stat())  # before reading: a write during the hash changes it, so it re-hashes
        if record is not None and _recorded(record, sig, expected):
            return "recorded", sig  # the rank that held the lock has just verified it
        actual = file_sha256(path)
        if actual != expected:
            raise UserError(
                f"{path}: sha256 {actual[:16]}... does not match the manifest's {expected[:16]}... "
                f"(a corrupt copy); copy it again or re-run `python -m preprocess shard --split "
                f"{split.name}`"
            )
        if record is not None:
            size, mtime_ns, ctime_ns, inode = sig
            entry = {
                "path": os.path.relpath(path, split.root),
                "sha256": actual,
                "size": size,
                "mtime_ns": mtime_ns,
                "ctime_ns": ctime_ns,
                "inode": inode,
            }
            try:
                write_json_atomic(record, entry)
            except OSError as e:
                raise UserError(f"{record.parent}: cannot record verified shards there ({e.strerror})") from None
        return "hashed", sig


@contextmanager
def _hash_lock(record: Path | None, *, wait: bool) -> Iterator[bool]:
    """Hold the shard's hashing lock (True), or find it held by another process (False)."""
    if record is None:
        yield True
        return
    fd = os.open(record.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                yield False
                return
            if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                raise
            # flock refused by this filesystem: hash without sharing the work (still correct).
        yield True
    finally:
        os.close(fd)  # releases the lock


def _signature(stat: os.stat_result) -> Signature:
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def _record_file(cache: Path, split: Split, i: int) -> Path:
    relative = os.path.relpath(split.shards[i], split.root)
    return Path(cache) / f"{hashlib.sha256(relative.encode()).hexdigest()[:32]}.json"


def _recorded(record: Path, sig: Signature, expected: str) -> bool:
    try:
        entry = json.loads(record.read_text())
    except (OSError, ValueError):
        return False  # no record, or a damaged one: hash again
    size, mtime_ns, ctime_ns, inode = sig
    return (
        isinstance(entry, dict)
        and entry.get("sha256") == expected
        and entry.get("size") == size
        and entry.get("mtime_ns") == mtime_ns
        and entry.get("ctime_ns") == ctime_ns
        and entry.get("inode") == inode
    )
