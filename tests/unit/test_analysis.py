"""Figures 3 and 4: the colour measure, the PNGs (non-empty, of the stated size), the on-disk feature
store and the chunked nearest-neighbour search against a brute-force reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.tools.analysis import (
    FeatureStore,
    colour_fraction,
    filters_figure,
    nearest,
    write_rank_features,
)
from tests.support.analysis import assert_png


def test_colour_fraction_separates_grey_from_colour_opponent_kernels() -> None:
    pattern = torch.randn(8, 1, 11, 11)
    grey = pattern.expand(-1, 3, -1, -1)
    opponent = torch.cat([pattern, -pattern, torch.zeros_like(pattern)], 1)  # red against green
    assert colour_fraction(grey).max() < 1e-6
    assert colour_fraction(opponent).min() > 0.99
    assert colour_fraction(torch.randn(2000, 3, 11, 11)).mean() == pytest.approx(2 / 3, abs=0.01)


def test_filters_figure_has_the_stated_size(tmp_path: Path) -> None:
    towers = [torch.randn(48, 3, 11, 11), torch.randn(48, 1, 11, 11).expand(-1, 3, -1, -1)]
    summary = filters_figure(towers, tmp_path / "fig3.png")
    assert_png(tmp_path / "fig3.png", summary["size"])
    low, high = summary["colour_fraction"][1], summary["colour_fraction"][0]
    assert low < 1e-6 < 0.5 < high


def store_of(tmp_path: Path, parts: list[np.ndarray]) -> FeatureStore:
    """Per-rank float16 files, as the ranks write them, plus the meta.json rank 0 writes."""
    for rank, part in enumerate(parts):
        batches = (
            (torch.from_numpy(part[i : i + 5]), torch.zeros(len(part[i : i + 5]), dtype=torch.int64))
            for i in range(0, len(part), 5)
        )
        write_rank_features(tmp_path, rank, batches, len(part), part.shape[1])
    counts = [len(p) for p in parts]
    (tmp_path / "meta.json").write_text(
        json.dumps({"dim": parts[0].shape[1], "counts": counts, "starts": np.cumsum([0, *counts[:-1]]).tolist()})
    )
    return FeatureStore.open(tmp_path)


def test_chunked_search_on_disk_is_exact_against_brute_force(tmp_path: Path) -> None:
    gen = np.random.default_rng(0)
    features = gen.standard_normal((203, 32)).astype(np.float16)
    store = store_of(tmp_path, [features[:71], features[71:71], features[71:]])  # uneven, one rank empty
    assert store.counts == (71, 0, 132) and (tmp_path / "features-rank2.f16").stat().st_size == 132 * 32 * 2
    queries = torch.from_numpy(np.concatenate([gen.standard_normal((5, 32)), features[[3, 150]]]).astype(np.float32))
    reference = torch.cdist(queries.double(), torch.from_numpy(features).double())
    want_d, want_i = reference.topk(6, dim=1, largest=False)
    for chunk_rows in (7, 64, 10_000):  # chunks split, cross and exceed the rank files
        dists, idx = nearest(queries, store, 6, chunk_rows=chunk_rows)
        assert torch.equal(idx, want_i)
        torch.testing.assert_close(dists.double(), want_d, rtol=1e-5, atol=1e-5)
    assert idx[5, 0] == 3 and idx[6, 0] == 150 and dists[5, 0] == 0  # a stored row finds itself first


def test_a_loader_that_gives_the_wrong_count_leaves_no_feature_file(tmp_path: Path) -> None:
    batches = iter([(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64))])
    with pytest.raises(RuntimeError, match="expected 5"):
        write_rank_features(tmp_path, 0, batches, 5, 4)
    assert not (tmp_path / "features-rank0.f16").exists()
