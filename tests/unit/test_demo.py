"""The procedural demo dataset: deterministic, ImageNet-shaped, quirky on purpose, devkit consistent."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from basics.errors import UserError
from preprocess import demo
from preprocess.sources import open_source
from tests.support import flags

SMALL = dict(classes=3, train_per_class=5, val_per_class=2)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo") / "src"
    return root, demo.make_demo(str(root), seed=3, **SMALL)


def test_same_seed_same_bytes(small: tuple[Path, dict], tmp_path: Path) -> None:
    root, summary = small
    again = demo.make_demo(str(tmp_path / "again"), seed=3, **SMALL)
    assert again == summary
    assert _hashes(tmp_path / "again") == _hashes(root)
    other = demo.make_demo(str(tmp_path / "other"), seed=4, **SMALL)
    assert other["quirks"] == summary["quirks"]
    differ = set(_hashes(tmp_path / "other").items()) ^ set(_hashes(root).items())
    assert len(differ) > 20  # another seed, other images


def test_layout(small: tuple[Path, dict]) -> None:
    root, summary = small
    wnids = [c["wnid"] for c in summary["classes"]]
    assert wnids == sorted(wnids) and len(wnids) == 3
    assert sorted(p.name for p in (root / "train").iterdir()) == wnids
    for wnid in wnids:
        assert sorted(p.name for p in (root / "train" / wnid).iterdir()) == [f"{wnid}_{i}.JPEG" for i in range(1, 6)]
    assert sorted(p.name for p in (root / "val").iterdir()) == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, 7)]
    data = root / demo.DEVKIT_DATA
    assert sorted(p.name for p in data.iterdir()) == ["ILSVRC2012_validation_ground_truth.txt", "meta.mat"]
    assert json.loads((root / demo.MARKER).read_text())["complete"] is True
    sizes = [Image.open(p).size for p in sorted((root / "val").iterdir())]
    assert len(set(sizes)) == len(sizes) and all(200 <= min(s) and max(s) <= 1000 for s in sizes)


def test_image_sizes_vary_like_imagenet() -> None:
    sizes = [demo._image_size(np.random.default_rng(i)) for i in range(2000)]
    assert all(200 <= min(s) and max(s) <= 1000 for s in sizes)
    assert 100 < sum(h > w for w, h in sizes) < 600  # some portrait
    assert 0 < sum(max(s) > 640 for s in sizes) < 60  # a few large


def test_quirk_files_are_really_quirky(small: tuple[Path, dict]) -> None:
    root, summary = small
    files = {q["quirk"]: root / q["file"] for q in summary["quirks"]}
    assert set(files) == {"cmyk", "png", "grayscale", "exif_rotated", "truncated", "empty"}
    assert all(p.name.endswith(".JPEG") for p in files.values())
    modes = {}
    for quirk in ("cmyk", "png", "grayscale", "exif_rotated"):
        with Image.open(files[quirk]) as im:
            im.load()
            modes[quirk] = (im.format, im.mode)
            if quirk == "exif_rotated":
                assert im.getexif()[0x0112] == 6
    assert modes == {
        "cmyk": ("JPEG", "CMYK"),
        "png": ("PNG", "RGB"),
        "grayscale": ("JPEG", "L"),
        "exif_rotated": ("JPEG", "RGB"),
    }
    with pytest.raises(OSError, match="truncated"):
        with Image.open(files["truncated"]) as im:
            im.load()
    assert files["empty"].stat().st_size == 0
    # Every other train file is a plain RGB JPEG.
    quirky = set(files.values())
    for path in (root / "train").rglob("*.JPEG"):
        if path not in quirky:
            with Image.open(path) as im:
                assert (im.format, im.mode) == ("JPEG", "RGB")


def test_devkit_ids_are_not_sorted_and_map_to_the_folders(small: tuple[Path, dict]) -> None:
    root, summary = small
    data = root / demo.DEVKIT_DATA
    meta = scipy.io.loadmat(str(data / "meta.mat"), squeeze_me=True)["synsets"]
    assert (data / "meta.mat").read_bytes()[:116].find(b"Created on") == -1  # no timestamp
    leaves = {str(s["WNID"]): int(s["ILSVRC2012_ID"]) for s in meta if int(s["num_children"]) == 0}
    parents = [s for s in meta if int(s["num_children"]) > 0]
    assert sorted(leaves) == [c["wnid"] for c in summary["classes"]]
    assert sorted(leaves.values()) == [1, 2, 3]
    assert [leaves[w] for w in sorted(leaves)] != [1, 2, 3]  # IDs are not in sorted-wnid order
    assert len(parents) >= 2 and all(int(s["ILSVRC2012_ID"]) > 3 for s in parents)
    assert {str(s["words"]) for s in meta} >= {c["name"] for c in summary["classes"]}

    ids = [int(line) for line in (data / "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
    id_to_wnid = {i: w for w, i in leaves.items()}
    assert [id_to_wnid[i] for i in ids] == summary["val_wnids"]
    assert sorted(summary["val_wnids"]) == sorted(w for w in leaves for _ in range(2))

    # Through preprocess.sources, val and train agree on every class index.
    train = open_source(str(root / "train"), "train")
    val = open_source(str(root / "val"), "val", devkit=str(root / "devkit"))
    assert train.classes == [{**c, "name": ""} for c in val.classes]
    for item in val.items:
        n = int(item.key.rsplit("_", 1)[1])
        assert train.classes[item.label]["wnid"] == summary["val_wnids"][n - 1]


def test_refuses_foreign_directory_and_replaces_an_old_demo(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        demo.make_demo(str(foreign), **SMALL)
    assert (foreign / "precious.txt").read_text() == "keep me"

    root = tmp_path / "demo"
    demo.make_demo(str(root), classes=3, train_per_class=2, val_per_class=2)
    demo.make_demo(str(root), classes=2, train_per_class=1, val_per_class=1)
    assert sorted(p.name for p in (root / "train").iterdir()) == [c.wnid for c in demo.CLASSES[:2]]
    assert len(list((root / "val").iterdir())) == 2
    with pytest.raises(UserError, match="--classes"):
        demo.make_demo(str(root), classes=99)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(flags("{} --classes 2 --train-per-class 2 --val-per-class 1", tmp_path / "d"))
    assert demo.run(args) == 0
    assert "4 train images" in capsys.readouterr().out
    assert json.loads((tmp_path / "d" / demo.MARKER).read_text())["val_images"] == 2
