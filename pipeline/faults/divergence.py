"""Divergence: an update whose loss or gradient norm is non-finite, or whose loss spikes, is never applied.

Each step, after backward and before ``optimizer.step``, :meth:`DivergenceGuard.observe` decides on the
device, with no host sync:

- one all-reduce (SUM over every rank) of ``[loss, grad_norm², local_bad]``: the dp-mean loss, the total
  gradient norm (the towers partition the parameters; dp replicas hold the same gradients after DDP, so the
  sum is divided by dp_size) and whether any rank saw a non-finite value. A NaN or inf anywhere makes the
  sum non-finite, so every rank reaches the same verdict from the same numbers. It is the one collective
  added per step: the control all-reduce comes every ``control_every`` steps, too late to keep an update
  from being applied, and DDP's gradient buckets carry neither the loss (a spike on one dp rank) nor the
  towers' agreement under tp=2; 3 floats, queued behind backward, never waited for by the host;
- the spike rules on that mean loss (every rank computes the same answer): OLMo-core's z-score (a loss more
  than ``spike_sigma`` standard deviations above the mean of the last ``spike_window`` accepted losses,
  armed after ``spike_warmup`` steps and a full window), and Megatron-LM's cap (a loss above
  ``spike_factor`` times the largest loss accepted so far, armed from the second step);
- the verdict is a 0/1 float on the device that the trainer hands to fused SGD as ``found_inf`` (the
  mechanism GradScaler uses): the kernel itself skips the update, weights and momentum untouched.

The first divergent step since the last control step is latched on the device (step, kind, loss, gradient
norm, this rank's own flags); the trainer's control all-reduce carries its step, and only then, on the rare
path, :meth:`event` reads it to the host and gathers which ranks saw it.

Why the defaults never trip in normal training: cross-entropy starts at about ln(classes) (6.9 for the
paper's 1000, 2.3 for the demo's 10) and falls. The cap (10x the largest loss seen) asks for a loss of 69 /
23, which only a diverging network reaches. The z-score rule waits 200 steps and a full window of 128: the
paper's recipe (N(0, 0.01) init, lr 0.01) sits on a plateau at ln(1000) for its first thousands of steps,
where the window's std is tiny; the std is therefore taken as at least 1% of the window's mean, so noise on
a plateau needs a 6% jump (6.9 -> 7.3) to count, which a batch of 128 at chance does not make (its loss
varies by about 0.01). The demo's curve (configs/demo.toml) is checked in tests/{unit,integration}/test_divergence.py.

With ``--faults.divergence.rerun`` (the default) a divergent step is first re-run in place
(:mod:`pipeline.train_step`). Diverged again, the batch is at fault and skipped: the update is not applied,
the run goes on, and :class:`BadBatches` remembers it (RUN_DIR/bad_batches.jsonl) so that a resume meeting the
same batch again skips it without re-running it, keeping the trajectory of the run that went straight on.
Skips are bounded (``max_skips`` a run, ``max_skips_in_a_row``): when every batch diverges, the state is at
fault, and the streak's first step is acted on as below.

What follows a divergence (stop or rollback) is decided by the trainer with :func:`rollback_plan`; this
module's state (the window, the largest loss, the rollbacks and the learning-rate scale they left, the skipped
batches) is part of every checkpoint (``state_dict``), so a resume continues the same rule and a rerun
reproduces it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.faults.config import DivergenceConfig

KINDS = {1: "non-finite (NaN/inf)", 2: "spike (z-score)", 3: "spike (above the cap)"}
STD_FLOOR = 0.01  # the window's std is at least this fraction of its mean (a flat plateau is not 0 +- 0)
_STEP, _KIND, _LOSS, _NORM, _LOCAL_LOSS, _LOCAL_GRAD = range(6)  # slots of the latched record


@dataclass
class Rerun:
    """A divergent step re-run in place (same weights and momentum, batch and dropout masks), as every rank saw it."""

    step: int  # steps done, the divergent one included
    reproducible: bool  # diverged again: the batch (or the state) is at fault, not the hardware
    ranks: list[int]  # the ranks whose own loss differed between the two runs (under tp=2: both towers)


@dataclass
class Event:
    """The first divergent step since the last control step, as every rank agreed on it."""

    step: int  # steps done, the divergent one included
    kind: str
    loss: float  # the dp-mean loss
    grad_norm: float
    ranks: list[int] | None  # the ranks whose own loss or gradients were non-finite; None: all (a spike)

    def describe(self) -> str:
        where = "all ranks" if self.ranks is None else "rank(s) " + ",".join(map(str, self.ranks))
        return f"{self.kind} at step {self.step} on {where} (loss {self.loss:.4g}, grad norm {self.grad_norm:.4g})"


class DivergenceGuard:
    """The per-step rule and its state; one per rank, identical on every rank."""

    def __init__(self, cfg: DivergenceConfig, device: torch.device, *, rank: int, world_size: int, dp_size: int):
        self.cfg = cfg
        self.device = device
        self.rank, self.world_size, self.dp_size = rank, world_size, dp_size
        self.window = torch.zeros(cfg.spike_window, device=device)
        self.largest = torch.zeros((), device=device)
        self.seen = 0  # steps observed (host-side: the rules arm without reading the device)
        self.record = torch.zeros(6, device=device)  # the latched first divergent step (slot _STEP 0: none)
        self.grad_norm = torch.zeros((), device=device)  # the last step's total gradient norm
        self.local = torch.zeros(2, device=device)  # this rank's own [loss, gradient norm²] of the last step
        self.rollbacks: list[dict[str, Any]] = []
        self.lr_scale = 1.0  # the product of --faults.divergence.rollback-lr-factor over the rollbacks taken
        self.skipped: list[dict[str, Any]] = []  # the batches skipped for diverging again when re-run
        self.in_a_row = 0  # steps skipped since the last applied one
        self.streak_first = 0  # the first of them (0: none): a stop or rollback acts from there

    # -- every step

    def observe(
        self,
        loss: torch.Tensor,
        parameters: list[torch.nn.Parameter],
        step: int,
        before_sync: Callable[[], None] | None = None,
        known_bad: bool = False,
    ) -> torch.Tensor:
        """The verdict on the step about to be applied (``step`` counts it): 1.0 skips it (``found_inf``).
        ``before_sync`` is called just before the all-reduce (on every rank, alone too): the trainer's mark
        of a wait phase, so waiting for a slower rank there is not counted as this rank's own work.
        ``known_bad``: a batch skipped before (:class:`BadBatches`), skipped again whatever its numbers say,
        and not latched as a new divergence."""
        grads = [p.grad for p in parameters if p.grad is not None]  # leaves: no graph to detach from
        grad_sq = torch.stack(torch._foreach_norm(grads)).float().square().sum()
        pair = torch.stack([loss.detach().float(), grad_sq])
        self.local = pair
        local_bad = ~torch.isfinite(pair)  # this rank's own [loss, gradients] non-finite, to name it later
        both = torch.cat([pair, local_bad.any().float().unsqueeze(0)])
        if before_sync is not None:
            before_sync()
        if self.world_size > 1:
            dist.all_reduce(both)  # SUM over the world: NaN/inf on any rank reaches every rank
        mean = both[0] / self.world_size
        self.grad_norm = (both[1] / self.dp_size).sqrt()
        nonfinite = (both[2] > 0) | ~torch.isfinite(both[:2]).all()
        kind = nonfinite.float()  # 1: non-finite
        cfg = self.cfg
        self.seen += 1
        if cfg.spike_sigma > 0 and self.seen > max(cfg.spike_warmup, cfg.spike_window):
            avg, std = self.window.mean(), self.window.std()
            z_trip = mean - avg > cfg.spike_sigma * torch.maximum(std, STD_FLOOR * avg.abs())
            kind = torch.where((kind == 0) & z_trip, 2.0, kind)
        if cfg.spike_factor > 0 and self.seen > 1:
            kind = torch.where((kind == 0) & (mean > cfg.spike_factor * self.largest), 3.0, kind)
        bad = (kind > 0) | known_bad
        # A rejected loss enters neither the window nor the largest seen (it would raise the bar for the next).
        slot = (self.seen - 1) % cfg.spike_window
        self.window[slot] = torch.where(bad, self.window[slot], mean)
        self.largest = torch.where(bad, self.largest, torch.maximum(self.largest, mean))
        first = bad & (self.record[_STEP] == 0) & (not known_bad)
        step_t = torch.full((), float(step), device=self.device)  # exact in float32 below 2**24 steps
        head = torch.stack([step_t, kind, mean, self.grad_norm])
        now = torch.cat([head, local_bad.float()])
        self.record = torch.where(first, now, self.record)
        return bad.float()

    # -- a re-run in place (pipeline.train_step: only after a divergent step, every rank together)

    def snapshot(self) -> tuple[Any, ...]:
        """What :meth:`observe` changes about a rejected step (its window slot is left as it was)."""
        return self.seen, self.record, self.largest, self.grad_norm, self.local

    def restore(self, snapshot: tuple[Any, ...]) -> None:
        self.seen, self.record, self.largest, self.grad_norm, self.local = snapshot
        self._record_before = self.record  # what :meth:`skip` puts back: the re-run latches the step again

    # -- skipping a batch that diverged again (pipeline.train: every rank decides the same from the same Rerun)

    def may_skip(self) -> str:
        """Why the batch that just diverged again may not be skipped ("" if it may): the bounds are spent."""
        if len(self.skipped) >= self.cfg.max_skips:
            return f"{len(self.skipped)} batches skipped already (--faults.divergence.max-skips {self.cfg.max_skips})"
        if self.in_a_row >= self.cfg.max_skips_in_a_row:
            return (
                f"the {self.in_a_row} steps before it were skipped too (--faults.divergence.max-skips-in-a-row "
                f"{self.cfg.max_skips_in_a_row}): the state, not the batch, is at fault"
            )
        return ""

    def skip(self, *, step: int, epoch: int, batch: int, batch_size: int, known: bool = False) -> None:
        """The step's batch is skipped: no update, no divergence latched (``known``: it was never latched)."""
        if not known:
            self.record = self._record_before
        self.skipped.append({"step": step, "epoch": epoch, "batch": batch, "batch_size": batch_size})
        if self.cfg.rerun:  # without re-runs no step's verdict is read on the host: no streak can be told to end
            self.streak_first = self.streak_first or step
            self.in_a_row += 1

    def applied(self) -> None:
        """A step's update was applied: a streak of skips (if any) has ended."""
        self.in_a_row, self.streak_first = 0, 0

    def rerun_verdict(self, step: int, first_local: torch.Tensor, again_bad: torch.Tensor) -> Rerun:
        """Collective: whether the re-run diverged too, and which ranks' own loss differed between the runs (a
        deterministic recomputation on sound hardware gives the same numbers; NaN equals NaN here). The loss,
        not the gradients: DDP's all-reduce hands one rank's bad gradients to every rank."""
        first, now = first_local[0], self.local[0]
        differs = ~((first == now) | (torch.isnan(first) & torch.isnan(now)))
        differs = differs.float().reshape(1)
        if self.world_size > 1:
            gathered = [torch.zeros_like(differs) for _ in range(self.world_size)]
            dist.all_gather(gathered, differs)
        else:
            gathered = [differs]
        return Rerun(step, bool(again_bad), [r for r, d in enumerate(gathered) if d.item() > 0])

    @property
    def pending(self) -> torch.Tensor:
        """The first divergent step since the last control step (0: none), for the control all-reduce."""
        return self.record[_STEP]

    # -- at a control step that found one (collective, rare)

    def event(self) -> Event:
        record = self.record.tolist()
        flags = self.record[_LOCAL_LOSS:].clone()
        if self.world_size > 1:
            gathered = [torch.zeros_like(flags) for _ in range(self.world_size)]
            dist.all_gather(gathered, flags)
        else:
            gathered = [flags]
        by_loss = [r for r, f in enumerate(gathered) if f[0] > 0]
        by_grad = [r for r, f in enumerate(gathered) if f[1] > 0]
        ranks = by_loss or by_grad or None
        return Event(int(record[_STEP]), KINDS[int(record[_KIND])], record[_LOSS], record[_NORM], ranks)

    def clear(self) -> None:
        self.record.zero_()

    def rolled_back(
        self, rollback: dict[str, Any], history: list[dict[str, Any]], skipped: list[dict[str, Any]]
    ) -> None:
        """After the state was restored (its window and largest loss): the run's rollbacks so far (``history``,
        not the restored checkpoint's, which may predate some) and this one; it scales the learning rate. The
        run's skipped batches (``skipped``) still count against --faults.divergence.max-skips."""
        self.rollbacks = [*history, rollback]
        self.lr_scale = rollback["lr_scale"]
        self.skipped = skipped
        self.applied()  # the restored state is a good one: no streak of skips runs on from it
        self.clear()

    # -- checkpointed

    def state_dict(self) -> dict[str, Any]:
        state = {
            "window": self.window.tolist(),
            "largest": float(self.largest),
            "seen": self.seen,
            "rollbacks": [dict(r) for r in self.rollbacks],
            "lr_scale": self.lr_scale,
        }
        if self.skipped:  # absent until a batch is skipped: older checkpoints read and save unchanged
            state["skipped"] = [dict(s) for s in self.skipped]
            state["in_a_row"], state["streak_first"] = self.in_a_row, self.streak_first
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        window = torch.tensor(state["window"], device=self.device, dtype=torch.float32)
        if window.numel() == self.window.numel():
            self.window, self.seen = window, int(state["seen"])
        else:  # another --faults.divergence.spike-window: the rule re-arms after a fresh window
            self.window.zero_()
            self.seen = 0
        self.largest = torch.tensor(float(state["largest"]), device=self.device)
        self.rollbacks = [dict(r) for r in state["rollbacks"]]
        self.lr_scale = float(state["lr_scale"])
        self.skipped = [dict(s) for s in state.get("skipped", [])]
        self.in_a_row, self.streak_first = int(state.get("in_a_row", 0)), int(state.get("streak_first", 0))
        self.clear()


def lr_scale_on_resume(guard: DivergenceGuard, *, was_lr: float | None, now_lr: float) -> str:
    """After a resume restored the rollbacks' learning-rate scale: keep it, or drop it when ``--optim.lr`` changed
    (a new --lr means what it says) unless ``--faults.divergence.keep-lr-scale``; returns why, for the resume line."""
    stored = guard.lr_scale
    if stored == 1.0:
        return "no rollback scale"
    if was_lr is None or was_lr == now_lr:
        return f"x the rollbacks' stored scale {stored:g}"
    if guard.cfg.keep_lr_scale:
        return (
            f"x the rollbacks' stored scale {stored:g}, kept for the new --optim.lr (--faults.divergence.keep-lr-scale)"
        )
    guard.lr_scale = 1.0
    return (
        f"the rollbacks' stored scale {stored:g} dropped: --optim.lr changed {was_lr:g} -> {now_lr:g} "
        "(--faults.divergence.keep-lr-scale true keeps it)"
    )


def rollback_plan(
    guard: DivergenceGuard, event: Event, *, good: Any, good_step: int | None, step: int
) -> tuple[dict[str, Any] | None, str]:
    """Whether to roll back (the record to keep) and why not otherwise (a phrase for the stop line)."""
    cfg = guard.cfg
    if cfg.action != "rollback":
        return None, ""
    if good is None:
        return None, "no good checkpoint to roll back to"
    if len(guard.rollbacks) >= cfg.max_rollbacks:
        return None, f"{len(guard.rollbacks)} rollbacks already (--faults.divergence.max-rollbacks {cfg.max_rollbacks})"
    scale = guard.lr_scale * cfg.rollback_lr_factor
    return {
        "at_step": step,
        "diverged_step": event.step,
        "kind": event.kind,
        "loss": event.loss if math.isfinite(event.loss) else str(event.loss),
        "grad_norm": event.grad_norm if math.isfinite(event.grad_norm) else str(event.grad_norm),
        "ranks": event.ranks,
        "checkpoint": getattr(good, "name", str(good)),
        "restored_step": good_step,
        "skipped_steps": [good_step + 1, step],  # the batches of these steps (inclusive) are never trained on
        "lr_scale": scale,
    }, ""


def stop_line(event: Event, good: Any, why: str, mode: str, skipped_from: int = 0) -> str:
    """The one line a stop prints: what diverged where, and the checkpoint the same command resumes from.
    ``skipped_from``: the first of the steps just before it that were skipped (0: none)."""
    if good is not None:
        resume = f"the same command resumes from the last good checkpoint {good} (latest names it); lower --lr"
    else:
        resume = (
            "no good checkpoint exists (none was followed by a finite step), so the same command starts afresh; "
            "lower --lr or add --schedule.warmup-epochs"
        )
    why = f" ({why})" if why else ""
    streak = ""
    if skipped_from and skipped_from < event.step:
        streak = (
            f", after the batches of steps {skipped_from}..{event.step - 1} diverged again when re-run and were "
            "skipped (every batch diverges: the state is at fault)"
        )
    return (
        f"training diverged: {event.describe()}{streak}; its update was not applied and nothing after it was "
        f"saved{why}; "
        f"{resume}, or check the data" + (", or pass --faults.divergence.action rollback" if mode == "stop" else "")
    )
