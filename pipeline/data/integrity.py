"""Shard integrity at training time: the bytes a rank reads are the bytes the manifest describes.

The size check in ``common.open_split`` catches truncation; a same-size corruption (a flipped bit
on a disk, a bad copy) is caught only by the sha256, which costs a full read of the shard. So each
rank hashes the shards it is about to read, and records each verified shard in ``cache`` (one
small JSON per shard, keyed by its path, holding its size, mtime and hash): while the file's size
and mtime are unchanged it is not hashed again, so a requeued run, or the next epoch, pays nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.data.common import Split
from preprocess.errors import UserError
from preprocess.files import write_json_atomic


def verify_shards(split: Split, which: Sequence[int], *, cache: Path | None) -> None:
    """Check shards ``which`` of ``split`` against their manifest sha256; raise UserError naming a mismatch."""
    for i in which:
        path, expected = split.shards[i], split.sha256[i]
        stat = path.stat()
        entry = _cache_file(cache, path) if cache is not None else None
        if entry is not None and _cached(entry, path, stat, expected):
            continue
        actual = file_sha256(path)
        if actual != expected:
            raise UserError(
                f"{path}: sha256 {actual[:16]}... does not match the manifest's {expected[:16]}... "
                f"(a corrupt copy); copy it again or re-run `python -m preprocess shard --split "
                f"{split.name}`"
            )
        if entry is not None:
            record = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": actual}
            try:
                entry.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(entry, record)
            except OSError as e:
                raise UserError(f"{entry.parent}: cannot record verified shards there ({e.strerror})") from None


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _cache_file(cache: Path, shard: Path) -> Path:
    key = hashlib.sha256(os.path.abspath(shard).encode()).hexdigest()[:32]
    return Path(cache) / f"{key}.json"


def _cached(entry: Path, path: Path, stat: os.stat_result, expected: str) -> bool:
    try:
        record = json.loads(entry.read_text())
    except (OSError, ValueError):
        return False  # no record, or a damaged one: hash again
    return (
        isinstance(record, dict)
        and record.get("path") == str(path)
        and record.get("size") == stat.st_size
        and record.get("mtime_ns") == stat.st_mtime_ns
        and record.get("sha256") == expected
    )
