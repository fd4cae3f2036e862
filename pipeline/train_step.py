"""One training step, read top to bottom: forward, loss, backward, the divergence guard's verdict, the update.

``TrainStep.__call__`` is the whole of it; the phase marks (what the watchdog, the straggler figures and
the profiler see) are one line at each boundary. The parts it runs are built here too: the model under
DDP over the data-parallel group, and fused SGD (its kernel skips an update the guard rejects, on the
device, without a host sync). The loop around it (``pipeline.train``) sets nothing inside a step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config import OptimConfig
from pipeline.faults.divergence import DivergenceGuard, Rerun
from pipeline.mesh import Mesh
from pipeline.phases import PhaseMarks


class FirstCompile:
    """Under ``--model.compile`` the first training step and the first validation batch compile: the
    watchdog allows that phase ("compile") longer than a step. Each asks once."""

    def __init__(self, enabled: bool):
        self._pending = {"train", "validation"} if enabled else set()

    def take(self, what: str) -> bool:
        """Whether ``what`` ("train" or "validation") runs for the first time and compiles now."""
        first = what in self._pending
        self._pending.discard(what)
        return first


class TrainStep:
    """The update of one batch on this rank, with the parts it needs."""

    def __init__(
        self,
        model: torch.nn.Module,
        ddp: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        guard: DivergenceGuard,
        marks: PhaseMarks,
        *,
        device: torch.device,
        amp: bool,
        compiles: FirstCompile,
        rerun_divergent: bool = False,
    ):
        self.rerun_divergent = rerun_divergent  # --faults.divergence.rerun
        self.rerun: Rerun | None = None  # the last step's re-run in place, for the loop to settle
        self.loss_weight = 1.0  # the current batch's (see __call__)
        self.model, self.ddp, self.optimizer, self.guard = model, ddp, optimizer, guard
        self.marks = marks
        self.device, self.amp, self.compiles = device, amp, compiles
        self.params: list[torch.nn.Parameter] = optimizer.param_groups[0]["params"]
        # conv1's gradient is the last one backward computes: from then on a rank only waits for the
        # gradient all-reduce (the straggler statistics tell its own work from waiting by this marker).
        first_layer = next(self.model.parameters())
        first_layer.register_post_accumulate_grad_hook(lambda _: self.marks.enter("gradient-sync"))

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        lr: float,
        step: int,
        known_bad: bool = False,
        loss_weight: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on one batch at rate ``lr``; ``step``: the steps done before it. Returns (loss, logits) on the
        device, unread: reading them costs a sync, which only logged steps pay. ``known_bad``: a batch this run
        skipped before (pipeline.faults.rerun.BadBatches): computed once, as its re-run was, and not applied.
        ``loss_weight``: this rank's share of the global batch times the dp size (pipeline.train._loss_weight),
        what the gradient is scaled by; the loss returned and judged is the rank's plain mean."""
        self.loss_weight = loss_weight
        compiling = self.compiles.take("train")  # the whole first step is one slow "compile" phase
        self.marks.enter("compile" if compiling else "forward", step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.rerun = None
        if known_bad:  # the same dropout masks drawn and the same guard state left as where it was skipped
            return self._update(images, labels, step, compiling, known_bad=True)
        # A divergent step is re-run once in place from the same state: its update was not applied, and the
        # RNG (dropout masks) is put back as it was. Reading the verdict is one host sync per step.
        before = (_rng_state(self.device), self.guard.snapshot()) if self.rerun_divergent else None
        loss, logits = self._update(images, labels, step, compiling)
        if before is None:
            return loss, logits
        if not bool(self.optimizer.found_inf):
            self.guard.applied()
            return loss, logits
        first_local = self.guard.local
        _set_rng_state(self.device, before[0])
        self.guard.restore(before[1])
        self.marks.enter("forward", step)
        loss, logits = self._update(images, labels, step, compiling=False)
        self.rerun = self.guard.rerun_verdict(step + 1, first_local, self.optimizer.found_inf)
        if not self.rerun.reproducible:
            self.guard.applied()
        return loss, logits

    def _update(
        self, images: torch.Tensor, labels: torch.Tensor, step: int, compiling: bool, known_bad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.ddp(images)
        # A rank's slice of an epoch's last global batch is empty where that batch holds fewer samples than
        # ranks (pipeline.data's lanes): a zero loss with zero gradients, not the NaN of an empty mean.
        loss = F.cross_entropy(logits.float(), labels) if labels.numel() else logits.float().sum() * 0.0

        self.optimizer.zero_grad(set_to_none=True)
        self.marks.enter("compile" if compiling else "backward")  # then "gradient-sync" (DDP's all-reduce)
        (loss if self.loss_weight == 1.0 else loss * self.loss_weight).backward()

        self.marks.enter("step")
        # The guard's verdict (1: non-finite or a spike) stays on the device; fused SGD skips the update then.
        # Its all-reduce waits for the slowest rank: a wait phase of its own ("step-sync"), then "step" again.
        self.optimizer.found_inf = self.guard.observe(
            loss, self.params, step + 1, before_sync=lambda: self.marks.enter("step-sync"), known_bad=known_bad
        )
        self.marks.enter("step")
        self.optimizer.step()
        return loss, logits


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """Fused SGD with momentum buffers from the start (zeros: the same first step), so a rejected first
    step leaves none unset (a checkpoint then holds every buffer)."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True
    )
    for p in model.parameters():
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return optimizer


def wrap_ddp(model: torch.nn.Module, mesh: Mesh, device: torch.device, grad_compression: str) -> torch.nn.Module:
    """DDP over the data-parallel group (the model itself with one replica); bf16 gradients on request."""
    if mesh.dims.dp_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids, process_group=mesh.dp_group)
    if grad_compression == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(mesh.dp_group, default_hooks.bf16_compress_hook)
    return ddp
