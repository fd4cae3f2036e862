"""The run seed, spread over ranks: one init everywhere, one dropout stream per data-parallel replica.

- Init: every rank draws the weights under ``torch.manual_seed(seed)``, so the towers of a pair and all
  replicas start from the single-device model's weights (DDP also broadcasts dp rank 0's).
- Dropout: then every rank reseeds torch with :func:`replica_seed` of its *dp* rank. The two towers of a
  pair share it (each keeps its columns of the full layer's mask, ``pipeline.model``), so a tp=2 run trains
  like a tp=1 run; replicas differ, as the images of one device's global batch each get their own mask.
  With one seed everywhere every replica drew the same masks at every step.
- Python and NumPy: ``seed + rank`` (nothing shared depends on them; data order and augmentation have
  their own seeds from (seed, epoch, dp_rank), ``pipeline.data``).

A resume restores each rank's saved RNG states when the layout is unchanged. What it cannot restore (a
layout change, or a CPU checkpoint resumed on a GPU: no CUDA state was saved) is reseeded from
(seed, dp_rank, step) by :func:`after_resume`, so the resumed run neither repeats step 0's masks nor
lets a pair's towers drift apart.
"""

from __future__ import annotations

import random
from collections.abc import Collection

import numpy as np
import torch

DROPOUT_STREAM = 0x0D50  # keeps the dropout seeds apart from other uses of (seed, rank) sequences


def replica_seed(seed: int, dp_rank: int, step: int = 0) -> int:
    """A 63-bit seed for replica ``dp_rank`` (at ``step`` after a resume that could not restore RNG states)."""
    state = np.random.SeedSequence([seed, DROPOUT_STREAM, dp_rank, step]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_init(seed: int, rank: int) -> None:
    """Before the model is built: the same init on every rank."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)


def seed_dropout(seed: int, dp_rank: int, step: int = 0) -> None:
    """After the model is built: this replica's dropout stream (CPU and every CUDA device)."""
    torch.manual_seed(replica_seed(seed, dp_rank, step))


def after_resume(seed: int, dp_rank: int, step: int, restored: Collection[str], cuda: bool) -> None:
    """Reseed what a resume did not restore (``restored``: the RNG names it loaded, e.g. {"torch", "cuda"})."""
    if "torch" not in restored:
        seed_dropout(seed, dp_rank, step)  # another layout: nothing restored
    elif cuda and "cuda" not in restored:
        # A checkpoint written on CPU: the CPU generator continues, the GPU's (dropout on a GPU) starts
        # a stream of its own for this step, the same on both towers of a pair.
        torch.cuda.manual_seed(replica_seed(seed, dp_rank, step))
