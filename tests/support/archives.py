"""ILSVRC2012-shaped archives for the source and hostile-input tests: the devkit's meta.mat, val file names,
tar archives in memory."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import scipy.io

META_IDS = {"n04000001": 1, "n01000001": 2, "n02000001": 3, "n03000001": 4}

NAMES = {w: f"thing {w[-1]}{w[3]}" for w in sorted(META_IDS)}


def write_meta(path: Path, ids: dict[str, int] = META_IDS) -> None:
    """A tiny meta.mat in the devkit's layout: leaves (num_children == 0) plus one non-leaf synset."""
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
        "gloss",
    ]
    rows = [(i, w, NAMES[w], 0, np.zeros(0, np.uint16)) for w, i in sorted(ids.items(), key=lambda x: x[1])]
    rows.append((len(ids) + 1, "n00001740", "entity", len(ids), np.arange(1, len(ids) + 1, dtype=np.uint16)))
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for r, (i, wnid, words, children, child_ids) in enumerate(rows):
        synsets[r, 0] = (
            np.uint16(i),
            wnid,
            words,
            np.uint16(children),
            child_ids,
            np.uint8(children > 0),
            np.uint16(0 if children else 1300),
            f"gloss of {wnid}",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"synsets": synsets})


def val_name(n: int) -> str:
    return f"ILSVRC2012_val_{n:08d}.JPEG"


def tar_bytes(files: dict[str, bytes], fmt: int = tarfile.GNU_FORMAT, extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info in extra:
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
