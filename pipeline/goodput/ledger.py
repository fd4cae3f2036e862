"""The goodput ledger's file: append-only JSON lines that survive a SIGKILL at any moment.

Each record is one ``os.write`` of one whole line to a descriptor opened with ``O_APPEND``: the kernel
places it at the end in one piece, so a process killed at any instant leaves either the whole line or
(on a write cut short by a full disk or a crash of the machine) a torn last line without its newline.
Readers skip a torn or unparsable line; a writer that finds the file not ending in a newline first ends
it, so the torn line never swallows the next record. ``durable`` records (an attempt's start and end, and
one every ``FSYNC_S``) are fsynced: a machine that loses power keeps what an attempt said at its borders.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FSYNC_S = 30.0  # at most this long between fsyncs of periodic records (a process kill loses nothing anyway)


class Ledger:
    """One run's ledger file, opened for appending (global rank 0 only writes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._synced = time.monotonic()
        if os.fstat(self._fd).st_size and not self.path.read_bytes().endswith(b"\n"):
            os.write(self._fd, b"\n")  # a torn line from a killed writer: ended, skipped by readers

    def append(self, record: dict[str, Any], *, durable: bool = False) -> None:
        line = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
        os.write(self._fd, line)  # one write of one whole line (O_APPEND): never interleaved, never half-placed
        if durable or time.monotonic() - self._synced >= FSYNC_S:
            os.fsync(self._fd)
            self._synced = time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every whole record in order; a torn or unparsable line is skipped (none, if the file is missing)."""
    return list(_records(Path(path)))


def _records(path: Path) -> Iterator[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    lines = data.split(b"\n")
    for line in lines[:-1]:  # the last piece has no newline: empty, or torn by a kill mid-write
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "kind" in record:
            yield record
