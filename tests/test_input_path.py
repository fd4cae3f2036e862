"""The input path's cost to the training thread: no per-sample torch op, labels read in arrays, the bench's parts.

Speed itself is measured by ``python -m pipeline.bench.data --input-path`` (figures in docs/BENCHMARKS.md);
these tests pin what makes it fast and would silently regress: the number of torch operations one batch
issues on the thread that iterates the loader must not grow with the batch size (the mean image's windows
were subtracted one sample at a time, five operations per sample), and the labels parsed in arrays must
be the ones the per-sample parser gives, hostile payloads included.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline import data as D
from pipeline.bench import data as bench_data
from pipeline.data import common as C
from preprocess import format as fmt
from preprocess.errors import UserError
from tests.support.datasets import cfg_for, coordinate_image, make_dataset, rewrite_member


@pytest.fixture(scope="module")
def mean_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """17 training samples in 2 shards with a non-zero mean image (the paper's normalisation)."""
    mean_image = np.random.default_rng(1).uniform(0, 60, (256, 256, 3)).astype(np.float32)
    return make_dataset(
        tmp_path_factory.mktemp("ops"),
        {"train": [9, 8], "val": [3]},
        image=coordinate_image,
        mean_image=mean_image,
        quality=60,
    )


class AtenOps(TorchDispatchMode):
    """Counts the aten operations dispatched on the thread that enters it (dispatch modes are per thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def ops_of_second_batch(root: Path, loader: str, batch_size: int, **cfg) -> Counter[str]:
    """The torch operations ``next()`` issues on this thread for an epoch's second batch (the first builds)."""
    batches = iter(
        D.train_loader(
            cfg_for(root, loader, **cfg), dp_rank=0, dp_size=1, epoch=0, seed=0, device="cpu", batch_size=batch_size
        )
    )
    next(batches)
    with AtenOps() as count:
        images, _ = next(batches)
    assert images.shape[0] == batch_size
    batches.close()
    return count.ops


@pytest.mark.parametrize("loader", ["dali", "torch"])
@pytest.mark.parametrize("cfg", [{}, {"dtype": "bfloat16", "channels_last": True}], ids=["float32", "bf16-nhwc"])
def test_torch_ops_per_batch_do_not_grow_with_the_batch(mean_ds: Path, loader: str, cfg: dict) -> None:
    small, large = (ops_of_second_batch(mean_ds, loader, b, **cfg) for b in (4, 8))
    assert small == large, f"per-sample torch ops on the training thread: batch 4 {small}, batch 8 {large}"
    assert sum(large.values()) <= 16, large  # a handful per batch: hand-over, layout, dtype


def test_labels_parsed_in_arrays_equal_the_exact_parser(coverage_ds_copy: Path) -> None:
    """Payloads ``preprocess`` never writes still parse as ``format.decode_label`` does, or name the sample."""
    root = coverage_ds_copy
    keys = {
        rewrite_member(root, 0, 3, "cls", b"+2"): 2,
        rewrite_member(root, 0, 4, "cls", b" 5"): 5,
        rewrite_member(root, 1, 0, "cls", b"09"): 9,
        rewrite_member(root, 1, 2, "cls", b"4"): 4,  # padded with a newline
    }
    split, norm = D.open_dataset(cfg_for(root), "train")
    plan = C.plan_epoch(split, norm, dp_rank=0, dp_size=1, seed=3, train=True)
    reader = C.SampleReader(split, plan, norm.image_size)
    labels = reader.labels(0, len(plan))
    assert labels.tolist() == [reader.label(i) for i in range(len(plan))]
    assert {plan.key(i): int(labels[i]) for i in range(len(plan)) if plan.key(i) in keys} == keys
    assert reader.labels(5, 9).tolist() == labels[5:9].tolist()
    key = rewrite_member(root, 2, 1, "cls", b"x")
    split, norm = D.open_dataset(cfg_for(root), "train")
    plan = C.plan_epoch(split, norm, dp_rank=0, dp_size=1, seed=3, train=True)
    with pytest.raises(UserError, match=rf"train-000002\.tar: sample {key}: \.cls is not a decimal number"):
        C.SampleReader(split, plan, norm.image_size).labels(0, len(plan))


@pytest.fixture
def coverage_ds_copy(tmp_path: Path) -> Path:
    """Uneven shards (7 + 5 + 4), label i = sample i (two-digit members for i >= 10), writable."""
    return make_dataset(tmp_path / "ds", {"train": [7, 5, 4], "val": [3]}, label=lambda i: 10 + i, quality=60)


def test_thread_parts_cover_the_loader(mean_ds: Path) -> None:
    """What ``--gpu-report`` and ``bench_data --input-path`` report: the parts sum to at most the thread's
    whole time in the loader, the mean image costs the thread nothing, and the feed is timed."""
    cfg = cfg_for(mean_ds, verify="size")
    parts = bench_data.thread_parts(cfg, batch_size=2, warmup=2, steps=3, device=torch.device("cpu"))
    assert set(parts) == {"feed", "hand-over to DALI", "mean image", "copy out", "other", "total"}
    assert parts["mean image"] == 0 and parts["feed"] > 0 and parts["hand-over to DALI"] > 0
    assert parts["copy out"] > 0 and parts["total"] >= parts["feed"] + parts["copy out"]
    with pytest.raises(ValueError, match="too short"):
        bench_data.thread_parts(cfg, batch_size=4, warmup=2, steps=3, device=torch.device("cpu"))


def test_process_tree_cpu_counts_live_and_exited_children() -> None:
    before = bench_data.process_tree_cpu_seconds()
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"]
    )
    deadline = time.monotonic() + 60
    while bench_data.process_tree_cpu_seconds() - before < 0.3:  # counted while it runs
        assert child.poll() is None or time.monotonic() < deadline, "the running child's CPU was not counted"
        if child.poll() is not None:
            break
        time.sleep(0.05)
    child.wait()
    assert bench_data.process_tree_cpu_seconds() - before >= 0.4  # and once it has exited


def test_bare_dali_graph_and_its_copy_into_torch(mean_ds: Path) -> None:
    """The reference graph of the benchmarks (and of --gpu-report's dali_alone) builds and hands torch batches."""
    cfg = cfg_for(mean_ds, verify="size")
    pipe = bench_data.bare_graph(cfg, batch_size=4, workers=1, gpu=False)
    images, labels = next(bench_data.bare_batches(pipe, torch.device("cpu")))
    assert images.shape == (4, 3, 227, 227) and images.dtype == torch.float32 and len(labels) == 4
    assert 0 < float(images.abs().mean()) < 255


def test_format_label_is_what_the_arrays_parse() -> None:
    """The array parser's fast path covers exactly ``format.encode_label``'s output: decimal digits."""
    for label in (0, 7, 42, 999, 123456):
        raw = fmt.encode_label(label)
        assert raw.isdigit() and fmt.decode_label(raw) == label


def test_batches_held_by_the_caller_are_never_overwritten(mean_ds: Path) -> None:
    """The CPU output buffers are recycled only once the caller has let go of them."""
    kw = dict(dp_rank=0, dp_size=1, epoch=0, seed=0, device="cpu", batch_size=2)
    held = []
    for i, (images, _) in enumerate(D.train_loader(cfg_for(mean_ds), **kw)):
        if i % 3 == 0:
            held.append((i, images))
    fresh = [images.clone() for images, _ in D.train_loader(cfg_for(mean_ds), **kw)]
    assert len({images.data_ptr() for _, images in held}) == len(held)
    for i, images in held:
        assert torch.equal(images, fresh[i]), f"batch {i} changed after it was handed out"
