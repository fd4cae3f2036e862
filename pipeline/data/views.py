"""The crop's windows: the paper's 10 validation views, and the mean image under a window (the torch loader's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.dataset import Normalization

if TYPE_CHECKING:
    import torch

TEN_CROP_VIEWS = 10


class MeanWindows:
    """Windows of the mean image as views (no copies): subtracted from the cropped window, not the full image.

    Subtracting the 256x256 mean image before cropping costs a full-image float pass; the crop's
    window of it (of its mirror image for mirrored views, so the slice stays a view) is all that
    is needed, and gives the same numbers within float rounding.
    """

    def __init__(self, norm: Normalization, device: torch.device | None = None, *, channels_last: bool = False):
        import torch

        assert norm.mean_image is not None
        hwc = norm.mean_image
        # Logical CHW; stored like the images it is subtracted from (HWC memory for channels_last).
        mean, mirrored = (torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1) for a in (hwc, hwc[:, ::-1]))
        if not channels_last:
            mean, mirrored = mean.contiguous(), mirrored.contiguous()
        self.crop, self.width = norm.crop, hwc.shape[1]
        self.mean, self.mirrored = mean.to(device), mirrored.to(device)

    def window(self, top: int, left: int, mirror: bool) -> torch.Tensor:
        """[3, crop, crop]: the mean under the (mirrored) window at ``top``, ``left``."""
        c = self.crop
        if mirror:  # the mirrored window of the mean = a window of the mirrored mean
            return self.mirrored[:, top : top + c, self.width - left - c : self.width - left]
        return self.mean[:, top : top + c, left : left + c]

    def ten_views(self, max_offset: int, center: int) -> torch.Tensor:
        """[10, 3, crop, crop]: the mean under the 10 validation views, in ``ten_view_windows`` order."""
        import torch

        return torch.stack(
            [self.window(top, left, mirror) for mirror, top, left in ten_view_windows(max_offset, center)]
        )


def ten_view_windows(max_offset: int, center: int) -> list[tuple[bool, int, int]]:
    """(mirror, top, left) of the paper's 10 views: tl, tr, bl, br, centre, then the same mirrored."""
    m, c = max_offset, center
    return [(mirror, top, left) for mirror in (False, True) for top, left in ((0, 0), (0, m), (m, 0), (m, m), (c, c))]
