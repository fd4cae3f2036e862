"""What must not grow with the dataset (issue 21), at reduced size: the epoch plan's memory, the
shard hashing (remembered per dataset, split between ranks), and the next epoch prepared ahead.

A dataset of ~100k samples is a few real shards hard-linked many times (``preprocess replicate``),
which is how the benchmark makes ImageNet's 1.28M.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from basics.errors import UserError
from pipeline import data as D
from pipeline.data import integrity
from pipeline.data.dataset import Split, open_split
from pipeline.data.epoch_plan import plan_epoch
from pipeline.data.index_cache import index_rows, read_index
from preprocess import format as fmt
from preprocess.__main__ import main as preprocess_main
from preprocess.replicate import replicate
from tests.support import flags
from tests.support.data_scale import _epoch, cfg_for


@pytest.fixture(scope="module")
def big(small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("big") / "data"
    assert preprocess_main(flags("replicate --src {} --out {} --samples 100000", small, out)) == 0
    return out


# --------------------------------------------------------------------------------------------
# preprocess replicate


def test_replicate_links_shards_up_to_the_count_and_the_loaders_read_it(small: Path, big: Path) -> None:
    manifest = fmt.read_manifest(big)
    train = manifest.split("train")
    assert train.samples == sum(s.samples for s in train.shards) >= 100_000
    assert train.samples - 100_000 < 300, "whole shards, no more than needed"
    source = fmt.read_manifest(small).split("train").shards
    for i, shard in enumerate(train.shards):
        original = source[i % len(source)]
        assert os.path.samefile(big / shard.path, small / original.path), "a hard link, not a copy"
        assert os.path.samefile(big / shard.index, small / original.index)
        assert (shard.sha256, shard.bytes, shard.samples) == (original.sha256, original.bytes, original.samples)
    assert manifest.split("val").samples >= 50_000
    # The loaders take it as a dataset: hashes match, batches come.
    images, labels = next(
        iter(D.train_loader(cfg_for(big), dp_rank=3, dp_size=4, epoch=0, seed=0, device="cpu", batch_size=8))
    )
    assert images.shape == (8, 3, 227, 227) and labels.max() < 7
    # Not over an existing dataset, and a clear line for a source that is not one.
    with pytest.raises(UserError, match="already a dataset"):
        replicate(small, big, {"train": 10})
    with pytest.raises(UserError, match="no manifest"):
        replicate(big / "train", big.parent / "other", {"train": 10})


# --------------------------------------------------------------------------------------------
# The epoch plan: numpy columns, nothing per sample in Python


def test_plan_holds_no_per_sample_python_objects(big: Path) -> None:
    split, norm = D.open_dataset(cfg_for(big), "train")
    n = split.total
    plan_epoch(split, norm, dp_rank=0, dp_size=1, seed=0, train=True)  # imports, caches
    tracemalloc.start()
    try:
        plan = plan_epoch(split, norm, dp_rank=0, dp_size=1, seed=1, train=True)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(plan) == n
    for f in dataclasses.fields(plan):
        value = getattr(plan, f.name)
        if isinstance(value, np.ndarray):
            assert value.dtype != object and len(value) == n, f.name
        else:  # anything else is per shard, not per sample
            assert len(value) == len(split.shards) < n / 100, f"Plan.{f.name} grows with the samples"
    assert (plan.shard.dtype, plan.jpg.dtype, plan.cls.dtype) == (np.int32, np.int64, np.int64)
    assert (plan.x.dtype, plan.mirror.dtype, plan.offset.dtype) == (np.int32, np.bool_, np.float32)
    # 61 bytes a sample in the columns; a key string or tuple per sample costs 50-100 more.
    assert held / n < 64, f"the plan keeps {held / n:.0f} bytes a sample"
    assert peak / n < 100, f"building the plan peaks at {peak / n:.0f} bytes a sample"
    # Keys are still there for messages, read from the index on demand.
    i = int(np.flatnonzero(plan.shard == 0)[0])
    assert plan.key(i) == index_rows(split.indexes[0])[int(np.flatnonzero(_offsets(split, 0) == plan.jpg[i, 0])[0])][0]


def _offsets(split: Split, shard: int) -> np.ndarray:
    return read_index(split.indexes[shard])[:, 0]


def test_fast_index_parse_equals_the_line_parser(small: Path, tmp_path: Path) -> None:
    index = small / "train" / fmt.index_name(fmt.shard_name("train", 0))
    rows = index_rows(index)
    assert read_index(index).tolist() == [list(r[1:]) for r in rows]
    # Another member order (DALI's wds2idx may write cls first) takes the general path, same numbers.
    lines = index.read_text().splitlines()
    swapped = [lines[0]] + [" ".join(line.split()[4:] + line.split()[:4]) for line in lines[1:]]
    other = tmp_path / "other.idx"
    other.write_text("\n".join(swapped) + "\n")
    assert read_index(other).tolist() == [list(r[1:]) for r in rows]
    # Cached parses: used while the index is unchanged, parsed again when it is rewritten.
    cache = tmp_path / "index-cache"
    cache.mkdir()
    copied = tmp_path / "copied.idx"
    shutil.copy(index, copied)
    assert read_index(copied, cache).tolist() == read_index(copied, cache).tolist() == read_index(index).tolist()
    assert len(list(cache.glob("*.npy"))) == 1
    first_row = lines[1].split()
    changed = [lines[0], " ".join(first_row[:2] + ["77"] + first_row[3:])] + lines[2:]
    copied.write_text("\n".join(changed) + "\n")
    assert read_index(copied, cache)[0, 1] == 77
    # A bad number is named with its line, whichever path sees it first.
    broken = lines[:3] + [lines[3].replace(lines[3].split()[1], "12x4", 1)] + lines[4:]
    other.write_text("\n".join(broken) + "\n")
    with pytest.raises(UserError, match=r"other\.idx:4: index row has a non-numeric offset"):
        read_index(other)


# --------------------------------------------------------------------------------------------
# Shard hashing: per dataset, changed bytes caught, split between ranks


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    hashed: list[str] = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    return hashed


def test_a_second_run_on_the_dataset_hashes_nothing(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed = _counting(monkeypatch)
    _epoch(copy)
    assert sorted(hashed) == ["train-000000.tar", "train-000001.tar"]
    assert (copy / integrity.CACHE_NAME).is_dir(), "remembered in the dataset, not in a run dir"
    _epoch(copy, epoch=1)  # another run, another epoch: nothing to hash
    assert len(hashed) == 2


def test_a_changed_shard_is_caught_even_with_its_mtime_put_back(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed = _counting(monkeypatch)
    _epoch(copy)
    shard = copy / "train" / fmt.shard_name("train", 1)
    before = shard.stat()
    data = bytearray(shard.read_bytes())
    data[400] ^= 0x01  # same size, still a readable tar
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as recorded
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(UserError, match=r"train-000001\.tar: sha256 .* does not match the manifest"):
        _epoch(copy)
    # Bytes put back: verified again (the ctime moved), then remembered.
    data[400] ^= 0x01
    shard.write_bytes(bytes(data))
    hashed.clear()
    _epoch(copy)
    _epoch(copy)
    assert hashed == ["train-000001.tar"]
    # A same-content copy over it is another inode: hashed again, once.
    replacement = shard.with_name("new.tar")
    shutil.copy2(shard, replacement)
    os.replace(replacement, shard)
    hashed.clear()
    _epoch(copy)
    assert hashed == ["train-000001.tar"]


def test_a_read_only_dataset_is_remembered_in_the_user_cache(
    copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed = _counting(monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # A read-only directory, as root sees it too: the cache directory cannot be made there.
    (copy / integrity.CACHE_NAME).write_text("not a directory")
    _epoch(copy)
    _epoch(copy)
    assert len(hashed) == 2
    records = list((tmp_path / "xdg" / "alexnet" / "datasets").glob("*/*.json"))
    assert len(records) == 2 and {json.loads(r.read_text())["path"] for r in records} == {
        "train/train-000000.tar",
        "train/train-000001.tar",
    }


def _verify_in_process(root: str, barrier: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue) -> None:
    """One 'rank': hashes with one thread; its first hash waits for the other rank's first."""
    first = threading.Event()
    real = integrity.file_sha256

    def meet_then_hash(path: Path) -> str:
        if not first.is_set():
            first.set()
            barrier.wait(timeout=120)  # both ranks are hashing at once
        return real(path)

    integrity.file_sha256 = meet_then_hash
    split, _ = open_split(root, "train", crop=227, mean="image", lighting_std=0.1)
    done = integrity.verify_shards(
        split, range(len(split.shards)), cache=integrity.dataset_cache(split.root), threads=1
    )
    out.put((sorted(done.hashed), sorted(done.recorded)))


def test_two_ranks_reading_the_same_shards_split_the_hashing(big: Path, tmp_path: Path) -> None:
    root = tmp_path / "pair"
    replicate(big, root, {"train": 3000, "val": 0})  # 8 shards, none hashed yet
    shards = len(fmt.read_manifest(root).split("train").shards)
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    ranks = [ctx.Process(target=_verify_in_process, args=(str(root), barrier, out)) for _ in range(2)]
    for p in ranks:
        p.start()
    results = [out.get(timeout=300) for _ in ranks]
    for p in ranks:
        p.join(timeout=60)
        assert p.exitcode == 0
    (a, a_found), (b, b_found) = results
    assert a and b, "both ranks hashed"
    assert not set(a) & set(b), "no shard hashed twice"
    assert sorted(a + b) == list(range(shards)) == sorted(a + a_found) == sorted(b + b_found)
