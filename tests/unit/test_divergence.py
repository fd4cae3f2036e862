"""A diverging run never leaves a poisoned checkpoint and can recover by itself (pipeline.faults.divergence).

End to end on the demo data with a narrow model and a checkpoint every step: the issue's reproduction
(``--lr 300`` with warm-up) stops with one line naming a good checkpoint, from which a lower rate trains to the
end; a finite spike (a batch scaled by the harness) rolls back, skips its batches, records them, and two runs
with the same seed end with the same weights; dp=2 and tp=2 on gloo agree. In-process: the rules themselves.
"""

from __future__ import annotations

import json
import math

import torch

from pipeline.faults.config import DivergenceConfig
from pipeline.faults.divergence import DivergenceGuard

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ the rules


def _guard(**cfg) -> DivergenceGuard:
    return DivergenceGuard(DivergenceConfig(**cfg), CPU, rank=0, world_size=1, dp_size=1)


def _model_step(guard: DivergenceGuard, loss_value: float, step: int, grad: float = 1.0) -> torch.Tensor:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), grad)
    return guard.observe(torch.tensor(loss_value), [p], step)


def test_a_rejected_update_leaves_weights_and_momentum_untouched() -> None:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    guard = _guard()
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.full((3, 4), float("nan"))).sum()
    loss.backward()
    opt.found_inf = guard.observe(loss, list(model.parameters()), 1)
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(not opt.state[p]["momentum_buffer"].any() for p in model.parameters())
    event = guard.event()
    assert event.step == 1 and event.kind.startswith("non-finite") and event.ranks == [0]


def test_the_rules_on_a_plateau_a_jump_and_an_explosion() -> None:
    """The paper's first steps sit at ln(1000) with a batch's noise: never a spike. A 20% jump once armed is
    one (z-score); a loss ten times the largest seen is one at any step (the cap)."""
    g = torch.Generator().manual_seed(0)
    plateau = _guard()
    for step in range(1, 2001):
        noisy = math.log(1000) + 0.01 * float(torch.randn((), generator=g))
        assert _model_step(plateau, noisy, step) == 0, step
    assert float(plateau.pending) == 0
    assert _model_step(plateau, 1.2 * math.log(1000), 2001) == 1 and plateau.event().kind == "spike (z-score)"

    flat = _guard()  # a network that outputs the same for every image: the loss is ln(1000) exactly
    for step in range(1, 301):
        assert _model_step(flat, math.log(1000), step) == 0
    assert _model_step(flat, 1.002 * math.log(1000), 301) == 0  # noise on a std of 0 is not 6 sigma

    early = _guard()
    assert _model_step(early, 2.3, 1) == 0 and _model_step(early, 1.2 * 2.3, 2) == 0  # z-score not armed yet
    assert _model_step(early, 30.0, 3) == 1 and early.event().kind == "spike (above the cap)"
    off = _guard(spike_sigma=0, spike_factor=0)
    assert _model_step(off, 2.3, 1) == 0 and _model_step(off, 1e6, 2) == 0
    assert _model_step(off, 1.0, 3, grad=float("inf")) == 1  # non-finite is never switched off

    state = plateau.state_dict()
    again = _guard()
    again.load_state_dict(json.loads(json.dumps(state)))  # what meta.json holds
    assert again.seen == 2001 and torch.equal(again.window, plateau.window) and float(again.pending) == 0


def test_a_resume_lists_each_changed_setting() -> None:
    from pipeline.config import RunConfig, changes

    was = RunConfig().to_dict()
    now = RunConfig().to_dict()
    now["optim"]["lr"], now["optim"]["batch_size"], now["data"]["data"] = 0.001, 256, "/other"
    now["model"]["widths"] = [48, 128, 192, 192, 128]
    assert changes(was, now) == [
        f"--data.data {was['data']['data']} -> /other",
        "--model.widths 96,256,384,384,256 -> 48,128,192,192,128",
        "--optim.batch-size 128 -> 256",
        "--optim.lr 0.01 -> 0.001",
    ]
    assert changes(was, RunConfig().to_dict()) == []


# ------------------------------------------------------------------------------------------ skipping a batch


def _diverge_again(guard: DivergenceGuard, step: int) -> None:
    """A step that diverges (NaN), is re-run from the guard's snapshot, and diverges again (pipeline.train_step)."""
    before = guard.snapshot()
    _model_step(guard, float("nan"), step)
    guard.restore(before)
    _model_step(guard, float("nan"), step)


def test_skips_are_bounded_in_a_row_and_per_run_and_leave_no_latched_divergence() -> None:
    """Two batches in a row may be skipped, the third in a row is the state's fault; after an applied step the
    streak starts again; the run's total is bounded too. A skipped step is not latched for the control step."""
    guard = _guard(max_skips=3, max_skips_in_a_row=2)
    for step in (1, 2):
        _diverge_again(guard, step)
        assert guard.may_skip() == ""
        guard.skip(step=step, epoch=0, batch=step - 1, batch_size=8)
        assert guard.pending == 0  # nothing for the control all-reduce to act on
    _diverge_again(guard, 3)
    assert "the state, not the batch, is at fault" in guard.may_skip() and guard.streak_first == 1
    assert guard.pending == 3  # not skipped: latched, the control step acts on it
    guard.clear()
    guard.applied()
    _diverge_again(guard, 5)
    assert guard.may_skip() == ""
    guard.skip(step=5, epoch=0, batch=4, batch_size=8)
    guard.applied()
    _diverge_again(guard, 7)
    assert guard.may_skip() == "3 batches skipped already (--faults.divergence.max-skips 3)"


def test_skips_survive_a_checkpoint_and_an_old_checkpoint_reads_unchanged() -> None:
    guard = _guard()
    old = guard.state_dict()
    assert "skipped" not in old  # a run that skipped nothing saves what older versions saved
    _diverge_again(guard, 4)
    guard.skip(step=4, epoch=0, batch=3, batch_size=8)
    state = json.loads(json.dumps(guard.state_dict()))
    again = _guard()
    again.load_state_dict(state)
    assert again.skipped == [{"step": 4, "epoch": 0, "batch": 3, "batch_size": 8}]
    assert (again.in_a_row, again.streak_first) == (1, 4)
    again.load_state_dict(old)
    assert again.skipped == [] and (again.in_a_row, again.streak_first) == (0, 0)
