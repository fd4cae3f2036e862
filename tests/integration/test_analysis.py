"""Figures 3 and 4: the colour measure, the PNGs (non-empty, of the stated size), the on-disk feature
store and the chunked nearest-neighbour search against a brute-force reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.tools.analysis import (
    main,
    read_image,
)
from tests.support.analysis import assert_png


def run_analysis(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command line in this process: (exit status, stdout, stderr)."""
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_figures_of_a_trained_run(
    trained_run: Path,
    demo_shards: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, stdout, stderr = run_analysis(capsys, "filters", "--run-dir", str(trained_run))
    assert status == 0, stderr
    best = (trained_run / "checkpoints" / "best").read_text().strip()
    fig3 = json.loads((trained_run / "figures" / f"conv1-filters-{best}.json").read_text())
    assert_png(Path(fig3["png"]), fig3["size"])
    assert len(fig3["colour_fraction"]) == 2 and "colour fraction per tower" in stdout

    status, _, stderr = run_analysis(
        capsys,
        "neighbours",
        "--run-dir",
        str(trained_run),
        "--images",
        "3",
        "--k",
        "6",
        "--chunk-rows",
        "16",
        "--batch-size",
        "16",
    )
    assert status == 0, stderr
    fig4 = json.loads((trained_run / "figures" / f"neighbours-{best}.json").read_text())
    assert_png(Path(fig4["png"]), fig4["size"])
    assert len(fig4["queries"]) == 3
    for query in fig4["queries"]:
        assert len(query["top5"]) == 4  # 4 classes
        assert sum(p["probability"] for p in query["top5"]) == pytest.approx(1.0, abs=1e-4)
        assert len(query["neighbours"]) == 6
        assert [n["distance"] for n in query["neighbours"]] == sorted(n["distance"] for n in query["neighbours"])
        for n in query["neighbours"]:  # the stored label is the shard's label of that train image
            assert read_image(demo_shards, "train", n["index"])[1] == n["label"]
    features = Path(fig4["features"])
    stamp = (features / "meta.json").stat().st_mtime_ns
    status, _, stderr = run_analysis(capsys, "neighbours", "--run-dir", str(trained_run), "--images", "2")
    assert status == 0, stderr
    assert (features / "meta.json").stat().st_mtime_ns == stamp  # the features were reused
