"""The DALI implementation of ``pipeline.data``: decode, crop, mirror, lighting and normalisation in DALI.

It executes the epoch plan of ``common.plan_epoch``: an ``external_source`` hands DALI each batch's
JPEG bytes (read at the index files' offsets, checked and named by ``common.SampleReader``) with
the plan's windows, mirrors and lighting, so a batch depends on nothing but its plan positions: an
epoch can start at any batch without reading or decoding the ones before it, and the batches equal
the torch fallback's up to the JPEG decoder. Decoding runs on the GPU (``device="mixed"``) when the
training device is CUDA, else on CPU threads; one fused ``crop_mirror_normalize`` per view does the
window, mirror, ``(x - (channel_mean - lighting)) / channel_std``, layout and float conversion. The
paper's mean image is subtracted from the cropped window while the output is copied out of DALI
(``common.MeanWindows``), which costs no extra pass. Notes: ``docs/data-pipeline.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from pipeline.data.common import EpochRequest, MeanWindows, Normalization, SampleReader, finish_batch, ten_view_windows
from preprocess.errors import UserError


class Feed:
    """The ``external_source``: call ``i`` gives the ``i``-th batch to make, encoded, with its parameters."""

    def __init__(self, request: EpochRequest, reader: SampleReader):
        self.request = request
        self.reader = reader
        norm = request.norm
        self.channel_mean = np.asarray(norm.channel_mean, np.float32)
        self.max_offset = norm.max_offset

    def __call__(self, i: int) -> tuple[Any, ...]:
        if i >= len(self.request.batches):
            raise StopIteration
        lo, hi = self.request.batches[i]
        jpegs = [np.frombuffer(self.reader.jpeg(j), np.uint8) for j in range(lo, hi)]
        labels = np.array([self.reader.label(j) for j in range(lo, hi)], np.int64)
        if not self.request.train:
            return jpegs, labels
        p = self.request.plan
        scale = 1.0 / self.max_offset if self.max_offset else 0.0
        # Normalised positions k / max_offset: DALI rounds them back to exactly k.
        pos_x = (p.x[lo:hi] * scale).astype(np.float32) if scale else np.full(hi - lo, 0.5, np.float32)
        pos_y = (p.y[lo:hi] * scale).astype(np.float32) if scale else np.full(hi - lo, 0.5, np.float32)
        mirror = p.mirror[lo:hi].astype(np.int32)
        mean = self.channel_mean[None, :] - p.offset[lo:hi]  # the lighting offset, folded into the mean
        return jpegs, labels, pos_x, pos_y, mirror, mean.astype(np.float32)


def decode(jpegs: Any, *, gpu: bool) -> Any:
    from nvidia.dali import fn, types

    return fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)


def crop_normalize(
    images: Any, norm: Normalization, *, pos_x: Any, pos_y: Any, mirror: Any, mean: Any, layout: str
) -> Any:
    """One fused pass: window, mirror, ``(x - mean) / channel_std``, float, layout."""
    from nvidia.dali import fn, types

    return fn.crop_mirror_normalize(
        images,
        crop=(norm.crop, norm.crop),
        crop_pos_x=pos_x,
        crop_pos_y=pos_y,
        mirror=mirror,
        mean=mean,
        std=list(norm.channel_std),
        dtype=types.FLOAT,
        output_layout=layout,
    )


def training_graph(feed: Feed, norm: Normalization, *, gpu: bool, layout: str) -> tuple[Any, Any]:
    """The plan's window, mirror and lighting per sample (fed with the bytes). Call inside a DALI ``Pipeline``."""
    from nvidia.dali import fn, types

    jpegs, labels, pos_x, pos_y, mirror, mean = fn.external_source(
        source=feed,
        num_outputs=6,
        batch=True,
        dtype=[types.UINT8, types.INT64, types.FLOAT, types.FLOAT, types.INT32, types.FLOAT],
    )
    out = crop_normalize(
        decode(jpegs, gpu=gpu), norm, pos_x=pos_x, pos_y=pos_y, mirror=mirror, mean=mean, layout=layout
    )
    return out, labels


def eval_graph(feed: Feed, norm: Normalization, *, gpu: bool, layout: str, ten_crop: bool) -> tuple[Any, Any]:
    """Centre crop, or the 10 views stacked on a new leading axis: [10, C, H, W] (or [10, H, W, C])."""
    from nvidia.dali import fn, types

    jpegs, labels = fn.external_source(source=feed, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT64])
    images = decode(jpegs, gpu=gpu)
    m = norm.max_offset
    mean = list(norm.channel_mean)
    c = norm.center_offset()
    windows = ten_view_windows(m, c) if ten_crop else [(False, c, c)]
    views = [
        crop_normalize(
            images,
            norm,
            pos_x=left / m if m else 0.5,
            pos_y=top / m if m else 0.5,
            mirror=int(mirror),
            mean=mean,
            layout=layout,
        )
        for mirror, top, left in windows
    ]
    return (fn.stack(*views) if ten_crop else views[0]), labels


def build(request: EpochRequest, feed: Feed, *, device_id: int | None) -> Any:
    """A built DALI pipeline; ``device_id=None`` runs it on the CPU only."""
    from nvidia.dali import Pipeline

    gpu = device_id is not None
    layout = "HWC" if request.channels_last else "CHW"
    pipe = Pipeline(batch_size=request.batch_size, num_threads=request.workers, device_id=device_id, seed=0)
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
    """Copies a DALI batch into a torch tensor, subtracting the mean image's windows in the same pass."""

    def __init__(self, request: EpochRequest, device: Any):
        self.request = request
        self.device = device
        norm = request.norm
        self.means = (
            MeanWindows(norm, device, channels_last=request.channels_last) if norm.mean_image is not None else None
        )
        self.fixed = None  # the mean under the validation views: the same for every sample
        if self.means is not None and not request.train:
            c = norm.center_offset()
            self.fixed = (
                self.means.ten_views(norm.max_offset, c) if request.ten_crop else self.means.window(c, c, False)
            )

    def __call__(self, images: Any, lo: int, hi: int) -> Any:
        import torch

        chw = (lambda t: t.movedim(-1, -3)) if self.request.channels_last else (lambda t: t)
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            out = torch.empty(images.as_tensor().shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(images, out, cuda_stream=torch.cuda.current_stream(self.device))
            if self.fixed is not None:
                chw(out).sub_(self.fixed)
            elif self.means is not None:
                self._subtract_windows(chw(out), chw(out), lo, hi)
            return out
        source = torch.from_numpy(np.asarray(images.as_tensor()))  # DALI's buffer, valid until the next run
        # Allocated through numpy: a fresh torch CPU tensor of a batch's size maps new pages every time, which
        # was measured at ~10x the cost of the copy itself; numpy's allocation reuses the freed batch's memory.
        out = torch.from_numpy(np.empty(tuple(source.shape), np.float32))
        if self.fixed is not None:
            torch.sub(chw(source), self.fixed, out=chw(out))
        elif self.means is not None:
            self._subtract_windows(chw(source), chw(out), lo, hi)
        else:
            out.copy_(source)
        return out

    def _subtract_windows(self, source: Any, out: Any, lo: int, hi: int) -> None:
        import torch

        assert self.means is not None
        p = self.request.plan
        for k, (top, left, mirror) in enumerate(
            zip(p.y[lo:hi].tolist(), p.x[lo:hi].tolist(), p.mirror[lo:hi].tolist())
        ):
            torch.sub(source[k], self.means.window(top, left, mirror), out=out[k])


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
        output = Output(r, r.device)
        try:
            for lo, hi in r.batches:
                try:
                    images, labels = pipe.run()
                except RuntimeError as e:
                    raise UserError(
                        f"{r.split.describe()}: DALI failed decoding a sample of positions {lo}..{hi - 1} "
                        f"({dali_message(e)}); --data.loader torch names the broken sample"
                    ) from None
                labels = torch.from_numpy(np.array(labels.as_tensor(), np.int64).reshape(-1))
                yield finish_batch(
                    output(images, lo, hi),
                    labels,
                    device=r.device,
                    dtype=r.dtype,
                    channels_last=r.channels_last,
                    input_channels_last=r.channels_last,
                )
        finally:
            del pipe  # free the epoch's buffers before the next epoch builds its pipeline
            reader.close()

    return run
