"""Files that appear complete or not at all: temporary name, (fsync), rename, (fsync of the directory).

Every file the project writes for someone else to read (a shard, a manifest, a checkpoint's metadata, a
progress record another rank polls, a cache entry a racing thread may read) goes through
:func:`atomic_output`, or :func:`write_bytes_atomic` / :func:`write_json_atomic` built on it, so a reader
never sees half a file and a kill never leaves one under the final name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from basics.errors import UserError

TMP_MARK = ".tmp."  # in every temporary name: `.NAME.tmp.PID.THREAD`, so a clean-up can recognise them


def tmp_name(path: Path) -> Path:
    """The temporary name beside ``path``: hidden, unique per process and thread (racing writers never share one)."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}.{threading.get_ident()}")


@contextmanager
def atomic_output(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes ``path`` by one rename, on any error it is removed.

    ``durable``: fsync the file and then the directory, so the rename survives a power loss (checkpoints,
    shards, manifests). Off for files that are rewritten every few seconds and only matter while the run lives
    (progress records, findings): a rename is still atomic for readers without it.
    A full disk becomes a :class:`UserError` naming ``path``.
    """
    path = Path(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"{path}: no space left on the device; free space and re-run (everything already complete is kept)"
            ) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``path`` so that it appears complete or not at all."""
    with atomic_output(path, durable=durable) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, obj: Any, *, durable: bool = True, indent: int | None = 1) -> None:
    text = json.dumps(obj, indent=indent) + ("\n" if indent is not None else "")
    write_bytes_atomic(path, text.encode(), durable=durable)


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    """The file's sha256 (hex), read in 8 MiB blocks: shards and checkpoints run to gigabytes."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            hasher.update(block)
    return hasher.hexdigest()


def append_json_line(path: str | Path, obj: Any) -> None:
    """Append ``obj`` as one JSON line to a journal several processes write (crashes, bad batches, the node
    ledger): one ``write`` on an ``O_APPEND`` descriptor, so lines from racing writers never interleave and a
    kill leaves at most a last line cut short, which :func:`read_json_lines` skips."""
    line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_json_lines(path: str | Path) -> list[Any]:
    """Every whole line of a journal written by :func:`append_json_line` (none if it does not exist)."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return records
