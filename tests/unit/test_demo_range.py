"""The demo's measured range (issue 38): one place for the figures (configs/demo-expected.json), the doc and
README agree with it, and the run report places a demo run in it (pipeline.tools.demo_range)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from basics.files import write_json_atomic
from pipeline.config import from_dict, read_file
from pipeline.run_dir import RunDir
from pipeline.tools import demo_range
from pipeline.tools.report import final_errors
from tests.support import REPO

EXPECTED = demo_range.load_expected()
SPREAD = REPO / "docs" / "demo-spread.md"


def _demo_config(run_dir: Path, **changes: Any) -> dict[str, Any]:
    """The config.json `make demo` saves: configs/demo.toml, ``--tp 2``, this run dir; ``changes`` as dotted
    names (``train__seed=3`` is ``train.seed``)."""
    cfg = from_dict(EXPECTED["command_line"], base=from_dict(read_file(REPO / EXPECTED["config"])))
    config = cfg.to_dict()
    config["run_dir"] = str(run_dir)
    config["data"]["data"] = "demo/shards"
    for name, value in changes.items():
        *sections, key = name.split("__")
        node = config
        for section in sections:
            node = node[section]
        node[key] = value
    return config


def _fake_run(tmp_path: Path, top1: float, top5: float, **changes: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run directory holding what the report reads here: config.json and the best checkpoint's 10-crop
    result (no weights); its config and the errors the report finds."""
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    config = _demo_config(run.root, **changes)
    write_json_atomic(run.config, config)
    checkpoint = run.checkpoints / "step-00000410"
    result = {"checkpoint": str(checkpoint), "ten_crop": True, "images": 500, "top1_error": top1, "top5_error": top5}
    write_json_atomic(run.eval_result(checkpoint.name, ten_crop=True), result)
    return config, final_errors(run.root, checkpoint, evaluate_missing=False)


def test_a_demo_run_inside_the_range_is_placed_with_its_seed(tmp_path: Path) -> None:
    median = EXPECTED["top1_10crop"]["median"]
    config, errors = _fake_run(tmp_path, median / 100, EXPECTED["top5_10crop"]["worst"] / 100, train__seed=3)
    text = "\n".join(demo_range.placement(config, errors.get("10-crop"), EXPECTED))
    top1 = EXPECTED["top1_10crop"]
    assert f"Seed 3: 10-crop top-1 {median:.1f}%" in text
    assert f"within the range measured for this recipe (`{EXPECTED['config']}`), " in text
    assert f"top-1 {top1['best']:.1f}-{top1['worst']:.1f}% (median {median:.1f}%)" in text
    assert "report it" not in text and EXPECTED["measured"] in text


@pytest.mark.parametrize("top1", [EXPECTED["top1_10crop"]["worst"] + 0.2, EXPECTED["top1_10crop"]["best"] - 0.2])
def test_a_demo_run_outside_the_range_asks_for_a_report(tmp_path: Path, top1: float) -> None:
    if top1 < 0:
        pytest.skip("the best measured top-1 is 0%: nothing lies below it")
    config, errors = _fake_run(tmp_path, top1 / 100, 0.0, train__seed=7)
    text = "\n".join(demo_range.placement(config, errors["10-crop"], EXPECTED))
    assert f"Seed 7: 10-crop top-1 {top1:.1f}%" in text and "outside the range measured" in text
    assert "Please report it" in text
    assert ("worse than the worst" if top1 > EXPECTED["top1_10crop"]["worst"] else "better than the best") in text


def test_a_top5_outside_the_range_counts_too(tmp_path: Path) -> None:
    config, errors = _fake_run(tmp_path, EXPECTED["top1_10crop"]["median"] / 100, 0.5)
    assert "top-5 worse than the worst" in "\n".join(demo_range.placement(config, errors["10-crop"], EXPECTED))


def test_where_the_shards_are_and_how_many_threads_read_them_do_not_matter(tmp_path: Path) -> None:
    config = _demo_config(tmp_path, data__data="/elsewhere", data__workers=7, train__seed=11)
    assert demo_range.is_recipe(config, EXPECTED)


@pytest.mark.parametrize(
    "changes",
    [{"train__epochs": 5}, {"train__tp": 1}, {"model__fc_width": 1024}, {"schedule__milestones": [4]},
     {"optim__batch_size": 32}, {"data__mean": "image"}, {"faults__divergence__spike_sigma": 6.0}],
)  # fmt: skip
def test_another_recipe_is_not_placed(tmp_path: Path, changes: dict[str, Any]) -> None:
    config, errors = _fake_run(tmp_path, 0.5, 0.0, **changes)
    assert demo_range.placement(config, errors["10-crop"], EXPECTED) == []


def test_a_config_this_code_cannot_read_is_another_recipe(tmp_path: Path) -> None:
    config = _demo_config(tmp_path)
    config["train"]["an_option_of_long_ago"] = 1
    assert not demo_range.is_recipe(config, EXPECTED)


def test_without_a_ten_crop_result_it_says_so(tmp_path: Path) -> None:
    text = "\n".join(demo_range.placement(_demo_config(tmp_path, train__seed=2), None, EXPECTED))
    assert "Seed 2: no 10-crop evaluation to place" in text


# ------------------------------------------------------------------------------------------------
# One set of figures: the JSON, the doc's table, README


def _current_section() -> str:
    """docs/demo-spread.md above its history (the phase-1 figures, measured before issue 37's sample order)."""
    return SPREAD.read_text().split("\n## History", 1)[0]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_the_summary_is_the_seeds_best_median_and_worst() -> None:
    seeds, stopped = EXPECTED["seeds"], EXPECTED.get("stopped", {})
    assert not set(seeds) & set(stopped) and sorted({*seeds, *stopped}, key=int) == [str(s) for s in range(5)]
    for key in ("top1_10crop", "top5_10crop"):
        assert EXPECTED[key] == demo_range.summary(seeds, key), key


def test_the_docs_table_is_the_json() -> None:
    text = _current_section()
    header = next(line for line in text.splitlines() if line.startswith("| seed |"))
    columns = _cells(header)
    at = {name: columns.index(f"{name}") for name in ("top-1 10-crop", "top-5 10-crop", "top-1 centre", "top-5 centre")}
    rows = {_cells(line)[0]: _cells(line) for line in text.splitlines() if re.match(r"\| \d+ \|", line)}
    stopped = {seed for seed, row in rows.items() if row[1].startswith("stopped")}
    assert stopped == set(EXPECTED.get("stopped", {})) and sorted(set(rows) - stopped) == sorted(EXPECTED["seeds"])
    rows = {seed: row for seed, row in rows.items() if seed not in stopped}
    keys = {"top-1 10-crop": "top1_10crop", "top-5 10-crop": "top5_10crop"}
    keys |= {"top-1 centre": "top1_centre", "top-5 centre": "top5_centre"}
    for seed, row in rows.items():
        for column, key in keys.items():
            assert float(row[at[column]]) == EXPECTED["seeds"][seed][key], (seed, column)
    for label, key in (("top-1 error", "top1_10crop"), ("top-5 error", "top5_10crop")):
        [line] = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
        figures = [float(re.match(r"([\d.]+)%", cell).group(1)) for cell in _cells(line)[1:4]]
        assert figures == [EXPECTED[key][k] for k in ("best", "median", "worst")], label
    assert EXPECTED["measured"].split(",")[0] in text  # the date


def test_readme_states_the_range() -> None:
    readme = (REPO / "README.md").read_text()
    for key, words in (("top1_10crop", "top-1"), ("top5_10crop", "top-5")):
        span = EXPECTED[key]
        assert f"{words} {span['best']:.1f} / {span['median']:.1f} / {span['worst']:.1f}%" in readme, words
