"""The catalogue of a run's checkpoints: their names, meta.json, health, lineage and the pointers.

::

    RUN/checkpoints/step-00001234/   DCP files + meta.json (written last: a directory without it is unfinished)
    RUN/checkpoints/latest           the name of the checkpoint a restart resumes from (replaced atomically)
    RUN/checkpoints/best             the name of the checkpoint with the best val top-1
    RUN/checkpoints/lineage          the number of the lineage now being written

Only reading lives here; :mod:`pipeline.checkpoint.checkpointer` writes. Names are never reused: re-saving a
step writes ``step-N-1``, ordered by meta.json's ``seq``, not by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.checkpoint.errors import CheckpointError
from pipeline.run_dir import RunDir

LATEST = "latest"
BEST = "best"
META = "meta.json"
LINEAGE = "lineage"
FORMAT_VERSION = 2
UNVERIFIED, GOOD, DIVERGED = "unverified", "good", "diverged"  # meta.json's ``health``
UNFINISHED = ".tmp"  # the suffix of a checkpoint directory still being written


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a complete checkpoint (no {META}); pass another one") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/{META}: unreadable ({e}); pass another checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: not a checkpoint of format {FORMAT_VERSION} (written by another version "
            "or damaged); pass another one"
        )
    return meta


def health(meta: dict[str, Any]) -> str:
    """good, unverified or diverged; a checkpoint from before the field counts as good."""
    return meta.get("health", GOOD)


def readable(run_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """The checkpoints whose meta.json reads, with it, oldest save first (their files are not checked here)."""
    root = RunDir(run_dir).checkpoints
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("step-") and not p.name.endswith(UNFINISHED) and p.is_dir():
                try:
                    found.append((p, read_meta(p)))
                except CheckpointError:
                    continue
    return sorted(found, key=lambda item: item[1]["seq"])


def newest_good(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose state is known to have trained on without diverging."""
    good = [p for p, m in readable(run_dir) if health(m) == GOOD]
    return good[-1] if good else None


def pointed_to(run_dir: str | Path, pointer: str) -> Path | None:
    """The checkpoint directory a pointer file (``latest``, ``best``) names; None when unset or not a plain name."""
    root = RunDir(run_dir).checkpoints
    try:
        target = (root / pointer).read_text().strip()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    if not target or "/" in target or target in (".", ".."):
        return None
    return root / target


def latest(run_dir: str | Path) -> Path | None:
    """What ``latest`` names when it reads complete, else the newest complete checkpoint, else None."""
    pointed = pointed_to(run_dir, LATEST)
    if pointed is not None and (pointed / META).is_file():
        return pointed
    found = [p for p, m in readable(run_dir) if health(m) != DIVERGED]
    return found[-1] if found else None


def resolve(run_dir: str | Path | None, which: str) -> Path:
    """``best`` / ``latest`` of a run dir, or a checkpoint directory path; a one-line error when absent."""
    if which in (BEST, LATEST):
        if run_dir is None:
            raise CheckpointError(f"--checkpoint {which} needs a --run-dir")
        path = latest(run_dir) if which == LATEST else pointed_to(run_dir, BEST)
        if path is None or not path.is_dir():
            raise CheckpointError(
                f"{RunDir(run_dir).checkpoints}: no {which} checkpoint yet (has the run finished an epoch?)"
            )
        return path
    path = Path(which)
    if not path.is_dir() and run_dir is not None and (RunDir(run_dir).checkpoints / which).is_dir():
        path = RunDir(run_dir).checkpoints / which
    if not path.is_dir():
        raise CheckpointError(f"{which}: no such checkpoint directory; pass best, latest or a step-N directory")
    return path


def recorded_lineage(run_dir: str | Path) -> int | None:
    """The lineage ``RUN/checkpoints/lineage`` says is being written, if it reads."""
    try:
        return int((RunDir(run_dir).checkpoints / LINEAGE).read_text())
    except (OSError, ValueError):
        return None


def candidates(run_dir: str | Path) -> list[Path]:
    """Where an automatic resume looks, newest intended state first.

    The checkpoint ``latest`` names, preceded by its child when a save was killed between renaming its
    directory and moving ``latest`` (the newest checkpoint, of the current lineage, whose parent ``latest``
    names); then its ancestors (the same lineage, walking back); then every other checkpoint, newest first.
    A checkpoint marked diverged is never among them.
    """
    found = readable(run_dir)
    by_name = {p.name: (p, m) for p, m in found}
    order: list[Path] = []
    pointed = pointed_to(run_dir, LATEST)
    if pointed is not None:
        if found:
            newest, meta = found[-1]
            if (
                newest != pointed
                and meta.get("parent") == pointed.name
                and meta.get("lineage") == recorded_lineage(run_dir)
            ):
                order.append(newest)
        order.append(pointed)
        name = pointed.name
        while name in by_name and (parent := by_name[name][1].get("parent")) in by_name:
            if by_name[parent][0] in order:
                break
            order.append(by_name[parent][0])
            name = parent
    order += [p for p, _ in reversed(found) if p not in order]
    diverged = {p for p, m in found if health(m) == DIVERGED}
    return [p for p in order if p not in diverged]
