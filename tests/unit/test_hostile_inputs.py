"""Preprocessing never hangs and never reads unbounded: crafted sources (FIFOs, /dev/zero, symlink loops,
oversize files, lying JPEG headers, corrupt devkits) are skipped with a reason or refused in one line."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from preprocess import format as fmt
from preprocess import image, sources
from tests.support import REPO, flags
from tests.support.archives import tar_bytes, val_name, write_meta
from tests.support.datasets import jpeg_of_colour as _jpeg

TIMEOUT_S = 120  # each command finishes well within this, or it hangs


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "preprocess", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _shard_val(tmp_path: Path, src: Path, devkit: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``preprocess shard`` of the val split in ``src`` with ``devkit`` (a meta.mat or the devkit archive)."""
    return _run(
        "shard",
        *flags("--src {} --out {} --split val --devkit {}", src, tmp_path / "out", devkit),
        *extra,
        "--no-progress",
    )


def _one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _lying_jpeg(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose frame header claims width x height (libjpeg decodes it as flat grey)."""
    data = bytearray(_jpeg((120, 60, 30), (16, 16), seed=1))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def test_hostile_image_folder_is_skipped_entry_by_entry(tmp_path: Path) -> None:
    src = tmp_path / "train"
    good, other = src / "n01000001", src / "n02000001"
    for folder in (good, other):
        folder.mkdir(parents=True)
        for i in range(3):
            (folder / f"{folder.name}_{i}.JPEG").write_bytes(_jpeg((200, 30, 30), (300, 260), seed=i))
    outside = tmp_path / "elsewhere.JPEG"
    outside.write_bytes(_jpeg((30, 30, 200), (280, 300), seed=9))
    os.symlink(outside, good / "linked.JPEG")  # a symlink to a real image is followed and kept
    os.mkfifo(good / "fifo.JPEG")  # open() would block until a writer appears
    os.symlink("/dev/zero", good / "zero.JPEG")  # read() would never end
    os.symlink("loop_b.JPEG", good / "loop_a.JPEG")
    os.symlink("loop_a.JPEG", good / "loop_b.JPEG")
    os.symlink(tmp_path / "gone.JPEG", good / "dangling.JPEG")
    os.symlink(".", good / "itself")  # a directory loop: walked once
    (good / "big.JPEG").write_bytes(b"\xff\xd8\xff" + b"\0" * (2 << 20))  # over --max-file-mb 1
    (other / "lying.JPEG").write_bytes(_lying_jpeg(30000, 30000))

    out = tmp_path / "out"
    proc = _run(
        "shard",
        "--src",
        str(src),
        "--out",
        str(out),
        "--split",
        "train",
        "--workers",
        "1",
        "--no-progress",
        "--max-file-mb",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    split = fmt.read_manifest(out).split("train")
    skipped = {Path(s["file"]).name: s["reason"] for s in split.skipped}
    assert skipped == {
        "fifo.JPEG": "not a regular file (a FIFO)",
        "zero.JPEG": "not a regular file (a character device)",
        "loop_a.JPEG": "symlink loop",
        "loop_b.JPEG": "symlink loop",
        "dangling.JPEG": "dangling symlink (its target does not exist)",
        "itself": "symlink loop (links to a directory already walked)",
        "big.JPEG": "file too large (2.0 MB > --max-file-mb 1)",
        "lying.JPEG": "corrupt JPEG (header says 30000×30000, too large for its "
        f"{len(_lying_jpeg(30000, 30000))} bytes)",
    }
    assert split.samples == 7  # 6 images + the symlinked one


def test_reads_are_capped_and_never_open_special_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(sources.SkippedFile, match="FIFO"):
        sources.read_regular_file(str(fifo), 1 << 20)  # returns at once: a blocking open would hang the test
    small = tmp_path / "small"
    small.write_bytes(b"x" * 100)
    assert sources.read_regular_file(str(small), 100) == b"x" * 100
    with pytest.raises(sources.SkippedFile, match="too large"):
        sources.read_regular_file(str(small), 99)
    # Archive members: the size in the tar header is checked before anything is read.
    archive = tmp_path / "val.tar"
    archive.write_bytes(tar_bytes({val_name(1): b"a" * 5000, val_name(2): b"b" * 10}))
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("ImageId,PredictionString\n" + "".join(f"{val_name(n)[:-5]},n01000001 1 2 3 4\n" for n in (1, 2)))
    items = sources.open_source(str(archive), "val", labels=str(labels)).items
    with pytest.raises(sources.SkippedFile, match="too large"):
        items[0].read(4096)
    assert items[1].read(4096) == b"b" * 10


def test_lying_image_headers_are_rejected_not_decoded_grey() -> None:
    with pytest.raises(image.BadImage, match=r"corrupt JPEG \(header says 30000×30000"):
        image.process(_lying_jpeg(30000, 30000))
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", 7000, 7000)  # IHDR width, height (+ its CRC below)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    with pytest.raises(image.BadImage, match="^truncated PNG$"):
        image.process(bytes(png))
    # A real large flat JPEG of the same kind of content is still accepted (the bound is 1 bit per block).
    buf = io.BytesIO()
    Image.new("L", (4000, 3000), 90).save(buf, "JPEG", quality=20, optimize=True)
    assert image.decode_shard_jpeg(image.process(buf.getvalue())).shape == (256, 256, 3)


_PEAK = """
import resource, sys
from preprocess import image
image.process(open(sys.argv[2], "rb").read())  # warm-up: imports, allocator arenas
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image.process(data)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_an_image_just_under_the_pixel_cap_stays_within_the_memory_budget(tmp_path: Path) -> None:
    """README: one image needs about 4 bytes per decoded pixel (PIL's RGB), ~256 MB at the 64 MP cap.

    A PNG (no reduced decoding) of 7999x8000: before the budget it peaked at ~670 MB (PIL's full
    image, a full numpy copy, a full PIL copy for the reduction)."""
    width, height = 7999, 8000
    assert width * height <= image.MAX_DECODED_PIXELS < (width + 1) * (height + 1)
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.new("RGB", (width, height), (200, 100, 50)).save(big, compress_level=1)
    Image.new("RGB", (300, 200), (200, 100, 50)).save(small)
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK, str(big), str(small)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout)
    assert peak < 4.6 * width * height, f"{peak / 2**20:.0f} MB"


# --------------------------------------------------------------------------------------------
# Devkits


def _val_folder(root: Path) -> Path:
    root.mkdir()
    for n in (1, 2):
        (root / val_name(n)).write_bytes(_jpeg((10, 200, 10), (300, 260), seed=n))
    return root


def _devkit_tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("damage", ["random", "truncated", "not_mat_v5"])
def test_corrupt_meta_mat_is_one_line_naming_the_file(tmp_path: Path, damage: str) -> None:
    meta = tmp_path / "meta.mat"
    write_meta(meta)
    good = meta.read_bytes()
    meta.write_bytes(
        {
            "random": np.random.default_rng(0).bytes(4000),
            "truncated": good[: len(good) // 2],
            "not_mat_v5": b"MATLAB 7.3 MAT-file" + b"\0" * 200,
        }[damage]
    )
    truth = tmp_path / "truth.txt"
    truth.write_text("1\n2\n")
    proc = _shard_val(tmp_path, _val_folder(tmp_path / "val"), meta, "--labels", str(truth))
    _one_line_error(proc, str(meta), "meta.mat")

    kit = _devkit_tgz(
        tmp_path / "devkit.tar.gz",
        {"data/meta.mat": meta.read_bytes(), "data/ILSVRC2012_validation_ground_truth.txt": b"1\n2\n"},
    )
    proc = _shard_val(tmp_path, tmp_path / "val", kit)
    _one_line_error(proc, str(kit), "meta.mat")


def test_oversize_or_truncated_devkit_member_is_refused_unread(tmp_path: Path) -> None:
    meta = tmp_path / "meta.mat"
    write_meta(meta)
    huge = sources.MAX_DEVKIT_MEMBER_BYTES + 1  # zeros: a few hundred KB of gzip, inflating to 64 MB
    kit = _devkit_tgz(
        tmp_path / "devkit.tar.gz",
        {"data/meta.mat": meta.read_bytes(), "data/ILSVRC2012_validation_ground_truth.txt": b"\0" * huge},
    )
    val = _val_folder(tmp_path / "val")
    proc = _shard_val(tmp_path, val, kit)
    _one_line_error(proc, str(kit), "ILSVRC2012_validation_ground_truth.txt", "far larger")

    # A gzip stream cut short: one line, not a traceback from tarfile or zlib.
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(kit.read_bytes()[:-5000])
    proc = _shard_val(tmp_path, val, cut)
    _one_line_error(proc, str(cut))


def test_absurd_max_file_mb_is_refused(tmp_path: Path) -> None:
    proc = _run("shard", "--src", str(tmp_path), "--out", str(tmp_path / "o"), "--split", "train", "--max-file-mb", "0")
    _one_line_error(proc, "--max-file-mb")


def test_compressed_meta_mat_is_read_and_a_zip_bomb_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.mat"
    write_meta(plain)
    synsets = scipy.io.loadmat(str(plain))["synsets"]
    meta = tmp_path / "meta.mat"
    scipy.io.savemat(str(meta), {"synsets": synsets}, do_compression=True)  # as MATLAB writes the devkit's
    assert sources._parse_meta(meta.read_bytes(), "x") == sources._parse_meta(plain.read_bytes(), "x")

    # 70 MB of zeros compress to ~70 KB: scipy alone would inflate whatever a file declares.
    scipy.io.savemat(str(meta), {"synsets": synsets, "padding": np.zeros(70 << 20, np.uint8)}, do_compression=True)
    assert meta.stat().st_size < 1 << 20
    truth = tmp_path / "truth.txt"
    truth.write_text("1\n2\n")
    proc = _shard_val(tmp_path, _val_folder(tmp_path / "val"), meta, "--labels", str(truth))
    _one_line_error(proc, str(meta), "inflates to more than 64 MB")
