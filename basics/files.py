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
