"""Writing shards: the deterministic plan, atomic tar + DALI index writing, verification.

A split is cut into a *plan* first: every source item, shuffled across classes with a fixed seed
(DALI's and webdataset's shuffles are small buffers, so class-ordered shards would give
class-ordered batches), chunked into shards of ``shard_size``. Every worker and every Slurm array
task computes the same plan, so shard ``i`` always holds the same images; task ``t`` of ``N``
writes the shards ``i`` with ``i % N == t``.

A shard is written as ``.NAME.tmp.PID``, fsynced and renamed; its DALI index likewise; its
done-record (``{split}-NNNNNN.json``: sample count, sha256, skipped files) last. Only a shard
with a done-record whose checksum matches the tar counts as complete, so a crash, kill or
preemption at any point leaves nothing that looks finished, and a re-run redoes only what is
missing.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from basics.errors import UserError
from basics.files import TMP_MARK, atomic_output, file_sha256, write_bytes_atomic, write_json_atomic
from preprocess import format as fmt

TAR_BLOCK = 512
# Fixed member metadata so that the same images give byte-identical shards (and checksums) on re-runs.
_MTIME = 0


@dataclass(frozen=True)
class ShardParams:
    """What decides a split's plan and the bytes of its shards: all of it goes into plan.json."""

    split: str
    shard_size: int = 1000
    seed: int = 0
    image_size: int = fmt.IMAGE_SIZE
    quality: int = 90
    max_file_mb: int = 64  # larger source files are skipped, never read


@dataclass
class ShardPlan:
    params: ShardParams
    source: str
    classes: list[dict[str, Any]]
    shards: list[list[Any]]  # per shard, its SourceItems in write order
    fingerprint: str  # sha256 over params and the ordered keys: identifies the plan across tasks

    @property
    def num_items(self) -> int:
        return sum(len(s) for s in self.shards)

    def shard_file(self, out: Path, index: int) -> Path:
        return split_dir(out, self.params.split) / fmt.shard_name(self.params.split, index)

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": asdict(self.params),
            "source": self.source,
            "classes": self.classes,
            "num_shards": len(self.shards),
            "num_items": self.num_items,
            "fingerprint": self.fingerprint,
        }


def split_dir(out: Path, split: str) -> Path:
    return Path(out) / split


def make_plan(source: Any, source_path: str, params: ShardParams) -> ShardPlan:
    """Shuffle the source's items with the plan seed and chunk them into shards."""
    if params.shard_size < 1:
        raise UserError(f"--shard-size must be at least 1 (got {params.shard_size})")
    items = list(source.items)
    if not items:
        raise UserError(f"{source_path}: no images found for split {params.split!r}")
    random.Random(params.seed).shuffle(items)
    shards = [items[i : i + params.shard_size] for i in range(0, len(items), params.shard_size)]
    digest = hashlib.sha256(repr(sorted(asdict(params).items())).encode())
    for item in items:
        digest.update(f"{item.key}\t{item.label}\n".encode())
    return ShardPlan(params, os.path.abspath(source_path), source.classes, shards, digest.hexdigest())


def tasks_shards(num_shards: int, task_index: int, task_count: int) -> list[int]:
    """The shard indices array task ``task_index`` of ``task_count`` owns (round-robin)."""
    if task_count < 1 or not 0 <= task_index < task_count:
        raise UserError(f"--task-index {task_index} is not in [0, --task-count {task_count})")
    return list(range(task_index, num_shards, task_count))


def save_plan(out: Path, plan: ShardPlan) -> None:
    """Record the plan; a task whose plan differs from the recorded one stops instead of mixing."""
    path = split_dir(out, plan.params.split) / fmt.PLAN_NAME
    wanted = plan.to_dict()
    existing = _read_json(path)
    if existing is not None and existing.get("fingerprint") != plan.fingerprint:
        raise UserError(
            f"{path}: an earlier run planned this split from other inputs or options "
            f"(source {existing.get('source')}, params {existing.get('params')}); "
            "use the same --src/--shard-size/--seed, or delete that split's output directory"
        )
    if existing != wanted:
        write_json_atomic(path, wanted)


def read_plan(out: Path, split: str) -> dict[str, Any]:
    path = split_dir(out, split) / fmt.PLAN_NAME
    plan = _read_json(path)
    if plan is None:
        raise UserError(f"{path}: no shard plan; run `python -m preprocess shard --split {split}` first")
    return plan


def _read_json(path: Path) -> Any:
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# Writing one shard


@dataclass
class Sample:
    key: str
    label: int
    jpeg: bytes


def write_shard(path: Path, samples: Iterable[Sample]) -> tuple[int, str, int]:
    """Write a WebDataset tar and its DALI index atomically; return (samples, sha256, bytes).

    Members are plain ustar (no PAX headers: DALI 2.4's reader was seen failing on them), in
    key order ``KEY.jpg``, ``KEY.cls``. The index is written from the offsets we produce, in
    the format of DALI's ``wds2idx`` (v1.2), so readers can split shards without scanning.
    """
    path = Path(path)
    idx_path = path.with_name(fmt.index_name(path.name))
    index_lines: list[str] = []
    hasher = hashlib.sha256()
    with atomic_output(path) as tar_tmp:
        with open(tar_tmp, "wb") as raw:
            stream = _HashingWriter(raw, hasher)
            with tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for sample in samples:
                    entry = []
                    for ext, payload in ((fmt.IMAGE_EXT, sample.jpeg), (fmt.LABEL_EXT, fmt.encode_label(sample.label))):
                        name = f"{sample.key}.{ext}"
                        data_offset = tar.offset + TAR_BLOCK  # ustar: exactly one header block
                        tar.addfile(_tarinfo(name, len(payload)), io.BytesIO(payload))
                        entry.append(f"{ext} {data_offset} {len(payload)} {name}")
                    index_lines.append(" ".join(entry))
        size = tar_tmp.stat().st_size
    index = f"v1.2 {len(index_lines)}\n" + "".join(line + "\n" for line in index_lines)
    # a tar without its index is unfinished: remove_unfinished deletes both until the done-record exists
    write_bytes_atomic(idx_path, index.encode())
    return len(index_lines), hasher.hexdigest(), size


class _HashingWriter(io.RawIOBase):
    """File wrapper that hashes what is written, so the checksum costs no second read."""

    def __init__(self, raw: io.BufferedWriter, hasher: "hashlib._Hash"):
        self.raw, self.hasher = raw, hasher

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.hasher.update(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.raw.tell()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, _MTIME, 0o644
    info.uname = info.gname = ""
    return info


def remove_unfinished(directory: Path, shard_names: Sequence[str]) -> None:
    """Delete what a killed or interrupted run left of the shards this task owns (never another task's):
    temporaries, and a tar or index whose done-record was never written."""
    owned = {f".{name}" for name in shard_names} | {f".{fmt.index_name(name)}" for name in shard_names}
    owned |= {f".{fmt.done_name(name)}" for name in shard_names}
    for entry in directory.iterdir():
        if TMP_MARK in entry.name and entry.name.split(TMP_MARK, 1)[0] in owned:
            entry.unlink(missing_ok=True)
    for name in shard_names:
        if not (directory / fmt.done_name(name)).exists():
            (directory / name).unlink(missing_ok=True)
            (directory / fmt.index_name(name)).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Done-records and verification


def read_done(shard_path: Path) -> dict[str, Any] | None:
    return _read_json(shard_path.with_name(fmt.done_name(shard_path.name)))


def verify_shard(shard_path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The shard's done-record if the shard is complete and intact for this plan, else None."""
    done = read_done(shard_path)
    if done is None or done.get("plan") != fingerprint:
        return None
    idx = shard_path.with_name(fmt.index_name(shard_path.name))
    try:
        if shard_path.stat().st_size != done["bytes"] or not idx.exists():
            return None
    except FileNotFoundError:
        return None
    if file_sha256(shard_path) != done["sha256"]:
        return None
    return done


def process_shard(out: Path, plan_dict: dict[str, Any], index: int, items: Sequence[Any]) -> dict[str, Any]:
    """Transform a shard's source images and write the shard; images that fail are recorded, not fatal."""
    from preprocess import image, sources

    params = ShardParams(**plan_dict["params"])
    path = split_dir(out, params.split) / fmt.shard_name(params.split, index)
    skipped: list[dict[str, str]] = []
    max_bytes = params.max_file_mb << 20

    def samples() -> Iterable[Sample]:
        for item in items:
            try:
                data = item.read(max_bytes)
                jpeg = image.process(data, size=params.image_size, quality=params.quality)
            except (image.BadImage, sources.SkippedFile) as e:
                skipped.append({"file": item.origin, "reason": str(e)})
                continue
            except OSError as e:
                skipped.append({"file": item.origin, "reason": f"unreadable ({e.strerror or e})"})
                continue
            yield Sample(item.key, item.label, jpeg)

    done_path = path.with_name(fmt.done_name(path.name))
    try:
        count, sha, size = write_shard(path, samples())
        done = {
            "shard": path.name,
            "plan": plan_dict["fingerprint"],
            "samples": count,
            "sha256": sha,
            "bytes": size,
            "skipped": skipped,
        }
        write_json_atomic(done_path, done)
    except BaseException as e:
        if not done_path.exists():  # a shard is complete with its done-record, or not there at all
            path.unlink(missing_ok=True)
            path.with_name(fmt.index_name(path.name)).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"{path}: no space left on the output device; free space and re-run "
                "(completed shards are kept and skipped)"
            ) from None
        raise
    return done
