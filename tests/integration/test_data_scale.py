"""What must not grow with the dataset (issue 21), at reduced size: the epoch plan's memory, the
shard hashing (remembered per dataset, split between ranks), and the next epoch prepared ahead.

A dataset of ~100k samples is a few real shards hard-linked many times (``preprocess replicate``),
which is how the benchmark makes ImageNet's 1.28M.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from basics.errors import UserError
from pipeline import data as D
from pipeline.data import planner
from pipeline.data.epoch_plan import plan_epoch
from preprocess import format as fmt
from tests.support.data_scale import _epoch

# --------------------------------------------------------------------------------------------
# The next epoch, prepared while this one trains


@pytest.mark.slow
def test_the_next_epoch_is_prepared_in_the_background(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planned: list[str] = []
    monkeypatch.setattr(
        planner, "plan_epoch", lambda *a, **k: planned.append(threading.current_thread().name) or plan_epoch(*a, **k)
    )
    ahead = D.Ahead()
    try:
        first = _epoch(copy, ahead=ahead)
        ahead.wait()
        assert len(planned) == 1, "nothing prepared ahead before the epoch's first step"
        _two_batches(first)
        second = _epoch(copy, epoch=1, ahead=ahead)
        _two_batches(second)
        ahead.wait()
        assert planned[0] == threading.current_thread().name
        assert planned[1:] == ["alexnet-epoch-ahead", "alexnet-epoch-ahead"], "epochs 1 and 2 planned ahead"
        # Same batches as without it.
        for loader, epoch in ((first, 0), (second, 1)):
            for (a, la), (b, lb) in zip(loader, _epoch(copy, epoch=epoch)):
                assert (a == b).all() and (la == lb).all()
        # A shard written after epoch 2 was verified ahead is hashed again before epoch 2 reads it.
        shard = copy / "train" / fmt.shard_name("train", 0)
        before = shard.stat()
        data = bytearray(shard.read_bytes())
        data[400] ^= 0x01
        shard.write_bytes(bytes(data))
        os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
        with pytest.raises(UserError, match="does not match the manifest"):
            _epoch(copy, epoch=2, ahead=ahead)
    finally:
        ahead.close()


def _two_batches(loader: D.Loader) -> None:
    """The first batch, and the request for the second: the first step is done."""
    batches = iter(loader)
    next(batches)
    next(batches)
