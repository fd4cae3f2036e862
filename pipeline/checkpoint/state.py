"""The training state a checkpoint holds, and how it becomes tensors and JSON and back.

Tensors (this rank's towers, momentum and RNG) go to DCP; the JSON-able rest (progress, layout, schedule,
config, dataset, divergence guard) to meta.json. The model is always in tower form (``tower{t}.model.*``,
``tower{t}.momentum.*``) whatever tp the run used, so a checkpoint loads into tp=1 or tp=2 and any number of
dp replicas. Per-rank RNG states (``rng.rank{r}.*``) are plain tensors, never pickles.
"""

from __future__ import annotations

import math
import random
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
import torch.distributed as dist

from pipeline import model as model_lib
from pipeline.data.epoch_plan import SAMPLE_ORDER

if TYPE_CHECKING:  # both import the config, which imports this package (CheckpointConfig)
    from pipeline.config import RunConfig
    from pipeline.faults.divergence import DivergenceGuard
    from pipeline.schedule import LRSchedule

# RNG states a checkpoint may lack in the same layout: a CPU run never initialises CUDA, so saves none.
OPTIONAL_RNG = (".cuda",)


class Layout(TypedDict):
    """The process layout a state was saved under (meta.json's ``layout``)."""

    world_size: int
    dp_size: int
    tp_size: int


class DatasetIdentity(TypedDict):
    """What a run trains on (meta.json's ``dataset``): shown when a resume finds it changed."""

    path: str
    manifest_sha256: str


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress (or the next one, at an epoch boundary)
    step: int = 0  # optimizer steps taken since the start of training
    step_in_epoch: int = 0  # global steps of ``epoch`` already taken: its first step_in_epoch x global batch samples


@dataclass(eq=False, repr=False)  # live models and optimizers: identity, not value
class TrainState:
    """Everything a restart needs: model towers, SGD momentum, RNG, progress, schedule, config, layout.

    ``state_dict()`` gives ``{"tensors": ..., "meta": ...}``. The trainer owns the live objects; this class
    only translates.
    """

    model: torch.nn.Module
    optimizer: torch.optim.SGD
    schedule: LRSchedule
    config: RunConfig
    layout: Layout
    rank: int
    tp_rank: int
    towers: int = 2  # 1: a one-column model (no split), stored as a single tower
    _: KW_ONLY
    divergence: DivergenceGuard | None = None  # its state travels in meta.json when the run has one
    dataset: DatasetIdentity | None = None
    progress: Progress = field(default_factory=Progress)
    best_top1_error: float | None = None
    rng_restored: set[str] = field(default_factory=set)  # the RNG states the last load applied ("torch", ...)

    # -- tower form: under tp=2 a rank holds its own tower; under tp=1 all of them (model.to_towers)

    def _to_towers(self, full: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
        if self.layout["tp_size"] == 2:
            return {self.tp_rank: full}
        return model_lib.to_towers(full, self.towers)

    def _from_towers(self, towers: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if self.layout["tp_size"] == 2:
            return towers[self.tp_rank]
        return model_lib.from_towers(towers)

    def _model_and_momentum(self, copy: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """On the host; ``copy``: always a copy (a CPU tensor's ``.cpu()`` is the live tensor itself)."""
        model_sd = {k: v.detach().to("cpu", copy=copy) for k, v in model_lib.unwrap(self.model).state_dict().items()}
        momentum = {}
        for name, p in self.model.named_parameters():
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            momentum[name] = (buf if buf is not None else torch.zeros_like(p)).detach().to("cpu", copy=copy)
        return model_sd, momentum

    def tensors(self, copy: bool = False) -> dict[str, torch.Tensor]:
        """This rank's tensors; ``copy`` for a background save, which must not see later updates."""
        model_sd, momentum = self._model_and_momentum(copy)
        out: dict[str, torch.Tensor] = {}
        for part, full in (("model", model_sd), ("momentum", momentum)):
            for t, sd in self._to_towers(full).items():
                out.update({f"tower{t}.{part}.{k}": v for k, v in sd.items()})
        out.update({f"rng.rank{self.rank}.{k}": v for k, v in rng_tensors().items()})
        return out

    def tensor_templates(self, with_rng: bool) -> dict[str, torch.Tensor]:
        """The keys (and shapes) a load into this layout needs."""
        return {k: v for k, v in self.tensors().items() if with_rng or not k.startswith("rng.")}

    def meta(self) -> dict[str, Any]:
        return {
            "progress": vars(self.progress).copy(),
            "sample_order": SAMPLE_ORDER,  # the epoch order step_in_epoch counts in (none before it was dp-independent)
            "layout": dict(self.layout),
            "schedule": self.schedule.state_dict(),
            "best_top1_error": self.best_top1_error,
            "config": self.config.to_dict(),
            "dataset": dict(self.dataset or {}),
            **({"divergence": self.divergence.state_dict()} if self.divergence is not None else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors(), "meta": self.meta()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load ``{"tensors", "meta"}``; RNG tensors are applied when present (same layout only)."""
        tensors, meta = state["tensors"], state["meta"]
        parts: dict[str, dict[int, dict[str, torch.Tensor]]] = {"model": {}, "momentum": {}}
        for key, value in tensors.items():
            if key.startswith("tower"):
                head, part, name = key.split(".", 2)
                parts[part].setdefault(int(head[len("tower") :]), {})[name] = value
        model_lib.unwrap(self.model).load_state_dict(self._from_towers(parts["model"]))
        momentum = self._from_towers(parts["momentum"])
        for name, p in self.model.named_parameters():
            # In the live parameter's strides, not the saved ones: a run resumed with another memory layout
            # (--model.channels-last flipped) would otherwise hand fused SGD a channels_last buffer for a
            # contiguous weight, which CUDA refuses and the CPU kernel applies element by element in the
            # wrong order (scrambled momentum). copy_ reorders the values into the parameter's layout.
            self.optimizer.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(momentum[name])
        prefix = f"rng.rank{self.rank}."
        rng = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if rng:
            set_rng_tensors(rng)
        self.rng_restored = set(rng)
        self.schedule.load_state_dict(meta["schedule"])
        self.best_top1_error = meta["best_top1_error"]
        self.progress = Progress(**meta["progress"])
        if self.divergence is not None and "divergence" in meta:
            self.divergence.load_state_dict(meta["divergence"])

    def all_finite(self, device: torch.device, group: dist.ProcessGroup | None = None) -> bool:
        """Weights and momentum finite on every rank (collective when distributed)."""
        bad = torch.zeros((), device=device)
        for p in self.model.parameters():
            if not torch.isfinite(p.detach()).all():
                bad.fill_(1)
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None and not torch.isfinite(buf).all():
                bad.fill_(1)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
        return not bool(bad)


def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states as plain tensors (no pickle): torch, CUDA, Python, NumPy."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([version, *words], dtype=torch.int64),
        "python_gauss": torch.tensor([math.nan if gauss is None else gauss], dtype=torch.float64),
        "numpy": torch.tensor([*keys.tolist(), pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_tensors(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"].tolist()
    gauss = float(state["python_gauss"][0])
    random.setstate((py[0], tuple(py[1:]), None if math.isnan(gauss) else gauss))
    npy = state["numpy"].tolist()
    np.random.set_state(
        ("MT19937", np.array(npy[:624], dtype=np.uint32), npy[624], npy[625], float(state["numpy_gauss"][0]))
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
