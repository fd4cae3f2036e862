"""Shard writing, the manifest, resumability and array-job partitioning, end to end through the CLI."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocess import format as fmt
from preprocess import shards
from preprocess.__main__ import main as preprocess_main
from tests.support import REPO, flags
from tests.support.datasets import WNIDS
from tests.support.processes import interruptible


def _shard(src: Path, out: Path, *extra: str) -> int:
    return preprocess_main(
        [
            *flags("shard --src {} --out {} --split train --shard-size 5 --workers 1", src, out),
            *flags("--no-progress"),
            *extra,
        ]
    )


def _read_tar(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_shards_manifest_and_stats(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    assert _shard(image_folder, out) == 0
    manifest = fmt.read_manifest(out)
    train = manifest.split("train")

    assert manifest.wnids == WNIDS
    assert train.samples == 21 and len(train.shards) == 5  # 22 files, one skipped, 5 per shard
    assert [s["reason"] for s in train.skipped] and train.skipped[0]["file"].endswith("_broken.JPEG")
    assert sum(s.samples for s in train.shards) == 21

    labels_seen = []
    for info in train.shards:
        path = out / info.path
        assert shards.file_sha256(path) == info.sha256 and path.stat().st_size == info.bytes
        members = _read_tar(path)
        assert all(m.pax_headers == {} and len(m.name) < 100 for m in members)
        names = [m.name for m in members]
        assert all(n.count(".") == 1 for n in names), names  # keys carry no dots
        with tarfile.open(path) as tar:
            for m in members:
                if m.name.endswith(".jpg"):
                    img = Image.open(io.BytesIO(tar.extractfile(m).read()))
                    assert img.size == (256, 256) and img.mode == "RGB"
                else:
                    labels_seen.append(fmt.decode_label(tar.extractfile(m).read()))
    # Shuffled across classes: the first shard is not a single class.
    first = [
        fmt.decode_label(_member_bytes(out / train.shards[0].path, n))
        for n in [m.name for m in _read_tar(out / train.shards[0].path) if m.name.endswith(".cls")]
    ]
    assert len(set(first)) > 1
    assert sorted(labels_seen) == sorted([0] * 7 + [1] * 7 + [2] * 7)

    stats = manifest.stats
    assert stats is not None and stats.images == 21
    mean_image = np.load(out / stats.mean_image)
    assert mean_image.shape == (256, 256, 3) and mean_image.dtype == np.float32
    assert np.allclose(mean_image.mean(axis=(0, 1)), stats.mean, atol=0.5)
    eigvec = np.array(stats.eigvec)
    assert np.allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-6)
    assert stats.eigval == sorted(stats.eigval, reverse=True) and stats.eigval[0] > 0
    # Against a direct computation over every decoded pixel of every shard image.
    pixels = []
    for info in train.shards:
        with tarfile.open(out / info.path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    rgb = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
                    pixels.append(rgb.reshape(-1, 3).astype(np.float64))
    pixels = np.concatenate(pixels)
    cov = np.cov(pixels, rowvar=False, bias=True)
    assert np.allclose(stats.mean, pixels.mean(axis=0), atol=1.0)  # decoders may differ by rounding
    assert np.allclose(stats.std, pixels.std(axis=0), rtol=0.02)
    reconstructed = eigvec @ np.diag(stats.eigval) @ eigvec.T
    assert np.allclose(reconstructed, cov, rtol=0.02, atol=5.0)


def _member_bytes(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tar:
        return tar.extractfile(name).read()


def test_index_matches_dali_wds2idx(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    _shard(image_folder, out, "--no-finalize")
    shard = out / "train" / fmt.shard_name("train", 0)
    ours = shard.with_name(fmt.index_name(shard.name)).read_text()
    theirs = tmp_path / "dali.idx"
    wds2idx = Path(sys.executable).with_name("wds2idx")
    subprocess.run([str(wds2idx), str(shard), str(theirs)], check=True, capture_output=True)
    assert ours == theirs.read_text()


def test_webdataset_and_dali_read_back(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    _shard(image_folder, out)
    manifest = fmt.read_manifest(out)
    paths = [str(out / s.path) for s in manifest.split("train").shards]
    expected = {}
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".")
                if ext == "cls":
                    expected[key] = fmt.decode_label(tar.extractfile(m).read())

    import webdataset as wds

    got = {s["__key__"]: fmt.decode_label(s["cls"]) for s in wds.WebDataset(paths, shardshuffle=False)}
    assert got == expected

    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def read() -> tuple:
        jpeg, cls = fn.readers.webdataset(
            paths=paths,
            index_paths=[str(out / s.index) for s in manifest.split("train").shards],
            ext=["jpg", "cls"],
            missing_component_behavior="error",
            name="reader",
            pad_last_batch=False,
        )
        return fn.decoders.image(jpeg, device="cpu", output_type=types.RGB), cls

    pipe = read()
    pipe.build()
    labels, shapes = [], set()
    size = pipe.reader_meta("reader")["epoch_size"]
    while len(labels) < size:
        images, cls = pipe.run()
        for i in range(len(cls)):
            labels.append(fmt.decode_label(np.array(cls[i])))
            shapes.add(tuple(np.array(images[i]).shape))
    labels = labels[:size]
    assert size == 21 and sorted(labels) == sorted(expected.values())
    assert shapes == {(256, 256, 3)}


def test_rerun_skips_complete_shards_and_gives_same_manifest(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    _shard(image_folder, out)
    first = fmt.manifest_path(out).read_text()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.tar")}
    _shard(image_folder, out)
    assert fmt.manifest_path(out).read_text() == first
    assert {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.tar")} == mtimes

    # A damaged shard fails verification and is rewritten, byte-identical, on the next run.
    victim = out / "train" / fmt.shard_name("train", 2)
    victim.write_bytes(victim.read_bytes()[:1000])
    _shard(image_folder, out)
    assert fmt.manifest_path(out).read_text() == first


def test_array_tasks_cover_every_image_once(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    reference = tmp_path / "reference"
    _shard(image_folder, reference)
    for task in range(3):
        assert _shard(image_folder, out, "--task-index", str(task), "--task-count", "3") == 0
        done = fmt.manifest_path(out).exists()
        assert done == (task == 2)  # only the task that completes the split writes the manifest
    # The three tasks own disjoint shard sets whose union is the plan.
    owned = [shards.tasks_shards(5, t, 3) for t in range(3)]
    assert sorted(i for o in owned for i in o) == list(range(5))
    assert fmt.manifest_path(out).read_text() == fmt.manifest_path(reference).read_text()


def test_kill_mid_run_leaves_no_finished_partial_shard(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    reference = tmp_path / "reference"
    _shard(image_folder, reference)
    # A slow run (one image at a time through a throttled reader) killed while writing.
    script = (
        "import sys, time\n"
        "from preprocess import sources\n"
        "_read = sources.SourceItem.read\n"
        "def slow(self, *args):\n"
        "    time.sleep(0.15)\n"
        "    return _read(self, *args)\n"
        "sources.SourceItem.read = slow\n"
        "from preprocess.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [
        sys.executable,
        "-c",
        script,
        *flags("shard --src {} --out {} --split train --shard-size 5 --workers 1", image_folder, out),
        *flags("--no-progress"),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list((out / "train").glob("*.json")) or len(list((out / "train").glob("train-*.json"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Now inside a later shard: its temporary file exists (the reader is throttled, so it is far from done).
    while not any(".tmp." in p.name for p in (out / "train").iterdir()):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert not fmt.manifest_path(out).exists()
    for tar in (out / "train").glob("*.tar"):
        # Every visible shard is complete: it reads to the end-of-archive marker and matches its record.
        done = shards.read_done(tar)
        assert done is not None and shards.file_sha256(tar) == done["sha256"]
    assert any(".tmp." in p.name for p in (out / "train").iterdir())  # the killed shard stayed hidden

    assert _shard(image_folder, out) == 0
    assert fmt.manifest_path(out).read_text() == fmt.manifest_path(reference).read_text()
    assert not any(".tmp." in p.name for p in (out / "train").iterdir())


def test_process_pool_gives_the_same_shards(image_folder: Path, tmp_path: Path) -> None:
    _shard(image_folder, tmp_path / "one")
    _shard(image_folder, tmp_path / "two", "--workers", "2")
    assert fmt.manifest_path(tmp_path / "one").read_text() == fmt.manifest_path(tmp_path / "two").read_text()


def test_changed_options_do_not_mix_with_an_earlier_plan(image_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    _shard(image_folder, out)
    assert (
        preprocess_main(
            [
                *flags("shard --src {} --out {} --split train --shard-size 4 --workers 1", image_folder, out),
                *flags("--no-progress"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "plan.json" in err and "--shard-size" in err


@pytest.mark.parametrize("case", ["missing", "unwritable"])
def test_clear_errors(image_folder: Path, tmp_path: Path, case: str) -> None:
    if case == "missing":
        cmd = flags("shard --src {} --out {} --split train", tmp_path / "nope", tmp_path / "o")
        needle = "nope"
    else:
        if os.geteuid() == 0:
            blocker = tmp_path / "file"  # root ignores permissions: make --out a path under a file
            blocker.write_text("")
            out = blocker / "shards"
        else:
            out = tmp_path / "ro"
            out.mkdir(mode=0o500)
        cmd = flags("shard --src {} --out {} --split train", image_folder, out)
        needle = str(out)
    proc = subprocess.run([sys.executable, "-m", "preprocess", *cmd], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_ctrl_c_keeps_finished_shards_and_a_rerun_completes(image_folder: Path, tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal sends it, during a 2-worker run of 11 shards."""
    reference, out = tmp_path / "reference", tmp_path / "shards"

    def command(out: Path) -> list[str]:
        return [
            sys.executable,
            *flags("-m preprocess shard --src {} --out {} --split train --shard-size 2", image_folder, out),
            *flags("--workers 2 --no-progress"),
        ]

    cmd = command(out)
    hooks = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "support" / "hooks"), str(REPO)])}
    subprocess.run(
        command(reference), cwd=REPO, env={**os.environ, **hooks}, check=True, capture_output=True, timeout=120
    )
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **hooks, "ALEXNET_TEST_SLOW_READ": "0.2"},
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=interruptible,
    )
    try:
        deadline = time.monotonic() + 120
        while not (done_before := list((out / "train").glob("train-*.json"))):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    message = "interrupted; completed shards are kept, re-run the same command to resume"
    assert err.strip().splitlines()[-1] == message and err.count("interrupted") == 1, err

    # Only complete shards are left, with their done-records; nothing temporary, no manifest yet.
    names = [p.name for p in (out / "train").iterdir()]
    assert not [n for n in names if ".tmp." in n], names
    tars = sorted((out / "train").glob("*.tar"))
    # The run stopped: at most the two shards in flight finished after the signal, nothing new started.
    assert len(done_before) <= len(tars) <= len(done_before) + 2, names
    for tar in tars:
        done = shards.read_done(tar)
        assert done is not None and shards.file_sha256(tar) == done["sha256"]
        assert tar.with_name(fmt.index_name(tar.name)).exists()
    assert not fmt.manifest_path(out).exists()

    rerun = subprocess.run(cmd, cwd=REPO, env={**os.environ, **hooks}, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(tars)} already complete" in rerun.stderr
    assert fmt.manifest_path(out).read_text() == fmt.manifest_path(reference).read_text()
