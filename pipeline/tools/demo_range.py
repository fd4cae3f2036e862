"""Where a demo run's result falls in the range measured for the demo recipe (issue 38).

The range (10-crop top-1 and top-5 error over seeds 0..4, best / median / worst) lives in one file,
``configs/demo-expected.json``; docs/demo-spread.md shows the same figures (a test keeps the two equal). A run is
placed in it only when it trained the recipe the range was measured for: its saved config's model, optim,
schedule, train and divergence-guard sections (the seed aside) and its data section's input settings equal those of
``configs/demo.toml`` with what ``make demo`` sets on the command line (``--tp 2``; the JSON's ``command_line``).
A result outside the range on that recipe is worth an issue: the recipe is deterministic on one machine, and the
range says what other seeds gave.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from basics.errors import UserError

REPO = Path(__file__).resolve().parents[2]
EXPECTED = REPO / "configs" / "demo-expected.json"

SECTIONS = ("model", "optim", "schedule", "train", "data", "faults.divergence")
"""What a run learns depends on: the divergence guard too, since a spike it sees stops or rolls back the run."""
NOT_THE_RECIPE = {
    "train.seed",  # the range is over seeds
    "data.data",  # where the shards are
    "data.workers",  # how many threads decode them
    "data.verify",  # how much of them is checked at start
}
"""Fields a run may set freely and still count as the demo recipe: none changes what is learnt."""

METRICS = (("top1_10crop", "top-1", "top1_error"), ("top5_10crop", "top-5", "top5_error"))
"""(key in demo-expected.json, the words for it, the key of an evaluation result)."""


def load_expected(path: Path = EXPECTED) -> dict[str, Any]:
    return json.loads(path.read_text())


def recipe_fields(*configs: dict[str, Any]) -> dict[str, Any]:
    """The fields that make the recipe, of configs (saved or read from a file) applied in turn onto the defaults:
    a file that leaves a field out and a run that saved the default compare equal."""
    from pipeline.config import from_dict

    cfg = None
    for config in configs:
        cfg = from_dict(config, base=cfg, source="demo recipe")
    assert cfg is not None, "no config given"
    resolved = cfg.to_dict()
    fields = {}
    for section in SECTIONS:
        values = resolved
        for part in section.split("."):
            values = values[part]
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in NOT_THE_RECIPE:
                fields[name] = list(value) if isinstance(value, (list, tuple)) else value
    return fields


def is_recipe(config: dict[str, Any], expected: dict[str, Any]) -> bool:
    from pipeline.config import read_file

    # The recipe is the config file plus what `make demo` adds on the command line (``--tp 2``).
    recipe = recipe_fields(read_file(REPO / expected["config"]), expected["command_line"])
    try:
        return recipe_fields(config) == recipe
    except UserError:  # a config.json with options this code no longer knows: some other recipe
        return False


def placement(config: dict[str, Any], ten_crop: dict[str, Any] | None, expected: dict[str, Any]) -> list[str]:
    """Markdown lines: the run's seed and its 10-crop errors against the measured range, or nothing when the run
    is not the demo recipe."""
    if not is_recipe(config, expected):
        return []
    seed = config["train"].get("seed", 0)
    md = ["", "## Against the demo's measured range", ""]
    if ten_crop is None:
        return [*md, f"Seed {seed}: no 10-crop evaluation to place (pipeline.tools.evaluate with `--ten-crop true`)."]
    got = {key: round(100 * ten_crop[result_key], 1) for key, _, result_key in METRICS}
    outside = [
        f"{words} {'better than the best' if got[key] < expected[key]['best'] else 'worse than the worst'}"
        for key, words, _ in METRICS
        if not expected[key]["best"] <= got[key] <= expected[key]["worst"]
    ]
    ranges = ", ".join(
        f"{words} {expected[key]['best']:.1f}-{expected[key]['worst']:.1f}% (median {expected[key]['median']:.1f}%)"
        for key, words, _ in METRICS
    )
    line = (
        f"Seed {seed}: 10-crop top-1 {got['top1_10crop']:.1f}%, top-5 {got['top5_10crop']:.1f}% — "
        f"{'outside' if outside else 'within'} the range measured for this recipe (`{expected['config']}`), {ranges}"
    )
    if outside:
        line += f": {', '.join(outside)}. Please report it (an issue with this report, the machine and `lscpu`)."
    else:
        line += "."
    measured = f"Measured: {expected['measured']}; the figures per seed: docs/demo-spread.md."
    return [*md, line, "", measured]


def summary(seeds: dict[str, dict[str, float]], key: str) -> dict[str, float]:
    """best / median / worst of one metric over the seeds (what demo-expected.json must hold)."""
    values = [row[key] for row in seeds.values()]
    return {"best": min(values), "median": round(statistics.median(values), 1), "worst": max(values)}
