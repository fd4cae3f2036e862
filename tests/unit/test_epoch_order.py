"""One epoch order for any number of data-parallel ranks (pipeline.data.epoch_plan's lanes): the same global
batches (samples, windows, mirrors, lighting) on dp 1, 2, 4 and 8, each rank reading a contiguous run of the
shards, and the images themselves equal whichever loader runs them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from basics.errors import UserError
from pipeline import data as D
from pipeline.data.epoch_plan import LaneOrder
from pipeline.data.planner import EpochInputs
from tests.support.datasets import cfg_for, make_dataset

SHARDS = [5, 6, 5, 6, 5, 6, 5, 6]  # 44 samples: 5 full global batches of 8 and one of 4 (fewer than 8 ranks)
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("lanes"), {"train": SHARDS, "val": [2]}, quality=60)


def global_batches(root: Path, dp_size: int, epoch: int) -> tuple[list[list[tuple]], list[int]]:
    """Per step, the global batch as (key, x, y, mirror, lighting) per sample, the dp ranks' slices in order;
    and how many shards each rank reads."""
    batch = GLOBAL_BATCH // dp_size
    steps: list[list[tuple]] = []
    shards_read = []
    for rank in range(dp_size):
        inputs = EpochInputs(cfg_for(root, "torch"), rank, dp_size, 11, batch, None, None)
        prepared = inputs.prepare(epoch, 0)
        plan = prepared.plan
        shards_read.append(len(set(plan.shard.tolist())))
        for step, (lo, hi) in enumerate(prepared.epoch_bounds):
            if rank == 0:
                steps.append([])
            augment = zip(plan.x[lo:hi].tolist(), plan.y[lo:hi].tolist(), plan.mirror[lo:hi].tolist())
            lighting = plan.offset[lo:hi].round(6).tolist()
            steps[step] += [(k, *a, tuple(o)) for k, a, o in zip(plan.keys(lo, hi), augment, lighting)]
    return steps, shards_read


def test_the_global_batches_are_the_same_on_any_dp_size(eight_shards: Path) -> None:
    keys_of_epoch = []
    for epoch in (0, 1):
        reference, _ = global_batches(eight_shards, 1, epoch)
        assert [len(b) for b in reference] == [8, 8, 8, 8, 8, 4]
        keys = [sample[0] for b in reference for sample in b]
        assert len(keys) == len(set(keys)) == sum(SHARDS), "every sample once"
        keys_of_epoch.append(keys)
        for dp_size in (2, 4, 8):
            batches, shards_read = global_batches(eight_shards, dp_size, epoch)
            assert batches == reference, f"epoch {epoch}: dp {dp_size}'s global batches differ from dp 1's"
            bound = math.ceil(len(SHARDS) / dp_size) + 1
            assert max(shards_read) <= bound, f"dp {dp_size}: a rank reads {shards_read} shards (at most {bound})"
    assert keys_of_epoch[0] != keys_of_epoch[1], "each epoch has its own order"


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_the_images_of_a_global_batch_are_the_same_on_dp_1_and_4(eight_shards: Path, loader: str) -> None:
    def step_images(dp_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for rank in range(dp_size):
            it = D.train_loader(
                cfg_for(eight_shards, loader),
                dp_rank=rank,
                dp_size=dp_size,
                epoch=1,
                seed=11,
                device="cpu",
                batch_size=GLOBAL_BATCH // dp_size,
                start_batch=step,
            )
            parts.append(next(iter(it)))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    for step in (0, 5):  # a full batch, and the short last one (4 samples: one a rank at dp 4)
        (one, labels_one), (four, labels_four) = step_images(1, step), step_images(4, step)
        assert torch.equal(labels_one, labels_four)
        assert np.abs((one - four).numpy()).max() <= 1e-4


def test_a_dp_size_that_does_not_divide_the_lanes_is_refused_in_one_line() -> None:
    with pytest.raises(UserError, match="does not divide the epoch's 8 lanes") as err:
        LaneOrder.build(44, GLOBAL_BATCH, 0, 3, seed=0, shuffle=True)
    assert "\n" not in str(err.value)
