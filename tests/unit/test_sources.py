"""Listing ImageNet inputs: ImageFolder trees, flat val folders with devkit/CSV labels, the official tars."""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
from pathlib import Path

import pytest

from basics.errors import UserError
from preprocess.sources import SourceItem, open_source
from tests.support.archives import META_IDS, NAMES, tar_bytes, val_name, write_meta

# ILSVRC2012_IDs as the devkit numbers them: meta.mat order, deliberately NOT sorted-wnid order.
WNIDS = sorted(META_IDS)  # n01..., n02..., n03..., n04...: index = position here


def _payload(name: str) -> bytes:
    """Distinct fake image bytes per name (sources never decode), odd lengths to test tar padding."""
    return (name.encode() * 7)[: 300 + len(name) * 3]


def _val_truth(n_per_class: int = 2) -> list[str]:
    """wnid of val image 1, 2, ... (interleaved classes, as the real val set)."""
    return [WNIDS[(i * 3 + i // 4) % len(WNIDS)] for i in range(len(WNIDS) * n_per_class)]


def _write_devkit(root: Path, truth: list[str]) -> Path:
    """ROOT/ILSVRC2012_devkit_t12/data/{meta.mat, ILSVRC2012_validation_ground_truth.txt}."""
    data = root / "ILSVRC2012_devkit_t12" / "data"
    write_meta(data / "meta.mat")
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{META_IDS[w]}\n" for w in truth))
    return root


def _make_folder(root: Path, per_class: dict[str, list[str]]) -> dict[str, bytes]:
    written = {}
    for wnid, names in per_class.items():
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for name in names:
            path = root / wnid / name
            path.write_bytes(_payload(f"{wnid}/{name}"))
            written[str(path)] = path.read_bytes()
    return written


def _by_key(source) -> dict[str, SourceItem]:
    return {item.key: item for item in source.items}


# --------------------------------------------------------------------------------------------
# ImageFolder


def test_image_folder_sorted_wnid_labels(tmp_path: Path) -> None:
    root = tmp_path / "train"
    # Created out of order: the index must follow sorted wnids, not creation or listing order.
    written = _make_folder(root, {w: [f"{w}_{i}.JPEG" for i in range(3)] for w in reversed(WNIDS)})
    (root / WNIDS[0] / ".DS_Store").write_bytes(b"junk")
    (root / WNIDS[0] / "sub").mkdir()
    (root / WNIDS[0] / "sub" / "png_named.JPEG").write_bytes(b"\x89PNG\r\n\x1a\n...")  # content is not judged
    source = open_source(str(root), "train")

    assert [c["wnid"] for c in source.classes] == WNIDS
    assert [c["index"] for c in source.classes] == [0, 1, 2, 3]
    assert all(c["name"] == "" for c in source.classes)
    assert [i.key for i in source.items] == sorted(i.key for i in source.items)
    items = _by_key(source)
    assert len(items) == 4 * 3 + 1 and "DS_Store" not in items
    for w in WNIDS:
        item = items[f"{w}_1"]
        assert item.label == WNIDS.index(w)
        assert item.read() == written[item.origin] and item.path == item.origin
    assert items["png_named"].label == 0
    assert pickle.loads(pickle.dumps(items["png_named"])) == items["png_named"]


def test_classes_override_follows_the_manifest_order(tmp_path: Path) -> None:
    root = tmp_path / "val"
    _make_folder(root, {w: ["a.JPEG"] for w in WNIDS[:3]})
    order = [WNIDS[3], WNIDS[2], WNIDS[0], WNIDS[1]]  # a class with no folder here is fine
    source = open_source(str(root), "val", classes=order)
    assert [c["wnid"] for c in source.classes] == order
    labels = {item.origin.split(os.sep)[-2]: item.label for item in source.items}
    assert labels == {WNIDS[0]: 2, WNIDS[1]: 3, WNIDS[2]: 1}

    with pytest.raises(UserError, match=WNIDS[2]):
        open_source(str(root), "val", classes=[WNIDS[0], WNIDS[1]])


def test_empty_class_folder_and_missing_source(tmp_path: Path) -> None:
    root = tmp_path / "train"
    _make_folder(root, {WNIDS[0]: ["a.JPEG"]})
    (root / WNIDS[1]).mkdir()
    (root / WNIDS[1] / ".hidden").write_bytes(b"x")
    with pytest.raises(UserError, match=f"{root / WNIDS[1]}: empty class folder"):
        open_source(str(root), "train")

    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=f"{missing}: no such directory or archive"):
        open_source(str(missing), "train")


def test_duplicate_keys_are_made_unique(tmp_path: Path) -> None:
    root = tmp_path / "train"
    _make_folder(root, {WNIDS[0]: ["img1.jpg", "x.jpg", "x.png"], WNIDS[1]: ["img1.jpg"]})
    source = open_source(str(root), "train")
    keys = [item.key for item in source.items]
    assert len(keys) == len(set(keys)) == 4
    items = _by_key(source)
    assert items[f"{WNIDS[0]}_img1"].label == 0 and items[f"{WNIDS[1]}_img1"].label == 1
    assert items[f"{WNIDS[0]}_img1"].origin.endswith(f"{WNIDS[0]}/img1.jpg")
    assert {items[f"{WNIDS[0]}_x"].origin[-5:], items[f"{WNIDS[0]}_x_2"].origin[-5:]} == {"x.jpg", "x.png"}
    assert open_source(str(root), "train") == source  # deterministic


def test_mixed_folders_and_loose_files_refused(tmp_path: Path) -> None:
    root = tmp_path / "train"
    _make_folder(root, {WNIDS[0]: ["a.JPEG"]})
    (root / "stray.JPEG").write_bytes(b"x")
    with pytest.raises(UserError, match="stray.JPEG"):
        open_source(str(root), "train")


# --------------------------------------------------------------------------------------------
# The official train archive: a tar of per-class tars, read in place


def _train_tar(path: Path, per_class: int = 3) -> dict[str, bytes]:
    originals: dict[str, bytes] = {}
    outer = {}
    for w in reversed(WNIDS):
        files = {f"{w}_{i}.JPEG": _payload(f"{w}_{i}") for i in range(per_class)}
        if w in WNIDS[1:3]:
            # A name over 100 bytes needs an extra header (GNU long name, or PAX): offsets must still be right.
            files[f"{w}_{'9' * 110}.JPEG"] = _payload(f"long {w}")
        originals.update(files)
        outer[f"{w}.tar"] = tar_bytes(files, fmt=tarfile.PAX_FORMAT if w == WNIDS[2] else tarfile.GNU_FORMAT)
    path.write_bytes(tar_bytes(outer, fmt=tarfile.PAX_FORMAT))
    return originals


def test_train_tar_of_tars_reads_members_in_place(tmp_path: Path) -> None:
    archive = tmp_path / "ILSVRC2012_img_train.tar"
    originals = _train_tar(archive)
    source = open_source(str(archive), "train")

    assert [c["wnid"] for c in source.classes] == WNIDS
    assert len(source.items) == len(originals)
    for item in source.items:
        name = item.origin.rsplit("/", 1)[1]
        wnid = name.split("_")[0]
        assert item.origin == f"{archive}:{wnid}.tar/{name}"
        assert item.path == str(archive) and item.size == len(originals[name])
        assert item.read() == originals[name]
        assert item.label == WNIDS.index(wnid)
        assert item.key == name.split(".")[0]
        assert pickle.loads(pickle.dumps(item)).read() == originals[name]


def test_train_tar_with_devkit_gets_names_and_classes_override(tmp_path: Path) -> None:
    archive = tmp_path / "ILSVRC2012_img_train.tar"
    _train_tar(archive, per_class=1)
    kit = _write_devkit(tmp_path / "devkit", _val_truth())
    source = open_source(str(archive), "train", devkit=str(kit))
    assert [c["name"] for c in source.classes] == [NAMES[w] for w in WNIDS]
    with pytest.raises(UserError, match=WNIDS[3]):
        open_source(str(archive), "train", classes=WNIDS[:3])


def test_compressed_tars_refused(tmp_path: Path) -> None:
    archive = tmp_path / "ILSVRC2012_img_val.tar.gz"
    archive.write_bytes(gzip.compress(tar_bytes({val_name(1): b"abc"}), mtime=0))
    with pytest.raises(UserError, match="decompress"):
        open_source(str(archive), "val", devkit=str(_write_devkit(tmp_path / "devkit", _val_truth())))

    inner_gz = tmp_path / "train.tar"
    inner_gz.write_bytes(tar_bytes({f"{WNIDS[0]}.tar": gzip.compress(tar_bytes({"a.JPEG": b"abc"}))}))
    with pytest.raises(UserError, match=f"{WNIDS[0]}.tar: gzip-compressed.*decompress"):
        open_source(str(inner_gz), "train")


def test_truncated_and_corrupt_tars_refused(tmp_path: Path) -> None:
    archive = tmp_path / "train.tar"
    _train_tar(archive)
    data = archive.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.tar"):
        open_source(str(cut), "train")

    # A garbage header after the first inner member: tarfile would silently stop listing there.
    inner = bytearray(tar_bytes({"a.JPEG": b"A" * 600, "b.JPEG": b"B" * 10}))
    inner[1536 : 1536 + 512] = b"\x07" * 512
    bad = tmp_path / "bad.tar"
    bad.write_bytes(tar_bytes({f"{WNIDS[0]}.tar": bytes(inner)}))
    with pytest.raises(UserError, match="corrupt tar header"):
        open_source(str(bad), "train")


# --------------------------------------------------------------------------------------------
# Val: flat folder or flat tar, labels from the devkit or Kaggle's CSV


def _val_folder(root: Path, truth: list[str]) -> dict[str, bytes]:
    root.mkdir(parents=True)
    written = {}
    for n, wnid in enumerate(truth, start=1):
        written[val_name(n)] = _payload(f"val {n} {wnid}")
        (root / val_name(n)).write_bytes(written[val_name(n)])
    return written


def _assert_val_labels(source, truth: list[str]) -> None:
    assert [c["wnid"] for c in source.classes] == WNIDS
    assert len(source.items) == len(truth)
    for item in source.items:
        n = int(item.key.rsplit("_", 1)[1])
        assert item.key == f"ILSVRC2012_val_{n:08d}"
        # The classic bug would give META_IDS[wnid] - 1 here, which differs for every class.
        assert item.label == WNIDS.index(truth[n - 1]) != META_IDS[truth[n - 1]] - 1


def test_val_tar_with_devkit_maps_ids_through_meta_mat(tmp_path: Path) -> None:
    truth = _val_truth()
    archive = tmp_path / "ILSVRC2012_img_val.tar"
    originals = {val_name(n): _payload(f"val {n}") for n in range(1, len(truth) + 1)}
    archive.write_bytes(tar_bytes(originals))
    kit = _write_devkit(tmp_path / "devkit", truth)
    val = open_source(str(archive), "val", devkit=str(kit))
    _assert_val_labels(val, truth)
    assert [c["name"] for c in val.classes] == [NAMES[w] for w in WNIDS]
    for item in val.items:
        assert item.read() == originals[item.origin.split(":")[-1]]

    # The same wnid gets the same index in train (ImageFolder, sorted folders) and val (devkit IDs).
    train_root = tmp_path / "train"
    _make_folder(train_root, {w: [f"{w}_1.JPEG"] for w in WNIDS})
    train = open_source(str(train_root), "train")
    train_index = {c["wnid"]: c["index"] for c in train.classes}
    for item in val.items:
        n = int(item.key.rsplit("_", 1)[1])
        assert item.label == train_index[truth[n - 1]]

    # With the manifest's order from train, val follows it.
    order = list(reversed(WNIDS))
    val2 = open_source(str(archive), "val", devkit=str(kit), classes=order)
    for item in val2.items:
        assert order[item.label] == truth[int(item.key.rsplit("_", 1)[1]) - 1]


def test_val_folder_with_devkit_tar_gz_and_inner_dir(tmp_path: Path) -> None:
    truth = _val_truth()
    folder = tmp_path / "val"
    _val_folder(folder, truth)
    kit_dir = _write_devkit(tmp_path / "devkit", truth)
    kit_tgz = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(kit_tgz, "w:gz") as tar:
        tar.add(kit_dir / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    for kit in (kit_tgz, kit_dir, kit_dir / "ILSVRC2012_devkit_t12"):
        _assert_val_labels(open_source(str(folder), "val", devkit=str(kit)), truth)


def test_val_ground_truth_txt_as_labels_with_meta_mat(tmp_path: Path) -> None:
    truth = _val_truth()
    folder = tmp_path / "val"
    _val_folder(folder, truth)
    kit = _write_devkit(tmp_path / "devkit", truth)
    data = kit / "ILSVRC2012_devkit_t12" / "data"
    labels = tmp_path / "gt.txt"
    labels.write_text((data / "ILSVRC2012_validation_ground_truth.txt").read_text())
    _assert_val_labels(open_source(str(folder), "val", labels=str(labels), devkit=str(data / "meta.mat")), truth)
    with pytest.raises(UserError, match="--devkit"):
        open_source(str(folder), "val", labels=str(labels))


def test_val_kaggle_csv(tmp_path: Path) -> None:
    truth = _val_truth()
    folder = tmp_path / "val"
    _val_folder(folder, truth)
    csv = tmp_path / "LOC_val_solution.csv"
    rows = [f"{val_name(n)[:-5]},{w} 16 57 300 200 {w} 1 2 3 4\n" for n, w in enumerate(truth, start=1)]
    csv.write_text("ImageId,PredictionString\n" + "".join(reversed(rows)))
    _assert_val_labels(open_source(str(folder), "val", labels=str(csv)), truth)

    (tmp_path / "LOC_synset_mapping.txt").write_text("".join(f"{w} {NAMES[w]}\n" for w in WNIDS))
    source = open_source(str(folder), "val", labels=str(csv))
    assert [c["name"] for c in source.classes] == [NAMES[w] for w in WNIDS]


def test_val_without_labels_or_with_unlabelled_images(tmp_path: Path) -> None:
    truth = _val_truth()
    folder = tmp_path / "val"
    _val_folder(folder, truth)
    with pytest.raises(UserError, match="--devkit"):
        open_source(str(folder), "val")
    kit = _write_devkit(tmp_path / "devkit", truth[:-1])  # one image more than the ground truth
    with pytest.raises(UserError, match=f"1 image.*{val_name(len(truth))}"):
        open_source(str(folder), "val", devkit=str(kit))


def test_odd_tar_members_become_unreadable_items(tmp_path: Path) -> None:
    truth = _val_truth(1)
    sparse = tarfile.TarInfo(val_name(2))
    sparse.type = tarfile.GNUTYPE_SPARSE  # tarfile cannot write real sparse data; the header is enough
    link = tarfile.TarInfo(val_name(3))
    link.type, link.linkname = tarfile.SYMTYPE, val_name(1)
    folder = tarfile.TarInfo("val")
    folder.type = tarfile.DIRTYPE
    archive = tmp_path / "val.tar"
    archive.write_bytes(tar_bytes({val_name(1): b"one", val_name(4): b"four"}, extra=[folder, sparse, link]))
    source = open_source(str(archive), "val", devkit=str(_write_devkit(tmp_path / "devkit", truth)))
    items = _by_key(source)
    assert sorted(items) == [val_name(n)[:-5] for n in (1, 2, 3, 4)]
    assert items[val_name(1)[:-5]].read() == b"one" and items[val_name(4)[:-5]].read() == b"four"
    with pytest.raises(OSError, match="sparse"):
        items[val_name(2)[:-5]].read()
    with pytest.raises(OSError, match="symlink"):
        items[val_name(3)[:-5]].read()
