"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, resumable, reshardable over (dp, tp).

Layout::

    RUN/checkpoints/step-00001234/   one DCP checkpoint (.metadata + one __R_0.distcp per writing rank)
                                     + meta.json (progress, schedule, config, metrics; written last)
    RUN/checkpoints/latest           name of the newest complete checkpoint (replaced atomically)
    RUN/checkpoints/best             name of the checkpoint with the best val top-1

The saved model is always in the *tower* form, whatever tp the run used: keys
``tower{t}.model.<name>`` and ``tower{t}.momentum.<name>`` for t in {0, 1}. A tp=2 rank writes
its own tower; a tp=1 rank splits its grouped model into the two towers first (the conversion in
``pipeline.model`` is exact). Replicas on other dp ranks write the same keys, which DCP
deduplicates, so each tower is stored once. Loading asks DCP for the keys the new layout needs,
so a checkpoint loads into tp=1 or tp=2 and any number of dp ranks. Per-rank RNG states
(``rng.rank{r}``) are restored only when the layout is unchanged (bit-exact resume); a different
layout resumes with fresh per-rank seeds.

Atomicity: a checkpoint is written into ``step-N.tmp``; only after every rank's data and the
metadata are on disk does global rank 0 write meta.json, rename the directory to ``step-N`` and
then replace ``latest``. A crash at any point leaves ``latest`` pointing at the previous complete
checkpoint; leftover ``.tmp`` directories are ignored and removed by the next save.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from preprocess.errors import UserError
from preprocess.files import fsync_dir, write_bytes_atomic, write_json_atomic

LATEST = "latest"
BEST = "best"
META = "meta.json"


@dataclass
class CheckpointConfig:
    every_minutes: float = 30.0
    """also save every this many minutes (besides every epoch); 0 = never by time"""
    every_steps: int = 0
    """also save every this many optimizer steps; 0 = never by step count"""
    keep_last: int = 3
    """keep this many newest checkpoints (plus the best one)"""
    keep_best: bool = True
    """keep the checkpoint with the best validation top-1 error"""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


class Checkpointer:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, rank: int, process_group: Any = None):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.rank = rank
        self.group = process_group
        self._last_save = time.monotonic()
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ when

    def time_due(self) -> bool:
        """Global rank 0's clock decides; the trainer shares the decision with every rank."""
        return self.cfg.every_minutes > 0 and time.monotonic() - self._last_save >= 60 * self.cfg.every_minutes

    def step_due(self, step: int) -> bool:
        """Every rank computes the same answer from the step count alone."""
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    # ------------------------------------------------------------------ save

    def save(self, step: int, towers: dict[int, dict[str, torch.Tensor]], rng: bytes,
             meta: dict[str, Any], *, is_best: bool = False) -> Path:
        """Collective: every rank calls it at the same step with the towers it holds."""
        final = self.dir / step_name(step)
        tmp = self.dir / (step_name(step) + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()

        state: dict[str, Any] = {f"rng.rank{self.rank}": io.BytesIO(rng)}
        for tower, tensors in towers.items():
            for key, value in tensors.items():
                state[f"tower{tower}.{key}"] = value.detach()
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True),
                 process_group=self.group)
        # dcp.save returns once every rank's data and the global metadata are written.

        if self.rank == 0:
            write_json_atomic(tmp / META, {**meta, "step": step, "saved_at": time.time()})
            if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.dir)
            write_bytes_atomic(self.dir / LATEST, final.name.encode())
            if is_best and self.cfg.keep_best:
                write_bytes_atomic(self.dir / BEST, final.name.encode())
            self._prune()
        self._barrier()
        self._last_save = time.monotonic()
        return final

    def _prune(self) -> None:
        keep = {p.name for p in self.complete()[-max(self.cfg.keep_last, 1):]}
        best = self._pointer(BEST)
        if best is not None and self.cfg.keep_best:
            keep.add(best.name)
        for entry in self.dir.iterdir():
            if entry.is_dir() and entry.name.startswith("step-") and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    # ------------------------------------------------------------------ find

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (a directory with meta.json and no .tmp suffix)."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir()
                 if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp") and (p / META).exists()]
        return sorted(found, key=lambda p: p.name)

    def _pointer(self, name: str) -> Path | None:
        try:
            target = (self.dir / name).read_text().strip()
        except FileNotFoundError:
            return None
        path = self.dir / target
        return path if (path / META).exists() else None

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, else the newest complete one (pointer lost), else None."""
        pointed = self._pointer(LATEST)
        if pointed is not None:
            return pointed
        found = self.complete()
        return found[-1] if found else None

    # ------------------------------------------------------------------ load

    @staticmethod
    def read_meta(path: Path) -> dict[str, Any]:
        try:
            return json.loads((Path(path) / META).read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a complete checkpoint ({e}); pass another --resume") from None

    def load(self, path: Path, templates: dict[int, dict[str, torch.Tensor]],
             *, want_rng: bool) -> tuple[dict[int, dict[str, torch.Tensor]], bytes | None]:
        """Fill tower tensors shaped like ``templates`` from ``path``; the RNG only if ``want_rng``."""
        state: dict[str, Any] = {}
        for tower, tensors in templates.items():
            for key, value in tensors.items():
                state[f"tower{tower}.{key}"] = torch.empty_like(value, device="cpu")
        if want_rng:
            state[f"rng.rank{self.rank}"] = io.BytesIO()
        try:
            dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), process_group=self.group)
        except Exception as e:  # DCP wraps missing keys / bad shapes in CheckpointException
            raise UserError(f"{path}: cannot load this checkpoint into the current model "
                            f"({str(e).splitlines()[0][:300]}); check --num-classes and widths") from None
        towers = {t: {k: state[f"tower{t}.{k}"] for k in tensors} for t, tensors in templates.items()}
        rng = state[f"rng.rank{self.rank}"].getvalue() if want_rng else None
        return towers, rng

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.group)


def read_towers(path: str | Path) -> dict[int, dict[str, torch.Tensor]]:
    """All tower tensors of a checkpoint, offline (no process group): {tower: {"model.x": t, ...}}."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        flat_path = Path(tmp) / "flat.pt"
        dcp_to_torch_save(str(path), str(flat_path))
        flat = torch.load(flat_path, map_location="cpu", weights_only=False)
    towers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if key.startswith("tower"):
            head, rest = key.split(".", 1)
            towers.setdefault(int(head[len("tower"):]), {})[rest] = value
    return towers


def export_model(path: str | Path) -> dict[str, torch.Tensor]:
    """The single-device (grouped) AlexNet state dict of a checkpoint, for ``AlexNet.load_state_dict``."""
    from pipeline.model import merge_tower_state_dicts

    towers = read_towers(path)
    return merge_tower_state_dicts([{k[len("model."):]: v for k, v in towers[t].items() if k.startswith("model.")}
                                    for t in sorted(towers)])
