"""The sample reader: a plan's JPEG bytes and labels from the memory-mapped shards, errors naming the sample."""

from __future__ import annotations

import mmap
import os
from typing import Any

import numpy as np

from basics.errors import UserError
from pipeline.data.dataset import Split
from pipeline.data.epoch_plan import Plan
from preprocess import format as fmt
from preprocess.format import FormatError


class SampleReader:
    """Reads a plan's samples from the shards: JPEG bytes and labels, checked, errors naming the sample.

    The shards are memory-mapped, once per process: a sample is a view into its shard at the
    index's offsets, so reading a batch makes no system call per sample, and a JPEG handed to DALI
    is not copied on the way (DALI's own webdataset reader maps the shards too). ``jpeg`` checks the
    JPEG's header (not its pixels), so a stored image of the wrong size is reported before a decoder
    sees it; ``jpegs``, the DALI feed's batch read, leaves that check to the pipeline (its shapes are
    checked per batch, and a batch DALI cannot decode is checked here sample by sample to name the
    culprit). Labels are parsed and range-checked here for both loaders.
    """

    def __init__(self, split: Split, plan: Plan, image_size: int):
        self.paths = [str(p) for p in split.shards]
        self.plan = plan
        self.num_classes = split.num_classes
        self.image_size = image_size
        self._maps: dict[int, mmap.mmap] = {}  # shard -> its mapping, per process
        self._arrays: dict[int, np.ndarray] = {}  # shard -> uint8 view of the mapping

    def __getstate__(self) -> dict[str, Any]:  # worker processes map the shards themselves
        return {**self.__dict__, "_maps": {}, "_arrays": {}}

    def where(self, i: int) -> str:
        return f"{self.paths[int(self.plan.shard[i])]}: sample {self.plan.key(i)}"

    def _shard(self, shard: int) -> np.ndarray:
        data = self._arrays.get(shard)
        if data is None:
            with open(self.paths[shard], "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:  # mmap refuses empty files; every read then runs past the end
                    data = np.empty(0, np.uint8)
                else:
                    self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    data = np.frombuffer(self._maps[shard], np.uint8)
            self._arrays[shard] = data
        return data

    def _truncated(self, shard: int, offset: int, size: int) -> UserError:
        return UserError(f"{self.paths[shard]}: shard ends before byte {offset + size} (truncated)")

    def _member(self, i: int, spans: np.ndarray) -> np.ndarray:
        shard, offset, size = int(self.plan.shard[i]), int(spans[i, 0]), int(spans[i, 1])
        data = self._shard(shard)[offset : offset + size]
        if len(data) != size:
            raise self._truncated(shard, offset, size)
        return data

    def label(self, i: int) -> int:
        raw = self._member(i, self.plan.cls).tobytes()
        try:
            label = fmt.decode_label(raw)
        except (ValueError, UnicodeDecodeError):
            raise FormatError(f"{self.where(i)}: .{fmt.LABEL_EXT} is not a decimal number ({raw[:20]!r})") from None
        if not 0 <= label < self.num_classes:
            raise FormatError(
                f"{self.where(i)}: label {label} is outside the manifest's {self.num_classes} "
                "classes; the shards and the manifest do not belong together"
            )
        return label

    def labels(self, lo: int, hi: int) -> np.ndarray:
        """int64 labels of positions ``[lo, hi)``, checked; an error names the first bad sample.

        The plan's label column (read once per dataset, :func:`read_labels`), sliced: what it could not
        parse in arrays, or what lies outside the classes, goes through :meth:`label`, which parses
        like ``format.decode_label`` and names the sample when it is not a valid label.
        """
        labels = self.plan.label[lo:hi].astype(np.int64)
        for k in np.flatnonzero((labels < 0) | (labels >= self.num_classes)).tolist():
            labels[k] = self.label(lo + k)
        return labels

    def jpeg(self, i: int) -> np.ndarray:
        """The JPEG's bytes (a view into the shard), its header checked: decodable, and the stored size."""
        import simplejpeg

        data = self._member(i, self.plan.jpg)
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as e:
            raise UserError(f"{self.where(i)}: cannot decode its JPEG ({str(e).splitlines()[0]})") from None
        size = self.image_size
        if (height, width) != (size, size):
            raise FormatError(
                f"{self.where(i)}: image is {height}x{width}, the format stores {size}x{size}; "
                "re-run `python -m preprocess shard`"
            )
        return data

    def jpegs(self, lo: int, hi: int) -> list[np.ndarray]:
        """The JPEG bytes of positions ``[lo, hi)`` as views into the shards, unchecked (see the class notes)."""
        p = self.plan
        spans = p.jpg[lo:hi]
        views = [self._shard(s)[o : o + n] for s, (o, n) in zip(p.shard[lo:hi].tolist(), spans.tolist())]
        if sum(map(len, views)) != int(spans[:, 1].sum()):  # a slice past a shard's end comes back short
            for i in range(lo, hi):
                self._member(i, p.jpg)
        return views

    def check(self, lo: int, hi: int) -> None:
        """Raise the named error of the first sample in ``[lo, hi)`` that cannot be read, labelled or decoded."""
        for i in range(lo, hi):
            self.label(i)
            self.jpeg(i)

    def close(self) -> None:
        """Drop the mappings; a view still held elsewhere (a batch DALI has not released) keeps its own alive."""
        self._arrays.clear()
        self._maps.clear()
