"""The pure-PyTorch implementation of ``pipeline.data``: a DataLoader over the shards, no DALI needed.

Samples are read straight from the tar files at the offsets the DALI index files give (the same
files DALI reads), so the fallback splits the data exactly like DALI: the same shard order, the
same contiguous sample range per dp rank. (``webdataset``'s own splitting works per tar file,
which would give ranks unequal sample counts; random access through the index is exact and lets
the fallback permute the rank's whole range every epoch, a better shuffle than DALI's buffer. The
augmentation distribution is what has to match DALI, not the order.)

Every random choice of an epoch (order, window offsets, mirrors, lighting coefficients) is drawn
up front in the main process from the epoch seed and indexed by position in the epoch, so the
result does not depend on the number of workers, tensor-parallel pairs get identical batches,
and skipping ahead would not need to decode anything. Workers decode with libjpeg-turbo through
``simplejpeg`` (a project dependency; torchvision 0.29 deprecates its own decoder) and apply the
window, mirror, mean and lighting with plain tensor ops (what ``torchvision.transforms.v2``'s
crop/horizontal_flip/normalize do, fused so that each view costs three passes); batches reach
the main process through shared memory (``default_collate`` in the workers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.data.common import TEN_CROP_VIEWS, EpochRequest, Normalization, Split, finish_batch, rank_range
from preprocess import format as fmt
from preprocess.errors import UserError
from preprocess.format import FormatError


@dataclass(frozen=True)
class Plan:
    """Per position in this rank's epoch: where the sample is and how to augment it."""

    shard: np.ndarray  # int32 index into ``paths``
    jpg: np.ndarray  # int64 [n, 2] offset, size of the .jpg member
    cls: np.ndarray  # int64 [n, 2] offset, size of the .cls member
    keys: list[str]
    x: np.ndarray  # int32 window left
    y: np.ndarray  # int32 window top
    mirror: np.ndarray  # bool
    offset: np.ndarray  # float32 [n, 3] lighting offset


def read_index(path: Path) -> list[tuple[str, int, int, int, int]]:
    """(key, jpg offset, jpg size, cls offset, cls size) per sample of a DALI index file (wds2idx v1.2)."""
    rows = []
    with open(path) as f:
        header = f.readline().split()
        for line_no, line in enumerate(f, start=2):
            parts = line.split()
            members = {}
            for i in range(0, len(parts) - 3, 4):  # groups of: ext offset size name
                members[parts[i]] = (int(parts[i + 1]), int(parts[i + 2]), parts[i + 3])
            if fmt.IMAGE_EXT not in members or fmt.LABEL_EXT not in members:
                raise UserError(f"{path}:{line_no}: sample without both .{fmt.IMAGE_EXT} and .{fmt.LABEL_EXT} "
                                "(or an index without member names); re-run `python -m preprocess shard`")
            jpg, cls = members[fmt.IMAGE_EXT], members[fmt.LABEL_EXT]
            rows.append((jpg[2].split(".", 1)[0], jpg[0], jpg[1], cls[0], cls[1]))
    if len(header) != 2 or int(header[1]) != len(rows):
        raise UserError(f"{path}: index header says {header[1:]} samples, it lists {len(rows)}")
    return rows


def plan_epoch(split: Split, norm: Normalization, *, dp_rank: int, dp_size: int, seed: int, train: bool) -> Plan:
    """This rank's samples (DALI's contiguous range) in epoch order, with their augmentation drawn."""
    start, end = rank_range(split.total, dp_rank, dp_size)
    shard_ids, jpgs, clss, keys = [], [], [], []
    first = 0
    for s, count in enumerate(split.counts):
        lo, hi = max(start, first), min(end, first + count)
        if lo < hi:  # only the shards overlapping this rank's range are read
            rows = read_index(split.indexes[s])[lo - first : hi - first]
            shard_ids += [s] * len(rows)
            keys += [r[0] for r in rows]
            jpgs += [(r[1], r[2]) for r in rows]
            clss += [(r[3], r[4]) for r in rows]
        first += count
    n = end - start
    rng = np.random.default_rng(seed)
    order = rng.permutation(n) if train else np.arange(n)
    if train:
        x = rng.integers(0, norm.max_offset + 1, n)
        y = rng.integers(0, norm.max_offset + 1, n)
        mirror = rng.random(n) < 0.5
        alpha = rng.normal(0.0, norm.lighting_std, (n, 3)) if norm.lighting_std > 0 else np.zeros((n, 3))
        offset = (alpha @ norm.lighting.T.astype(np.float64)).astype(np.float32)
    else:
        x = y = np.full(n, norm.center_offset())
        mirror = np.zeros(n, bool)
        offset = np.zeros((n, 3), np.float32)
    jpg_arr = np.asarray(jpgs, np.int64).reshape(n, 2)[order]
    cls_arr = np.asarray(clss, np.int64).reshape(n, 2)[order]
    return Plan(np.asarray(shard_ids, np.int32)[order], jpg_arr, cls_arr, [keys[i] for i in order],
                x.astype(np.int32), y.astype(np.int32), mirror, offset)


class ShardSamples:
    """Map-style dataset over a Plan: item ``i`` is the ``i``-th sample of the epoch, augmented.

    Per sample: decode (uint8 HWC), then one pass per view converts the window (a view of the
    decoded array, mirrored by a negative stride) to float CHW, one subtracts the mean image's
    window (a slice of a precomputed CHW mean, or of its mirror image, so no copy is made), and one
    applies ``(x + offset - channel_mean) / channel_std``, as DALI's crop_mirror_normalize does.
    """

    def __init__(self, split: Split, norm: Normalization, plan: Plan, *, ten_crop: bool):
        import torch

        self.paths = [str(p) for p in split.shards]
        self.norm = norm
        self.plan = plan
        self.ten_crop = ten_crop
        self._files: dict[int, Any] = {}  # per worker process: open shard files
        self._mean = self._mean_mirrored = None
        if norm.mean_image is not None:
            mean = torch.from_numpy(norm.mean_image).permute(2, 0, 1).contiguous()
            self._mean, self._mean_mirrored = mean, mean.flip(-1).contiguous()
        self._channel_mean = torch.tensor(norm.channel_mean, dtype=torch.float32)[:, None, None]
        self._inv_std = 1.0 / torch.tensor(norm.channel_std, dtype=torch.float32)[:, None, None]
        self._scale = any(s != 1.0 for s in norm.channel_std)

    def __len__(self) -> int:
        return len(self.plan.keys)

    def __getstate__(self) -> dict[str, Any]:  # spawned workers (macOS) open their own files
        return {**self.__dict__, "_files": {}}

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.paths[shard], "rb")
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise UserError(f"{self.paths[shard]}: shard ends before byte {offset + size} (truncated)")
        return data

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import simplejpeg

        p = self.plan
        shard = int(p.shard[i])
        where = f"{self.paths[shard]}: sample {p.keys[i]}"
        try:
            label = fmt.decode_label(self._read(shard, int(p.cls[i, 0]), int(p.cls[i, 1])))
        except ValueError:
            raise FormatError(f"{where}: .{fmt.LABEL_EXT} is not a decimal number") from None
        try:
            pixels = simplejpeg.decode_jpeg(self._read(shard, int(p.jpg[i, 0]), int(p.jpg[i, 1])), colorspace="RGB")
        except ValueError as e:
            raise UserError(f"{where}: cannot decode its JPEG ({str(e).splitlines()[0]})") from None
        size = self.norm.image_size
        if self._mean is not None and pixels.shape[:2] != (size, size):
            raise FormatError(f"{where}: image is {pixels.shape[:2]}, the format stores {size}x{size}")
        if self.ten_crop:
            return self._ten_views(pixels), label
        return self._view(pixels, int(p.y[i]), int(p.x[i]), bool(p.mirror[i]), p.offset[i]), label

    def _view(self, pixels: np.ndarray, top: int, left: int, mirror: bool, offset: np.ndarray | None) -> Any:
        import torch

        crop, width = self.norm.crop, pixels.shape[1]
        window = pixels[top:top + crop, left:left + crop]
        if mirror:
            window = window[:, ::-1]
        out = torch.empty((3, crop, crop), dtype=torch.float32)
        out.copy_(torch.from_numpy(np.ascontiguousarray(window)).permute(2, 0, 1))  # uint8 HWC -> float CHW
        if self._mean is not None:
            if mirror:  # the mirrored window of the mean = a window of the mirrored mean
                out.sub_(self._mean_mirrored[:, top:top + crop, width - left - crop:width - left])
            else:
                out.sub_(self._mean[:, top:top + crop, left:left + crop])
        mean = self._channel_mean
        if offset is not None:
            mean = mean - torch.from_numpy(np.asarray(offset, np.float32))[:, None, None]
        out.sub_(mean)
        if self._scale:
            out.mul_(self._inv_std)
        return out

    def _ten_views(self, pixels: np.ndarray) -> Any:
        import torch

        m, c = self.norm.max_offset, self.norm.center_offset()
        windows = [(0, 0), (0, m), (m, 0), (m, m), (c, c)]  # (top, left): tl, tr, bl, br, centre
        views = [self._view(pixels, top, left, mirror, None) for mirror in (False, True) for top, left in windows]
        assert len(views) == TEN_CROP_VIEWS
        return torch.stack(views)


def _user_error_line(error: BaseException) -> str:
    """DataLoader re-raises a worker's exception with the worker traceback in the message: keep the last line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else str(error)
    for prefix in ("preprocess.format.UserError: ", "preprocess.format.FormatError: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


def batches(request: EpochRequest) -> Callable[[], Iterator[tuple[Any, Any]]]:
    """What ``pipeline.data`` calls: a function that starts the epoch's DataLoader and yields (images, labels)."""
    r = request

    def run() -> Iterator[tuple[Any, Any]]:
        from torch.utils.data import DataLoader, default_collate
        # Import what the workers use before they fork, so each epoch's workers do not import it again.
        import simplejpeg  # noqa: F401

        plan = plan_epoch(r.split, r.norm, dp_rank=r.dp_rank, dp_size=r.dp_size, seed=r.seed, train=r.train)
        n, b = len(plan.keys), r.batch_size
        dataset = ShardSamples(r.split, r.norm, plan, ten_crop=r.ten_crop)
        loader = DataLoader(dataset, batch_sampler=[range(i, min(i + b, n)) for i in range(0, n, b)],
                            num_workers=r.workers, collate_fn=default_collate, pin_memory=r.device.type == "cuda",
                            prefetch_factor=4 if r.workers else None, persistent_workers=False)
        batches = iter(loader)
        try:
            for images, labels in batches:
                yield finish_batch(images, labels, r.split, device=r.device, dtype=r.dtype,
                                   channels_last=r.channels_last)
        except UserError as e:
            raise type(e)(_user_error_line(e)) from None
        finally:
            # Stop the workers now: an error's traceback (or an abandoned epoch) would otherwise keep
            # the iterator alive, and its later garbage collection blocks on the workers' shutdown.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    return run
