"""Faults on a real run: a worker killed mid-epoch, a kill during a checkpoint write, a truncated shard,
a full disk under the preprocessing output. Each must end in a resumable state or a one-line error."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import flags
from tests.support.datasets import preprocess, shard_args
from tests.support.faults import _mount_tmpfs, _one_error_line, _train_error, _umount

# ------------------------------------------------------------------------------------------------
# Damaged shards: one-line errors, exit code 2


def test_truncated_shard_is_a_one_line_error(demo_shards: Path, tmp_path: Path) -> None:
    data = tmp_path / "shards"
    shutil.copytree(demo_shards, data)
    shard = data / "train" / "train-000001.tar"
    os.truncate(shard, shard.stat().st_size // 2)
    rc, stderr = _train_error(data, tmp_path / "run", "--max-steps", "2")
    assert rc == 2, stderr[-4000:]
    line = _one_error_line(stderr)
    assert str(shard) in line and "truncated" in line, line
    assert not (tmp_path / "run" / "checkpoints").exists() or not list(
        (tmp_path / "run" / "checkpoints").glob("step-*")
    )


# ------------------------------------------------------------------------------------------------
# A full disk under the preprocessing output


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_only_complete_shards_visible(split_dir: Path) -> list[str]:
    """Every .tar under its final name has a done-record whose checksum and size match; no temporaries."""
    visible = sorted(p.name for p in split_dir.glob("*.tar"))
    for name in visible:
        done = json.loads((split_dir / (name[: -len(".tar")] + ".json")).read_text())
        assert done["sha256"] == _sha256(split_dir / name) and done["bytes"] == (split_dir / name).stat().st_size, name
        assert (split_dir / (name[: -len(".tar")] + ".idx")).exists(), name
    leftovers = [p.name for p in split_dir.iterdir() if ".tmp." in p.name]
    assert not leftovers, leftovers
    return visible


@pytest.mark.parametrize(
    "where",
    [
        "shards",
        "finalize",
    ],
)
def test_disk_full_during_preprocessing(demo_data: Path, tmp_path: Path, where: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    if not shutil.which("mount") or not shutil.which("umount"):
        pytest.skip("no mount/umount")
    src = demo_data / "src"
    normal = tmp_path / "normal"
    preprocess(*shard_args(src, normal, "train", workers=2))
    tars = sorted((normal / "train").glob("*.tar"))
    assert len(tars) == 3
    split_bytes = sum(p.stat().st_size for p in (normal / "train").iterdir())
    if where == "shards":  # room for the first shard only: the second one fails mid-write
        size_kb = math.ceil((tars[0].stat().st_size + 128 * 1024) / 1024)
        assert size_kb * 1024 < tars[0].stat().st_size + tars[1].stat().st_size
    else:  # room for every shard, not for the 768 KiB mean image that finalize writes
        size_kb = math.ceil((split_bytes + 64 * 1024) / 1024)

    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, size_kb)
    try:
        out = mnt / "shards"
        full = preprocess(*shard_args(src, out, "train", workers=1), check=False)
        assert full.returncode == 2, full.stderr[-4000:]
        line = _one_error_line(full.stderr)
        assert "no space left" in line.lower(), line
        visible = _assert_only_complete_shards_visible(out / "train")
        if where == "shards":
            assert visible == [tars[0].name], visible
        assert not (out / "manifest.json").exists()

        # More space (the same mount, grown), the same command: completes, rewriting only what is missing.
        grown = subprocess.run(flags("mount -o remount,size=16m {}", mnt), capture_output=True, text=True, timeout=30)
        assert grown.returncode == 0, grown.stderr
        again = preprocess(*shard_args(src, out, "train", workers=2))
        assert f"{len(visible)} already complete" in again.stderr, again.stderr
        assert (out / "manifest.json").read_text() == (normal / "manifest.json").read_text()
        for tar in tars:
            assert _sha256(out / "train" / tar.name) == _sha256(tar), tar.name
        assert _sha256(out / "mean_image.npy") == _sha256(normal / "mean_image.npy")
    finally:
        _umount(mnt)
    assert not os.path.ismount(mnt)
