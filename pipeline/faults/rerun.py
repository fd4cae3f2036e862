"""What a divergent step's re-run in place says, acted on: a batch at fault is skipped, a node is suspect.

:mod:`pipeline.train_step` re-runs a divergent step once from the same state (weights, momentum, dropout
masks; the update was not applied). Every rank then holds the same :class:`~pipeline.faults.divergence.Rerun`
and calls :func:`settle` together:

- diverged again: the batch (or the state) is at fault. Within the bounds of
  :meth:`~pipeline.faults.divergence.DivergenceGuard.may_skip` the batch is skipped and the run goes on; its
  sample keys (every rank's share) go to RUN_DIR/bad_batches.jsonl with ``"skipped": true``. Beyond them the
  divergence stays latched and the next control step stops or rolls back as before.
- not again: the hardware erred once. The re-run's update was applied; the node(s) whose own loss differed
  between the runs (not the gradients: the all-reduce shares one rank's with all) are named in one line and in
  the node ledger (:mod:`pipeline.faults.nodes`), which later jobs' ``slurm/train.sh`` reads.

:class:`BadBatches` is what a resume reads back: the (epoch, batch, global batch size) of every skipped batch, so
that passing the same batch again (a restart from an earlier checkpoint, a rollback's replay) skips it without
re-running it; the run then trains exactly what the run that went straight on trained.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist

from basics.files import append_json_line, read_json_lines
from pipeline.faults import nodes
from pipeline.faults.divergence import DivergenceGuard, Rerun
from pipeline.faults.reach import node_name
from pipeline.run_dir import RunDir

log = logging.getLogger("alexnet")

BatchId = tuple[int, int, int]  # (epoch, batch in the epoch, global batch size): one global batch of any dp size


class BadBatches:
    """The batches this run directory skipped, the same set on every rank."""

    def __init__(self, known: set[BatchId] | None = None):
        self.known: set[BatchId] = set(known or ())

    @classmethod
    def load(cls, run_dir: RunDir, guard: DivergenceGuard) -> BadBatches:
        """Collective: rank 0 reads RUN_DIR/bad_batches.jsonl (its torn or foreign lines skipped) and every rank
        takes its set, so that all skip the same steps; the restored checkpoint's own skips are added."""
        rows: list[Any] = [None]
        if not dist.is_initialized() or dist.get_rank() == 0:
            rows[0] = sorted(filter(None, map(_batch_id, read_json_lines(run_dir.bad_batches))))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(rows, src=0)
        known = {tuple(r) for r in rows[0]} | {b for b in map(_batch_id, guard.skipped) if b}
        return cls(known)  # type: ignore[arg-type]

    def __contains__(self, batch: BatchId) -> bool:
        return batch in self.known

    def __len__(self) -> int:
        return len(self.known)


def _batch_id(row: Any) -> BatchId | None:
    """A skipped batch's id from a bad_batches.jsonl line or a checkpoint's record; None for anything else (a
    divergence acted on instead of skipped, a line of an older version without the batch's place)."""
    if not isinstance(row, dict) or row.get("skipped") is False:
        return None
    try:
        return int(row["epoch"]), int(row["batch"]), int(row["batch_size"])
    except (KeyError, TypeError, ValueError):
        return None


def settle(
    rerun: Rerun,
    guard: DivergenceGuard,
    bad: BadBatches,
    run_dir: RunDir,
    keys: list[str],
    *,
    rank: int,
    epoch: int,
    batch: int,
    batch_size: int,
) -> None:
    """Collective, after a re-run in place (see the module's docstring). ``keys``: this rank's share of the
    batch's sample keys; ``batch``: its place in the epoch; ``batch_size``: the global batch size."""
    mine = (node_name(), keys)
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    if rerun.reproducible:
        why_not = guard.may_skip()  # every rank decides the same: the guard's state is the same everywhere
        if not why_not:
            guard.skip(step=rerun.step, epoch=epoch, batch=batch, batch_size=batch_size)
            bad.known.add((epoch, batch, batch_size))
        if rank == 0:
            _record_batch(rerun, run_dir, [k for _, ks in everyone for k in ks], epoch, batch, batch_size, why_not)
        return
    if rank == 0:
        _name_suspects(rerun, run_dir, [n for n, _ in everyone])


def _record_batch(
    rerun: Rerun, run_dir: RunDir, keys: list[str], epoch: int, batch: int, batch_size: int, why_not: str
) -> None:
    row = {"epoch": epoch, "batch": batch, "batch_size": batch_size, "step": rerun.step, "keys": keys}
    append_json_line(run_dir.bad_batches, {**row, "skipped": not why_not})
    where = f"{len(keys)} sample keys in {run_dir.bad_batches}"
    if why_not:
        log.warning(
            "divergence at step %d repeated when re-run in place: not skipped, acted on (%s; %s)",
            rerun.step,
            why_not,
            where,
        )
    else:
        log.warning(
            "divergence at step %d repeated when re-run in place: the batch is at fault; skipped (%s)",
            rerun.step,
            where,
        )


def _name_suspects(rerun: Rerun, run_dir: RunDir, node_of_rank: list[str]) -> None:
    suspects = sorted({node_of_rank[r] for r in rerun.ranks})
    where = ", ".join(
        f"{n} (rank(s) {','.join(str(r) for r in rerun.ranks if node_of_rank[r] == n)})" for n in suspects
    )
    log.warning(
        "divergence at step %d did not repeat when re-run in place: %s; the re-run's update was applied",
        rerun.step,
        f"node {where} suspect: its own loss differed between the two runs"
        if suspects
        else "no rank's own loss differed (a transient fault in backward or the gradient reduction)",
    )
    for node in suspects:
        nodes.record(run_dir, node, "divergence-rerun", f"step {rerun.step} did not repeat when re-run in place")
