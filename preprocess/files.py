"""Files that appear complete or not at all: temporary name, fsync, rename, fsync of the directory."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from preprocess.errors import UserError


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``path`` so that it appears complete or not at all (tmp name, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
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
    fsync_dir(path.parent)


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())
