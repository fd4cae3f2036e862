"""The divergence guard's price per step: the same training step with and without it.

    python -m pipeline.bench.divergence [--batch-size 16] [--steps 30] [--rounds 5] [--narrow]

Both loops run forward, loss, backward and SGD on one device with synthetic batches; the guarded one adds
``DivergenceGuard.observe`` (gradient norm, the spike rules, the latch) and hands its verdict to fused SGD as
``found_inf`` (what the trainer does); the bare one is plain SGD, as before the guard. They take turns
(``--rounds``; the best round of each counts, so a neighbour's load hits both); on a CPU the figure is the
process's CPU time per step, which a shared machine's load hardly moves (the wall clock is not). Also counted, with
torch.profiler: the operators ``observe`` launches per step (on a GPU, each is a kernel launch; none reads the
device back) and whether any of them synchronises with the host. Figures: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from pipeline.faults.config import DivergenceConfig
from pipeline.faults.divergence import DivergenceGuard
from pipeline.model import ModelConfig, build_model

NARROW = {"widths": (16, 32, 48, 48, 32), "fc_width": 64}


def _setup(narrow: bool, batch: int, device: torch.device, guarded: bool):
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=10, **(NARROW if narrow else {}))
    model = build_model(cfg).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=guarded)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    guard = DivergenceGuard(DivergenceConfig(), device, rank=0, world_size=1, dp_size=1) if guarded else None
    images = torch.randn(batch, 3, 227, 227, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    return model, opt, guard, images, labels


def _step(model, opt, guard, images, labels, step: int) -> None:
    loss = F.cross_entropy(model(images), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if guard is not None:
        opt.found_inf = guard.observe(loss, list(model.parameters()), step)
    opt.step()


def _time(setup, steps: int, device: torch.device) -> float:
    """Seconds per step: CPU time of this process on a CPU, the wall clock (synchronised) on a GPU."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    for k in range(3):
        _step(*setup, k + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    for k in range(steps):
        _step(*setup, k + 4)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (clock() - start) / steps


def observe_ops(narrow: bool, device: torch.device, calls: int = 200) -> dict[str, float]:
    """Operators one ``observe`` launches (armed rules), how many of them are host syncs (``item``), and its
    time alone (CPU time per call on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    model, opt, guard, images, labels = _setup(narrow, 2, device, guarded=True)
    guard.seen = 10_000  # every rule armed
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    params = list(model.parameters())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        guard.observe(loss, params, 1)
    top = [e for e in prof.events() if e.cpu_parent is None]  # the operators called, not their insides
    names = [e.name for e in top]
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    start = clock()
    for k in range(calls):
        guard.observe(loss, params, k + 2)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "operators": len(names),
        "host_syncs": sum(n in ("aten::item", "aten::_local_scalar_dense") for n in names),
        "ms_per_call": (clock() - start) / calls * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.divergence", description=__doc__)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--narrow", action="store_true", help="the tests' narrow model (else the paper's widths)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    setups = {g: _setup(args.narrow, args.batch_size, device, g) for g in (False, True)}
    best = {False: float("inf"), True: float("inf")}
    for _ in range(args.rounds):
        for guarded in (False, True):
            best[guarded] = min(best[guarded], _time(setups[guarded], args.steps, device))
    ops = observe_ops(args.narrow, device)
    bare, guarded = best[False] * 1e3, best[True] * 1e3
    print(
        f"{'narrow' if args.narrow else 'paper-width'} model, batch {args.batch_size}, {device}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads: bare {bare:.2f} ms/step, guarded "
        f"{guarded:.2f} ms/step ({guarded - bare:+.2f} ms, x{guarded / bare:.3f}); observe: "
        f"{ops['operators']} operators, {ops['host_syncs']} host syncs, {ops['ms_per_call']:.3f} ms a call alone"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
