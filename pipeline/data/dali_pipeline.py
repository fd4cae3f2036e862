"""The DALI implementation of ``pipeline.data``: decode, crop, mirror, lighting and normalisation in DALI.

It executes the epoch plan of ``epoch_plan.plan_epoch``: an ``external_source`` hands DALI each batch's
JPEG bytes (views into the memory-mapped shards at the index files' offsets, not copied) with the
plan's windows, mirrors and lighting sliced from arrays drawn once per epoch, so a batch depends on
nothing but its plan positions: an epoch can start at any batch without reading or decoding the
ones before it, and the batches equal the torch fallback's up to the JPEG decoder. Decoding runs on
the GPU (``device="mixed"``) when the training device is CUDA, else on CPU threads; one fused
``crop_mirror_normalize`` per view does the window, mirror, ``(x - (channel_mean - lighting)) /
channel_std``, layout and float conversion, and the paper's mean image is cropped and mirrored by
the same window and subtracted inside the graph too. The training thread does a constant amount of
work per batch apart from slicing the samples' bytes and parsing their labels: no per-sample torch
op, no system call per sample. Notes and figures: ``docs/data-pipeline.md``, ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from basics.errors import UserError
from pipeline.data.batches import EpochRequest, finish_batch
from pipeline.data.dataset import Normalization
from pipeline.data.epoch_plan import Plan
from pipeline.data.sample_reader import SampleReader
from pipeline.data.views import ten_view_windows
from preprocess.format import FormatError

PREFETCH = 2  # batches DALI runs ahead of the one handed out (its default prefetch_queue_depth)


def window_params(plan: Plan, norm: Normalization, lo: int, hi: int) -> np.ndarray:
    """float32 [hi - lo, 6] for plan positions ``[lo, hi)``: crop_pos_x, crop_pos_y, mirror, then the 3 channel
    means less lighting.

    A few array operations per batch (nothing per sample, nothing kept per epoch: at ImageNet's size a
    whole epoch's parameters would be another 24 bytes a sample). Positions are normalised,
    ``k / max_offset``, which DALI rounds back to exactly ``k``.
    """
    params = np.empty((hi - lo, 6), np.float32)
    scale = 1.0 / norm.max_offset if norm.max_offset else 0.0
    params[:, 0] = plan.x[lo:hi] * scale if scale else 0.5
    params[:, 1] = plan.y[lo:hi] * scale if scale else 0.5
    params[:, 2] = plan.mirror[lo:hi]
    params[:, 3:] = np.asarray(norm.channel_mean, np.float32)[None, :] - plan.offset[lo:hi]  # lighting in the mean
    return params


class Feed:
    """The ``external_source``: call ``i`` gives the ``i``-th batch to make (encoded JPEGs, labels, parameters).

    The JPEGs are views into the mapped shards handed over without a copy (``no_copy``); DALI reads
    them until the batch's outputs come out, ``PREFETCH`` runs later, so the last batches are kept
    referenced here.
    """

    def __init__(self, request: EpochRequest, reader: SampleReader):
        from nvidia.dali.tensors import TensorCPU

        self.batches = request.batches
        self.reader = reader
        self.plan, self.norm, self.train = request.plan, request.norm, request.train
        self.fed = 0  # batches handed to DALI so far
        self._in_flight: deque[tuple[Any, ...]] = deque(maxlen=PREFETCH + 2)
        self._tensor = TensorCPU  # wraps a view without copying it (DALI's own list path does the same, slower)

    def __call__(self, i: int) -> tuple[Any, ...]:
        if i >= len(self.batches):
            raise StopIteration
        lo, hi = self.batches[i]
        jpegs = list(map(self._tensor, self.reader.jpegs(lo, hi)))
        labels = self.reader.labels(lo, hi)  # a slice of the plan's label column, checked
        batch = (jpegs, labels, window_params(self.plan, self.norm, lo, hi)) if self.train else (jpegs, labels)
        self._in_flight.append(batch)
        self.fed = i + 1
        return batch


def decode(jpegs: Any, *, gpu: bool) -> Any:
    from nvidia.dali import fn, types

    return fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB, **decoder_options(gpu))


def decoder_options(gpu: bool) -> dict[str, Any]:
    """The ``mixed`` (nvJPEG) decoder upsamples chroma as libjpeg-turbo does (the CPU decoder, preprocessing):
    without it GPU batches differ at the chroma edges of the shards' 4:2:0 JPEGs. Whether the two then agree
    only a GPU shows: the GPU report's GPU-vs-CPU comparison (``make gpu-check``)."""
    return {"jpeg_fancy_upsampling": True} if gpu else {}


def crop_normalize(
    images: Any, norm: Normalization, *, pos_x: Any, pos_y: Any, mirror: Any, mean: Any, std: Any, layout: str
) -> Any:
    """One fused pass: window, mirror, ``(x - mean) / std``, float, layout."""
    from nvidia.dali import fn, types

    return fn.crop_mirror_normalize(
        images,
        crop=(norm.crop, norm.crop),
        crop_pos_x=pos_x,
        crop_pos_y=pos_y,
        mirror=mirror,
        mean=mean,
        std=std,
        dtype=types.FLOAT,
        output_layout=layout,
    )


def mean_image(norm: Normalization, *, gpu: bool) -> Any:
    """The paper's 256x256 mean image as a DALI constant (None with per-channel normalisation)."""
    from nvidia.dali import types

    if norm.mean_image is None:
        return None
    return types.Constant(norm.mean_image, layout="HWC", device="gpu" if gpu else "cpu")


def augment(
    images: Any, norm: Normalization, means: Any, *, pos_x: Any, pos_y: Any, mirror: Any, mean: Any, layout: str
) -> Any:
    """The view: ``crop_normalize`` of the image, less the mean image ``means`` under the same (mirrored) window.

    The mean's window is cropped and mirrored with the image's own parameters, so the subtraction
    costs one small pass per view inside the graph (fused with the rest on a GPU), not a pass over
    the full 256x256 image and not one operation per sample on the training thread.
    """
    out = crop_normalize(
        images, norm, pos_x=pos_x, pos_y=pos_y, mirror=mirror, mean=mean, std=list(norm.channel_std), layout=layout
    )
    if means is None:
        return out
    return out - crop_normalize(means, norm, pos_x=pos_x, pos_y=pos_y, mirror=mirror, mean=0.0, std=1.0, layout=layout)


def sources(feed: Feed, *, train: bool) -> tuple[Any, ...]:
    """The feed's outputs as DALI nodes: jpegs, labels (and the per-sample parameters when training)."""
    from nvidia.dali import fn, types

    dtypes = [types.UINT8, types.INT64] + ([types.FLOAT] if train else [])
    return tuple(fn.external_source(source=feed, num_outputs=len(dtypes), batch=True, dtype=dtypes, no_copy=True))


def training_graph(feed: Feed, norm: Normalization, *, gpu: bool, layout: str) -> tuple[Any, ...]:
    """The plan's window, mirror and lighting per sample (fed with the bytes). Call inside a DALI ``Pipeline``."""
    from nvidia.dali import fn, types

    jpegs, labels, params = sources(feed, train=True)
    out = augment(
        decode(jpegs, gpu=gpu),
        norm,
        mean_image(norm, gpu=gpu),
        pos_x=params[0],
        pos_y=params[1],
        mirror=fn.cast(params[2], dtype=types.INT32),
        mean=params[3:6],
        layout=layout,
    )
    return out, labels, fn.peek_image_shape(jpegs)


def eval_graph(feed: Feed, norm: Normalization, *, gpu: bool, layout: str, ten_crop: bool) -> tuple[Any, ...]:
    """Centre crop, or the 10 views stacked on a new leading axis: [10, C, H, W] (or [10, H, W, C])."""
    from nvidia.dali import fn

    jpegs, labels = sources(feed, train=False)
    images = decode(jpegs, gpu=gpu)
    means = mean_image(norm, gpu=gpu)
    m = norm.max_offset
    c = norm.center_offset()
    windows = ten_view_windows(m, c) if ten_crop else [(False, c, c)]
    views = [
        augment(
            images,
            norm,
            means,
            pos_x=left / m if m else 0.5,
            pos_y=top / m if m else 0.5,
            mirror=int(mirror),
            mean=list(norm.channel_mean),
            layout=layout,
        )
        for mirror, top, left in windows
    ]
    return (fn.stack(*views) if ten_crop else views[0]), labels, fn.peek_image_shape(jpegs)


def build(request: EpochRequest, feed: Feed, *, device_id: int | None) -> Any:
    """A built DALI pipeline; ``device_id=None`` runs it on the CPU only."""
    from nvidia.dali import Pipeline

    gpu = device_id is not None
    layout = "HWC" if request.channels_last else "CHW"
    pipe = Pipeline(
        batch_size=request.batch_size,
        num_threads=request.workers,
        device_id=device_id,
        seed=0,
        prefetch_queue_depth=PREFETCH,
    )
    with pipe:
        if request.train:
            outputs = training_graph(feed, request.norm, gpu=gpu, layout=layout)
        else:
            outputs = eval_graph(feed, request.norm, gpu=gpu, layout=layout, ten_crop=request.ten_crop)
        pipe.set_outputs(*outputs)
    try:
        pipe.build()
    except RuntimeError as e:
        raise UserError(
            f"{request.split.describe()}: DALI cannot build the input pipeline: {dali_message(e)}"
        ) from None
    return pipe


class Output:
    """Copies a DALI batch into a new torch tensor on ``device``: one copy per batch, by DALI, no torch op on it.

    On the CPU a batch (79 MB at 128 images) is larger than what malloc recycles, so a fresh buffer
    is fresh pages, whose faults cost more than the copy itself; the buffers of earlier batches are
    reused instead, once nothing but this pool references them (the caller has dropped the batch).
    """

    POOL = PREFETCH + 2

    def __init__(self, device: Any):
        self.device = device
        self._buffers: list[np.ndarray] = []

    def _buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        for buffer in self._buffers:
            # 3 references: the pool's list, the loop variable, getrefcount's argument; none held outside
            if buffer.shape == shape and sys.getrefcount(buffer) <= 3:
                return buffer
        buffer = np.empty(shape, np.float32)
        self._buffers = [*self._buffers[1 - self.POOL :], buffer] if self.POOL > 1 else [buffer]
        return buffer

    def __call__(self, images: Any) -> Any:
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = images.as_tensor()  # a view: DALI's outputs of equal-shaped samples are one buffer
        if self.device.type == "cuda":
            out = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
            return feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
        return feed_ndarray(dense, torch.from_numpy(self._buffer(tuple(dense.shape()))))


def check_shapes(shapes: Any, reader: SampleReader, lo: int) -> None:
    """The stored images' sizes (DALI read them from the JPEG headers): a wrong one is named like the reader does."""
    sizes = np.asarray(shapes.as_tensor())[:, :2]
    wrong = np.flatnonzero((sizes != reader.image_size).any(axis=1))
    if wrong.size:
        i = lo + int(wrong[0])
        reader.jpeg(i)  # raises the reader's one-line error naming the sample
        height, width = sizes[wrong[0]].tolist()
        raise FormatError(f"{reader.where(i)}: image is {height}x{width}, the format stores {reader.image_size}")


def dali_message(error: BaseException) -> str:
    """One line from a DALI error: the failing operator and the cause (they come with Python and C++ traces)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    operator = next((line for line in lines if line.startswith("Error in ")), "")
    cause = ""
    if "encountered:" in lines:
        rest = lines[lines.index("encountered:") + 1 :]
        cause = next((line for line in rest if not line.startswith(("Current pipeline", "[/", "Stacktrace"))), "")
    if not cause:
        skip = ("Critical error", "Error in ", "File ", "Current pipeline", "[/", "Stacktrace", "which was used")
        cause = next((line for line in lines if not line.startswith(skip)), lines[0] if lines else type(error).__name__)
    operator = operator.removeprefix("Error in ").rstrip(",")
    return (f"{operator}: {cause}" if operator else cause)[:400]


def batches(request: EpochRequest) -> Callable[[], Iterator[tuple[Any, Any]]]:
    """What ``pipeline.data`` calls: a function that builds the epoch's pipeline and yields (images, labels)."""
    r = request
    device_id = r.device.index if r.device.type == "cuda" else None
    if r.device.type == "cuda" and device_id is None:
        import torch

        device_id = torch.cuda.current_device()

    def run() -> Iterator[tuple[Any, Any]]:
        import torch

        if not r.batches:
            return
        reader = SampleReader(r.split, r.plan, r.norm.image_size)
        feed = Feed(r, reader)
        pipe = build(r, feed, device_id=device_id)
        output = Output(r.device)
        try:
            for k, (lo, hi) in enumerate(r.batches):
                try:
                    images, labels, shapes = pipe.run()
                    failure = None
                except RuntimeError as e:
                    failure = dali_message(e)  # raised below, outside this block: DALI's frames stay out of it
                if failure is not None:
                    # The batches DALI holds: a sample that cannot be read or decoded is named by the reader.
                    reader.check(lo, r.batches[max(feed.fed, k + 1) - 1][1])
                    raise UserError(
                        f"{r.split.describe()}: DALI failed decoding a sample of positions {lo}..{hi - 1} "
                        f"({failure}); --data.loader torch names the broken sample"
                    )
                check_shapes(shapes, reader, lo)
                yield finish_batch(
                    output(images),
                    torch.from_numpy(np.array(labels.as_tensor(), np.int64).reshape(-1)),  # a copy: DALI reuses it
                    device=r.device,
                    dtype=r.dtype,
                    channels_last=r.channels_last,
                    input_channels_last=r.channels_last,
                )
        finally:
            del pipe  # free the epoch's buffers before the next epoch builds its pipeline
            reader.close()

    return run
