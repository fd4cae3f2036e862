"""Whether a checkpoint can be trusted, and reading its tensors without unpickling anything.

meta.json lists the sha256 and size of every file and an index of where each tensor lies (file, offset,
length). Tensors are read through that index with ``torch.load(weights_only=True)``: nothing from a run
directory is ever unpickled by this project (DCP's own ``.metadata`` is a pickle, so it is not read here).
Every load verifies the checksums first.
"""

from __future__ import annotations

import io
import stat
from pathlib import Path
from typing import BinaryIO

import torch

from basics.files import file_sha256
from pipeline import model as model_lib
from pipeline.checkpoint.catalogue import read_meta
from pipeline.checkpoint.errors import CheckpointError


def verify(path: str | Path) -> str | None:
    """None if every file listed in meta.json is present with its size and sha256; else why not."""
    path = Path(path)
    if not path.is_dir():
        return "missing"
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        return str(e).split(": ", 1)[-1]
    for name, want in meta["files"].items():
        f = path / name
        try:
            size = f.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} were written (truncated or damaged)"
        if file_sha256(f) != want["sha256"]:
            return f"{name} does not match its sha256 (damaged)"
    return None


def check_permissions(path: Path, allow_world_writable: bool) -> None:
    """Refuse a checkpoint anyone could have replaced, as ssh refuses a loose key."""
    if allow_world_writable:
        return
    for p in (path, path.parent):
        mode = p.stat().st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise CheckpointError(
                f"{p} is world-writable (mode {stat.S_IMODE(mode):o}): anyone could swap its files; "
                f"`chmod o-w {p}` or pass --checkpoint.allow-world-writable true"
            )


def read_tensors(path: str | Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint through meta.json's index, with ``torch.load(weights_only=True)`` (no pickle)."""
    path = Path(path)
    index = read_meta(path)["tensors"]
    wanted = list(index) if keys is None else keys
    out = {}
    handles: dict[str, BinaryIO] = {}
    try:
        for key in wanted:
            if key not in index:
                raise CheckpointError(f"{path}: has no tensor {key!r}; it was saved by another model or layout")
            where = index[key]
            f = handles.get(where["file"]) or handles.setdefault(where["file"], open(path / where["file"], "rb"))
            f.seek(where["offset"])
            blob = f.read(where["length"])
            try:
                out[key] = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(
                    f"{path}: tensor {key} does not load ({str(e).splitlines()[0][:200]}); pass another checkpoint"
                ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e}); pass another checkpoint") from None
    finally:
        for f in handles.values():
            f.close()
    return out


def read_towers(path: str | Path) -> dict[int, dict[str, torch.Tensor]]:
    """All tower tensors of a checkpoint, offline: ``{tower: {"model.x": t, "momentum.x": t}}``."""
    towers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in read_tensors(path, [k for k in read_meta(path)["tensors"] if k.startswith("tower")]).items():
        head, rest = key.split(".", 1)
        towers.setdefault(int(head[len("tower") :]), {})[rest] = value
    return towers


def export_model(path: str | Path) -> dict[str, torch.Tensor]:
    """The single-device AlexNet state dict of a checkpoint (verified first), for ``AlexNet.load_state_dict``."""
    reason = verify(path)
    if reason:
        raise CheckpointError(f"{path}: {reason}; pass another checkpoint")
    towers = read_towers(path)
    return model_lib.from_towers(
        {
            t: {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
            for t, tensors in towers.items()
        }
    )
