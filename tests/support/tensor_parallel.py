"""Two gloo ranks on CPU for the tensor-parallel tests: a spawner with a deadline, the group a rank joins, and
the rank body (the spawner and the group serve the other spawned rank bodies too).

The rank body lives here (not in a test module) so spawned processes import it without pytest's
collection; ranks read their inputs from and write their results to files, and the test process
compares them with the single-device model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.model import ModelConfig, build_model, tower_state_dict
from pipeline.parallel import exchange, gather_replicated

WORLD = 2


def spawn_two_ranks(fn: Callable[..., None], args: tuple[Any, ...], timeout_s: float = 120.0) -> None:
    """Run ``fn(rank, *args)`` in two processes; raise if one fails or both are not done in time."""
    spawn_ranks(fn, args, WORLD, timeout_s)


def spawn_ranks(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int, timeout_s: float = 120.0) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` processes; raise if one fails or they are not all done in time."""
    deadline = time.monotonic() + timeout_s
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    try:
        # join returns as soon as one process exits (False while another runs) and raises
        # ProcessRaisedException, after stopping the others, if one failed
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{nprocs} ranks still running after {timeout_s:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


@contextmanager
def gloo_group(rank: int, workdir: str, world: int = WORLD) -> Iterator[Path]:
    """This process as ``rank`` of a gloo group of ``world`` met through the file store ``workdir/store``, on
    one thread (the ranks share the CPU); the group is destroyed on the way out. Yields ``workdir``."""
    torch.set_num_threads(1)
    root = Path(workdir)
    dist.init_process_group(
        "gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        yield root
    finally:
        dist.destroy_process_group()


def tp_ranks(rank: int, workdir: str) -> None:
    """One rank: for every case in ``workdir/cases.pt`` build the tower, run it, save what it saw."""
    with gloo_group(rank, workdir) as root:
        group = dist.new_group(list(range(WORLD)))  # the model must use the group it is given
        cases = torch.load(root / "cases.pt")
        results: dict[str, Any] = {name: _run_case(case, group, rank) for name, case in cases.items()}
        results["collectives"] = _run_collectives(group, rank)
        results["training"] = train_steps(torch.load(root / "training.pt"), group)
        torch.save(results, root / f"rank{rank}.pt")


def _run_case(case: dict[str, Any], group: dist.ProcessGroup, rank: int) -> dict[str, Any]:
    cfg = ModelConfig(**case["cfg"])
    torch.manual_seed(case["seed"])
    tower = build_model(cfg, group)
    out: dict[str, Any] = {"init": {k: v.clone() for k, v in tower.state_dict().items()}}

    tower.load_state_dict(tower_state_dict(case["state"], rank))
    tower.train()
    logits = tower(case["x"])
    F.cross_entropy(logits, case["y"]).backward()  # the same loss on both ranks
    out["logits"] = logits.detach()
    out["grads"] = {name: p.grad for name, p in tower.named_parameters()}

    tower.eval()
    with torch.no_grad():
        out["eval_logits"] = tower(case["x"])
        out["fc7"] = tower.fc7_features(case["x"])
    out["filters"] = tower.conv1_filters()

    # dropout on: masks differ per rank (different seeds), yet both ranks must see the same logits
    torch.manual_seed(1000 + rank)
    dropped = build_model(ModelConfig(**{**case["cfg"], "dropout": 0.5}), group).train()
    dropped.load_state_dict(tower_state_dict(case["state"], rank))
    logits = dropped(case["x"])
    F.cross_entropy(logits, case["y"]).backward()
    out["dropout_logits"] = logits.detach()
    return out


def _run_collectives(group: dist.ProcessGroup, rank: int) -> dict[str, torch.Tensor]:
    """Gradients of the two gathers with known answers (checked by the test process)."""
    x = torch.arange(3.0).add(10 * rank).requires_grad_()
    y = exchange(x[None], group, dim=1)
    (y * torch.arange(6.0) * (rank + 1)).sum().backward()  # a different consumer on each rank

    sizes = [3, 2]  # uneven blocks, like fc8 with an odd number of classes
    u = torch.full((sizes[rank],), float(rank + 1), requires_grad=True)
    v = gather_replicated(u[None], group, dim=1, sizes=sizes)
    (v * torch.arange(5.0)).sum().backward()  # the same consumer on both ranks
    return {"exchanged": y.detach(), "exchange_grad": x.grad, "gathered": v.detach(), "gather_grad": u.grad}


def train_steps(run: dict[str, Any], group: dist.ProcessGroup | None) -> dict[str, list[torch.Tensor]]:
    """A few SGD steps with the paper's dropout from ``torch.manual_seed(run["seed"])``, as the trainer
    seeds every rank: one device (``group`` None) or this rank's tower; the losses and logits of each step."""
    torch.manual_seed(run["seed"])
    model = build_model(ModelConfig(**run["cfg"]), group).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    losses, logits = [], []
    for x, y in run["batches"]:
        out = model(x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        logits.append(out.detach())
    return {"losses": losses, "logits": logits}


def trainer_dropout_masks(rank: int, workdir: str, world: int, tp: int, model_cfg: dict[str, Any], seed: int) -> None:
    """One rank of a (dp x tp) layout: the Trainer as built for training, then the fc6 dropout masks its model
    draws for two batches (this rank's tower columns), saved with the rank's dp/tp coordinates."""
    import threading

    from pipeline.config import RunConfig
    from pipeline.mesh import ParallelDims, build_mesh
    from pipeline.train import build_trainer

    with gloo_group(rank, workdir, world) as root:
        cfg = RunConfig(run_dir=str(root / "run"))
        cfg.model = ModelConfig(**model_cfg)
        cfg.train.seed, cfg.train.tp = seed, tp
        dims = ParallelDims(world, rank, tp)
        trainer = build_trainer(cfg, build_mesh(dims, "cpu"), torch.device("cpu"), threading.Event())
        tower = trainer.model.train()
        width = tower.fc6.out_features
        masks = [tower._dropout(torch.ones(6, width), "fc6") != 0 for _ in range(2)]
        torch.save({"dp": dims.dp_rank, "tp": dims.tp_rank, "masks": masks}, root / f"masks{rank}.pt")
        trainer.writer.close()
