"""What tests/unit/test_data_scale.py and tests/integration/test_data_scale.py share."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import data as D
from tests.support.datasets import make_dataset


def cfg_for(root: Path, **kw) -> D.DataConfig:
    kw.setdefault("workers", 1)
    return D.DataConfig(data=str(root), loader="torch", **kw)


def _epoch(root: Path, epoch: int = 0, **kw) -> D.Loader:
    return D.train_loader(cfg_for(root), dp_rank=0, dp_size=1, epoch=epoch, seed=0, device="cpu", batch_size=8, **kw)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    flat = np.full((256, 256, 3), 100, np.uint8)
    return make_dataset(
        tmp_path_factory.mktemp("small"),
        {"train": [300, 200], "val": [50]},
        image=lambda i: flat,
        label=lambda i: i % 7,
    )


@pytest.fixture
def copy(small: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(small, out)
    return out
