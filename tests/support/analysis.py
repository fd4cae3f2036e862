"""What tests/unit/test_analysis.py and tests/integration/test_analysis.py share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def assert_png(path: Path, size: list[int]) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and list(image.size) == size
        assert len(set(np.asarray(image.convert("L")).flatten().tolist())) > 10  # not a blank canvas
