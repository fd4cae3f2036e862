"""Train-split pixel statistics, computed the paper's way from the shards themselves.

The paper subtracts the mean activity over the training set from each pixel (a 256x256x3 mean
image) and perturbs RGB intensities along the principal components of the 3x3 covariance of
RGB pixel values over the training set (PCA lighting). Both come from the stored 256x256 JPEGs,
i.e. exactly what training decodes. A bounded sample of images is enough for stable estimates;
the manifest states how many were used.
"""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from basics.errors import UserError
from basics.files import write_bytes_atomic
from preprocess import format as fmt


@dataclass
class PixelMoments:
    """Sufficient statistics that add up across shards (and worker processes)."""

    images: int
    image_sum: np.ndarray  # float64 HxWx3: per-pixel sum over images
    pixel_sum: np.ndarray  # float64 3: sum over all pixels
    outer_sum: np.ndarray  # float64 3x3: sum of x x^T over all pixels

    @classmethod
    def zeros(cls, size: int) -> "PixelMoments":
        return cls(0, np.zeros((size, size, 3)), np.zeros(3), np.zeros((3, 3)))

    def add_image(self, rgb: np.ndarray) -> None:
        pixels = rgb.reshape(-1, 3).astype(np.float64)
        self.images += 1
        self.image_sum += rgb
        self.pixel_sum += pixels.sum(axis=0)
        self.outer_sum += pixels.T @ pixels

    def __add__(self, other: "PixelMoments") -> "PixelMoments":
        return PixelMoments(
            self.images + other.images,
            self.image_sum + other.image_sum,
            self.pixel_sum + other.pixel_sum,
            self.outer_sum + other.outer_sum,
        )


def shard_moments(shard_path: str, max_images: int, size: int) -> PixelMoments:
    """Moments of the first ``max_images`` images of one shard (shards are already shuffled)."""
    from preprocess import image

    moments = PixelMoments.zeros(size)
    with tarfile.open(shard_path) as tar:
        for member in tar:
            if moments.images >= max_images:
                break
            if member.isfile() and member.name.endswith("." + fmt.IMAGE_EXT):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                moments.add_image(image.decode_shard_jpeg(data))
    return moments


def per_shard_quota(shard_samples: Sequence[int], total: int) -> list[int]:
    """Spread a sample budget over shards in proportion to their size (at least 1 each)."""
    available = sum(shard_samples)
    if total <= 0 or total >= available:
        return list(shard_samples)
    return [min(n, max(1, round(total * n / available))) for n in shard_samples]


def finish(moments: PixelMoments, out: Path) -> fmt.Stats:
    """Mean image to ``out/mean_image.npy``; channel mean/std and the RGB eigen-decomposition."""
    if moments.images == 0:
        raise UserError(f"{out}: no train images to compute statistics from")
    pixels = moments.images * moments.image_sum.shape[0] * moments.image_sum.shape[1]
    mean = moments.pixel_sum / pixels
    cov = moments.outer_sum / pixels - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    # eigh's eigenvector signs are arbitrary; fix them so re-runs give identical manifests.
    eigvec = eigvec * np.where(eigvec.sum(axis=0) < 0, -1.0, 1.0)

    mean_image = (moments.image_sum / moments.images).astype(np.float32)
    import io

    buf = io.BytesIO()
    np.save(buf, mean_image)
    write_bytes_atomic(Path(out) / fmt.MEAN_IMAGE_NAME, buf.getvalue())
    return fmt.Stats(
        images=moments.images,
        mean=[float(v) for v in mean],
        std=[float(v) for v in np.sqrt(np.diag(cov))],
        mean_image=fmt.MEAN_IMAGE_NAME,
        eigval=[float(v) for v in np.clip(eigval, 0, None)],
        eigvec=[[float(v) for v in row] for row in eigvec],
    )
