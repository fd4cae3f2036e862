"""The pure-PyTorch implementation of ``pipeline.data``: a DataLoader over the shards, no DALI needed.

It executes the epoch plan of ``epoch_plan.plan_epoch`` (the same samples, order, windows, mirrors and
lighting as the DALI implementation): worker processes read each sample at the offsets the index
files give, decode with libjpeg-turbo (``simplejpeg``; torchvision 0.29 deprecates its own
decoder) and apply the window, mirror, mean and lighting with plain tensor ops, fused so that each
view costs three passes. Batches reach the main process through shared memory.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from basics.errors import UserError
from pipeline.data.batches import EpochRequest, finish_batch
from pipeline.data.dataset import Normalization, Split
from pipeline.data.epoch_plan import Plan
from pipeline.data.sample_reader import SampleReader
from pipeline.data.views import TEN_CROP_VIEWS, MeanWindows, ten_view_windows


class ShardSamples:
    """Map-style dataset over a Plan: item ``i`` is the ``i``-th sample of the epoch, augmented.

    Per view: one pass converts the window (a view of the decoded array, mirrored by a negative
    stride) to float CHW, one subtracts the mean image's window, one applies ``(x + offset -
    channel_mean) / channel_std``, as DALI's crop_mirror_normalize does.
    """

    def __init__(self, split: Split, norm: Normalization, plan: Plan, *, ten_crop: bool):
        import torch

        self.reader = SampleReader(split, plan, norm.image_size)
        self.norm = norm
        self.plan = plan
        self.ten_crop = ten_crop
        self._mean = MeanWindows(norm) if norm.mean_image is not None else None
        self._channel_mean = torch.tensor(norm.channel_mean, dtype=torch.float32)[:, None, None]
        self._inv_std = 1.0 / torch.tensor(norm.channel_std, dtype=torch.float32)[:, None, None]
        self._scale = any(s != 1.0 for s in norm.channel_std)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import simplejpeg

        label = self.reader.label(i)
        try:
            pixels = simplejpeg.decode_jpeg(self.reader.jpeg(i), colorspace="RGB")
        except ValueError as e:
            raise UserError(f"{self.reader.where(i)}: cannot decode its JPEG ({str(e).splitlines()[0]})") from None
        if self.ten_crop:
            return self._ten_views(pixels), label
        p = self.plan
        return self._view(pixels, int(p.y[i]), int(p.x[i]), bool(p.mirror[i]), p.offset[i]), label

    def _view(self, pixels: np.ndarray, top: int, left: int, mirror: bool, offset: np.ndarray | None) -> Any:
        import torch

        crop = self.norm.crop
        window = pixels[top : top + crop, left : left + crop]
        if mirror:
            window = window[:, ::-1]
        out = torch.empty((3, crop, crop), dtype=torch.float32)
        out.copy_(torch.from_numpy(np.ascontiguousarray(window)).permute(2, 0, 1))  # uint8 HWC -> float CHW
        if self._mean is not None:
            out.sub_(self._mean.window(top, left, mirror))
        mean = self._channel_mean
        if offset is not None:
            mean = mean - torch.from_numpy(np.asarray(offset, np.float32))[:, None, None]
        out.sub_(mean)
        if self._scale:
            out.mul_(self._inv_std)
        return out

    def _ten_views(self, pixels: np.ndarray) -> Any:
        import torch

        windows = ten_view_windows(self.norm.max_offset, self.norm.center_offset())
        assert len(windows) == TEN_CROP_VIEWS
        return torch.stack([self._view(pixels, top, left, mirror, None) for mirror, top, left in windows])


def _user_error_line(error: BaseException) -> str:
    """DataLoader re-raises a worker's exception with the worker traceback in the message: keep the last line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else str(error)
    for prefix in ("basics.errors.UserError: ", "preprocess.format.FormatError: "):
        if last.startswith(prefix):
            return last[len(prefix) :]
    return last


def batches(request: EpochRequest) -> Callable[[], Iterator[tuple[Any, Any]]]:
    """What ``pipeline.data`` calls: a function that starts the epoch's DataLoader and yields (images, labels)."""
    r = request

    def run() -> Iterator[tuple[Any, Any]]:
        # Import what the workers use before they fork, so each epoch's workers do not import it again.
        import simplejpeg  # noqa: F401
        from torch.utils.data import DataLoader, default_collate

        dataset = ShardSamples(r.split, r.norm, r.plan, ten_crop=r.ten_crop)
        loader = DataLoader(
            dataset,
            batch_sampler=[range(lo, hi) for lo, hi in r.batches],
            num_workers=r.workers,
            collate_fn=default_collate,
            pin_memory=r.device.type == "cuda",
            prefetch_factor=4 if r.workers else None,
            persistent_workers=False,
        )
        # A DALI pipeline left in a reference cycle (by an earlier epoch's error, say) must be finalised here, not
        # in a forked worker: there its threads do not exist and its destructor would wait for them forever.
        gc.collect()
        batches = iter(loader)
        try:
            for images, labels in batches:
                yield finish_batch(images, labels, device=r.device, dtype=r.dtype, channels_last=r.channels_last)
        except UserError as e:
            raise type(e)(_user_error_line(e)) from None
        finally:
            # Stop the workers now: an error's traceback (or an abandoned epoch) would otherwise keep
            # the iterator alive, and its later garbage collection blocks on the workers' shutdown.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            dataset.reader.close()

    return run
