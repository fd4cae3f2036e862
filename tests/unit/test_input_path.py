"""The input path's cost to the training thread: no per-sample torch op, labels read in arrays, the bench's parts.

Speed itself is measured by ``python -m pipeline.bench.data --input-path`` (figures in docs/BENCHMARKS.md);
these tests pin what makes it fast and would silently regress: the number of torch operations one batch
issues on the thread that iterates the loader must not grow with the batch size (the mean image's windows
were subtracted one sample at a time, five operations per sample), and the labels parsed in arrays must
be the ones the per-sample parser gives, hostile payloads included.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from basics.errors import UserError
from pipeline import data as D
from pipeline.bench import data as bench_data
from pipeline.data.epoch_plan import plan_epoch
from pipeline.data.index_cache import decimal_labels
from pipeline.data.sample_reader import SampleReader
from preprocess import format as fmt
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
    plan = plan_epoch(split, norm, dp_rank=0, dp_size=1, seed=3, train=True)
    reader = SampleReader(split, plan, norm.image_size)
    labels = reader.labels(0, len(plan))
    assert labels.tolist() == [reader.label(i) for i in range(len(plan))]
    assert {plan.key(i): int(labels[i]) for i in range(len(plan)) if plan.key(i) in keys} == keys
    assert reader.labels(5, 9).tolist() == labels[5:9].tolist()
    key = rewrite_member(root, 2, 1, "cls", b"x")
    split, norm = D.open_dataset(cfg_for(root), "train")
    plan = plan_epoch(split, norm, dp_rank=0, dp_size=1, seed=3, train=True)
    with pytest.raises(UserError, match=rf"train-000002\.tar: sample {key}: \.cls is not a decimal number"):
        SampleReader(split, plan, norm.image_size).labels(0, len(plan))


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


def test_thread_parts_time_a_mean_image_subtracted_on_the_thread(mean_ds: Path, monkeypatch) -> None:
    """An older loader subtracted the mean image on the thread, inside the copy (``Output._subtract_windows``):
    the bench times that part and takes it out of ``copy out``, so a checkout that does it shows it."""
    from pipeline.data import dali_pipeline

    burn_s = 0.02  # thread CPU per batch of 2: 10,000 µs per sample, far above a CPU copy of 2 images

    def subtract_windows(self, out):
        start = time.thread_time()
        while time.thread_time() - start < burn_s:
            pass
        return out

    copy = dali_pipeline.Output.__call__
    monkeypatch.setattr(dali_pipeline.Output, "_subtract_windows", subtract_windows, raising=False)
    monkeypatch.setattr(dali_pipeline.Output, "__call__", lambda self, batch: self._subtract_windows(copy(self, batch)))
    cfg = cfg_for(mean_ds, verify="size")
    parts = bench_data.thread_parts(cfg, batch_size=2, warmup=2, steps=3, device=torch.device("cpu"))
    assert parts["mean image"] >= 0.9 * burn_s / 2 * 1e6, parts
    assert 0 < parts["copy out"] < 0.5 * parts["mean image"], parts  # the copy without the subtraction
    assert parts["total"] >= parts["mean image"] + parts["copy out"] + parts["feed"], parts


def _descendants_cpu_seconds() -> float:
    """The process tree's CPU less this process's own and its reaped children's (the reading itself costs CPU)."""
    tree = bench_data.process_tree_cpu_seconds()
    own, dead = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return tree - (own.ru_utime + own.ru_stime + dead.ru_utime + dead.ru_stime)


def test_process_tree_cpu_counts_live_and_exited_children(tmp_path: Path) -> None:
    """A grandchild that spins until told to stop, under a child that only waits for it (as a DataLoader's
    worker runs under torchrun's rank), is counted while it lives (it cannot exit by itself, so only the /proc
    walk down the whole tree can show its time: the child's own start-up costs far less than the 0.6 s
    asked for), and still counted once both have exited and been waited for."""
    stop = tmp_path / "stop"
    spin = f"import os\nwhile not os.path.exists({str(stop)!r}):\n    sum(range(20000))"
    waiter = f"import subprocess, sys\nsys.exit(subprocess.call([sys.executable, '-c', {spin!r}]))"
    before, tree_before = _descendants_cpu_seconds(), bench_data.process_tree_cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", waiter])
    try:
        deadline = time.monotonic() + 60
        while (live := _descendants_cpu_seconds() - before) < 0.6:
            assert child.poll() is None, "the waiting child exited by itself"
            assert time.monotonic() < deadline, f"the running grandchild's CPU was not counted ({live:.2f} s)"
            time.sleep(0.05)
    finally:
        stop.touch()
        child.wait(timeout=60)
    assert child.returncode == 0
    assert bench_data.process_tree_cpu_seconds() - tree_before >= live  # and once both have exited


def test_bare_dali_graph_and_its_copy_into_torch(mean_ds: Path) -> None:
    """The reference graph of the benchmarks (and of --gpu-report's dali_alone) builds and hands torch batches."""
    cfg = cfg_for(mean_ds, verify="size")
    pipe = bench_data.bare_graph(cfg, batch_size=4, workers=1, gpu=False)
    images, labels = next(bench_data.bare_batches(pipe, torch.device("cpu")))
    assert images.shape == (4, 3, 227, 227) and images.dtype == torch.float32 and len(labels) == 4
    assert 0 < float(images.abs().mean()) < 255


def test_format_label_is_what_the_arrays_parse() -> None:
    """The array parser's fast path covers exactly ``format.encode_label``'s output: every label the format
    writes is parsed in arrays (nothing falls to the per-sample parser), to the value ``decode_label`` gives."""
    labels = [0, 7, 42, 999, 123456, 2**31 - 1]
    raws = [fmt.encode_label(label) for label in labels]
    data = np.frombuffer(b"".join(raws), np.uint8)
    offsets = np.cumsum([0] + [len(r) for r in raws[:-1]])
    spans = np.stack([offsets, [len(r) for r in raws]], axis=1).astype(np.int64)
    assert decimal_labels(data, spans).tolist() == labels == [fmt.decode_label(r) for r in raws]
    # What the format never writes goes to the per-sample parser (-1 here), even where decode_label accepts it.
    odd = [b" 7", b"7\n", b"+7", b"-7", b""]
    data = np.frombuffer(b"".join(odd), np.uint8)
    offsets = np.cumsum([0] + [len(r) for r in odd[:-1]])
    spans = np.stack([offsets, [len(r) for r in odd]], axis=1).astype(np.int64)
    assert decimal_labels(data, spans).tolist() == [-1] * len(odd)


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
