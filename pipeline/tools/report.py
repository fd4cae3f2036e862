"""A run report to paste into a paper or an issue: ``RUN/report/report.md`` and its PNGs.

    python -m pipeline.tools.report RUN_DIR [--checkpoint best] [--no-evaluate]

What it holds: the resolved config and every field that differs from the paper's recipe (the
defaults of ``pipeline.config.RunConfig``); the LR drops (step, epoch, reason, new rate, from the
checkpoint); the divergences the run rolled back from (step, kind, loss, the checkpoint it returned to, the
batches skipped); train and val curves (``curves.png``, from the TensorBoard scalars); final centre-crop
and 10-crop top-1/top-5 errors beside the paper's Table 2 (ILSVRC-2012 val, one CNN: 40.7% / 18.2%); the seed, and
for a run of the demo recipe where its 10-crop errors fall in the range measured over seeds
(``pipeline.tools.demo_range``);
throughput, data-wait, model FLOP/s and MFU; conv1's kernels per tower with their colour fraction (figure 3); figure 4
when ``python -m pipeline.tools.analysis neighbours`` has made it; the checkpoints on disk. The errors are
read from ``RUN/eval-<checkpoint>*.json`` when they exist, else evaluated here on one device
(``--no-evaluate`` leaves them out).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from basics.errors import UserError, run_cli
from basics.files import write_bytes_atomic, write_json_atomic
from pipeline.run_dir import CONFIG, RunDir
from pipeline.tools import demo_range

PAPER_TABLE2 = {"top1_error": 0.407, "top5_error": 0.182}
"""The paper's Table 2, one CNN, ILSVRC-2012 val (its 10-view test)."""
CURVES = (("train/loss", "val/loss"), ("train/top1_error", "val/top1_error", "val/top5_error"), ("train/lr",))


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in ``RUN/tensorboard`` as {tag: [(step, value), ...]} by step; a step logged again
    after a resume keeps its latest value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, dict[int, tuple[float, float]]] = {}
    for path in sorted(RunDir(run_dir).tensorboard.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                old = found.setdefault(tag, {}).get(event.step)
                if old is None or event.wall_time >= old[0]:
                    found[tag][event.step] = (event.wall_time, event.value)
    return {tag: sorted((step, value) for step, (_, value) in steps.items()) for tag, steps in found.items()}


def save_figure(fig: Any, out: Path, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG, atomically (complete or absent)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, buffer.getvalue())


def curves_figure(scalars: dict[str, list[tuple[int, float]]], out: Path) -> list[str]:
    """Loss, errors and LR against the step, one panel each; returns the tags drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4), dpi=100)
    drawn = []
    for ax, tags in zip(axes, CURVES):
        for tag in tags:
            if scalars.get(tag):
                ax.plot(*zip(*scalars[tag]), marker="o" if tag.startswith("val/") else None, ms=3, lw=1, label=tag)
                drawn.append(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return drawn


def config_diff(config: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(option, this run's value, the paper's) for every option that differs from the defaults."""
    from pipeline.config import RunConfig, upgrade

    paper = RunConfig().to_dict()
    paper["model"]["num_classes"] = 1000  # the default 0 means "the dataset's count"; ImageNet's is 1000
    rows = []

    def walk(values: dict[str, Any], defaults: dict[str, Any], prefix: str) -> None:
        for key, value in values.items():
            default = defaults.get(key) if isinstance(defaults, dict) else None
            if isinstance(value, dict):
                walk(value, default or {}, f"{prefix}{key}.")
            elif prefix and key != "data" and _listed(value) != _listed(default):
                rows.append((f"{prefix}{key}", value, default))

    walk(upgrade(config), paper, "")
    return rows


def _listed(value: Any) -> list[Any]:
    return list(value if isinstance(value, (list, tuple)) else [value])


def final_errors(run_dir: Path, checkpoint: Path, evaluate_missing: bool) -> dict[str, dict[str, Any]]:
    """{"centre crop": result, "10-crop": result} from the eval JSONs, or evaluated here."""
    from pipeline.tools.evaluate import evaluate_members, load_member

    found: dict[str, dict[str, Any]] = {}
    for path in RunDir(run_dir).eval_results():
        result = json.loads(path.read_text())
        if result.get("checkpoint") == str(checkpoint) and "ten_crop" in result:
            found["10-crop" if result["ten_crop"] else "centre crop"] = result
    member = None
    for views, ten_crop in (("centre crop", False), ("10-crop", True)):
        if views in found or not evaluate_missing:
            continue
        member = member or load_member(checkpoint)
        [tally], _ = evaluate_members([member], ten_crop=ten_crop, batch_size=32, device=torch.device("cpu"))
        found[views] = {**tally.counts().summary(), "checkpoint": str(checkpoint), "ten_crop": ten_crop}
        write_json_atomic(RunDir(run_dir).eval_result(checkpoint.name, ten_crop=ten_crop), found[views])
    return found


def checkpoints_table(run_dir: Path) -> list[str]:
    from pipeline.checkpoint import META, health

    root = RunDir(run_dir).checkpoints
    pointers = {name: (root / name).read_text().strip() for name in ("latest", "best") if (root / name).exists()}
    lines = ["| checkpoint | epoch | step | val top-1 (best so far) | size | |", "|---|---|---|---|---|---|"]
    for path in sorted(p for p in root.glob("step-*") if (p / META).exists()):
        meta = json.loads((path / META).read_text())
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        marks = ", ".join([name for name, target in pointers.items() if target == path.name] + [health(meta)])
        best = meta.get("best_top1_error")
        lines.append(
            f"| `{path.name}` | {meta['progress']['epoch']} | {meta['progress']['step']} | "
            f"{'' if best is None else f'{100 * best:.2f}%'} | {size / 2**20:.1f} MiB | {marks} |"
        )
    return lines


def report(run_dir: Path, which: str = "best", evaluate_missing: bool = True) -> Path:
    """Write ``RUN/report/report.md`` (and its figures) for checkpoint ``which``; its path."""
    from pipeline.checkpoint import resolve as resolve_checkpoint
    from pipeline.tools import analysis
    from pipeline.tools.evaluate import load_member

    run_dir = Path(run_dir)
    layout = RunDir(run_dir)
    if not layout.is_run():
        raise UserError(f"{run_dir}: no {CONFIG}; is this a run directory?")
    config = json.loads(layout.config.read_text())
    checkpoint = resolve_checkpoint(run_dir, which)
    meta = json.loads((checkpoint / "meta.json").read_text())
    out = layout.report
    scalars = read_scalars(run_dir)
    drawn = curves_figure(scalars, out / "curves.png") if scalars else []
    filters = analysis.filters(load_member(checkpoint))
    errors = final_errors(run_dir, checkpoint, evaluate_missing)
    md = [
        f"# Run report: `{run_dir.name}`",
        "",
        f"Checkpoint `{checkpoint.name}` (epoch {meta['progress']['epoch']}, step {meta['progress']['step']}); "
        f"layout {meta['layout']}; data `{config['data']['data']}`; seed {config['train'].get('seed', 0)}.",
        "",
        *errors_section(errors),
        *demo_range.placement(config, errors.get("10-crop"), demo_range.load_expected()),
        *recipe_section(config),
        *drops_section(meta, config),
        *divergence_section(meta, config),
        *curves_section(drawn),
        *speed_section(scalars),
        *goodput_section(run_dir),
        *filters_section(filters),
        *neighbours_section(run_dir, checkpoint, which),
        *checkpoints_section(run_dir),
        *config_section(config),
    ]
    path = out / "report.md"
    write_bytes_atomic(path, "\n".join(md).encode())
    return path


def errors_section(errors: dict[str, dict[str, Any]]) -> list[str]:
    md = ["## Errors", "", "| test | images | top-1 error | top-5 error |", "|---|---|---|---|"]
    for views, result in errors.items():
        md.append(
            f"| {views} | {result['images']} | {100 * result['top1_error']:.2f}% | {100 * result['top5_error']:.2f}% |"
        )
    md.append(
        f"| the paper, Table 2 (one CNN, ILSVRC-2012 val) | 50000 | {100 * PAPER_TABLE2['top1_error']:.1f}% | "
        f"{100 * PAPER_TABLE2['top5_error']:.1f}% |"
    )
    return md


def recipe_section(config: dict[str, Any]) -> list[str]:
    md = ["", "## Differences from the paper's recipe", ""]
    diff = config_diff(config)
    if not diff:
        return [*md, "None: the paper's recipe."]
    return [*md, "| option | this run | the paper |", "|---|---|---|", *(f"| `{k}` | {v} | {d} |" for k, v, d in diff)]


def drops_section(meta: dict[str, Any], config: dict[str, Any]) -> list[str]:
    md = ["", "## Learning-rate drops", ""]
    drops = meta.get("schedule", {}).get("drops", [])
    if not drops:
        return [*md, f"None (policy `{config['schedule']['policy']}`)."]
    rows = [f"| {d['step']} | {d['epoch']} | {d['reason']} | {d['lr']:.2e} |" for d in drops]
    return [*md, "| step | epoch | reason | new rate |", "|---|---|---|---|", *rows]


def divergence_section(meta: dict[str, Any], config: dict[str, Any]) -> list[str]:
    from pipeline.config import upgrade

    md = ["", "## Divergence", ""]
    rollbacks = meta.get("divergence", {}).get("rollbacks", [])
    md += _skipped_batches(meta.get("divergence", {}).get("skipped", []))
    if not rollbacks:
        action = upgrade(config).get("faults", {}).get("divergence", {}).get("action", "stop")
        return [*md, f"No rollback (--faults.divergence.action {action})."]
    rows = [
        f"| {r['diverged_step']} | {r['kind']} | {_g(r['loss'])} | {_g(r['grad_norm'])} | `{r['checkpoint']}` | "
        f"{r['skipped_steps'][0]}..{r['skipped_steps'][1]} | {r['lr_scale']:g} |"
        for r in rollbacks
    ]
    header = "| diverged at step | kind | loss | grad norm | rolled back to | batches skipped (steps) | lr scale |"
    return [*md, header, "|---|---|---|---|---|---|---|", *rows]


def _skipped_batches(skipped: list[dict[str, Any]]) -> list[str]:
    """The batches that diverged again when re-run in place (their keys: RUN_DIR/bad_batches.jsonl)."""
    if not skipped:
        return []
    where = ", ".join(f"step {s['step']} (epoch {s['epoch']}, batch {s['batch']})" for s in skipped)
    return [
        f"Skipped {len(skipped)} batch(es) that diverged again when re-run in place: {where}; their sample "
        "keys are in bad_batches.jsonl.",
        "",
    ]


def _g(value: Any) -> str:
    """A figure to 4 significant digits; "nan"/"inf" (stored as text in meta.json) as they are."""
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def curves_section(drawn: list[str]) -> list[str]:
    md = ["", "## Curves", ""]
    return (
        [*md, "![curves](curves.png)", "", f"Tags: {', '.join(drawn)}."] if drawn else [*md, "No TensorBoard scalars."]
    )


def speed_section(scalars: dict[str, list[tuple[int, float]]]) -> list[str]:
    md = ["", "## Speed", ""]
    for tag, label, scale, unit in (
        ("perf/images_per_s", "throughput", 1, " images/s"),
        ("perf/data_wait_fraction", "time waiting for data", 100, "%"),
        ("perf/step_time_s", "step time", 1000, " ms"),
        ("perf/model_tflops_per_device", "model FLOP/s per device (3 x forward, pipeline/perf.py)", 1, " TFLOP/s"),
        ("perf/mfu", "MFU (of the device's peak)", 100, "%"),
    ):
        # The first log includes start-up: left out when there are others.
        values = [v for _, v in scalars.get(tag, [])[1:]] or [v for _, v in scalars.get(tag, [])]
        if values:
            md.append(f"- {label}: median {scale * statistics.median(values):.3g}{unit} over {len(values)} logs")
    return md


def goodput_section(run_dir: Path) -> list[str]:
    """Where the run's wall-clock went (pipeline.goodput), when it has a ledger."""
    from pipeline.goodput import CATEGORIES, account, read_records

    records = read_records(RunDir(run_dir).goodput_ledger)
    if not records:
        return []
    run = account(records)
    md = [
        "",
        "## Goodput",
        "",
        f"Kept training {run.goodput:.1%} of {run.wall:.0f} s over {len(run.attempts)} attempts",
    ]
    md += ["(`python -m pipeline.tools.goodput` for each attempt).", "", "| cause | seconds | share |", "|---|---|---|"]
    for cause in CATEGORIES:
        value = run.totals[cause]
        if value:
            md.append(
                f"| {cause} | {value:.1f} | {value / run.wall:.1%} |"
                if run.wall > 0
                else f"| {cause} | {value:.1f} | |"
            )
    return md


def filters_section(filters: dict[str, Any]) -> list[str]:
    return [
        "",
        "## conv1 kernels (the paper's figure 3)",
        "",
        f"![conv1 kernels](../figures/{Path(filters['png']).name})",
        "",
        "Colour fraction per tower (0 = grey kernels, about 0.67 = noise): "
        + ", ".join(f"tower {t}: {f:.3f}" for t, f in enumerate(filters["colour_fraction"])),
        "",
    ]


def neighbours_section(run_dir: Path, checkpoint: Path, which: str) -> list[str]:
    neighbours = RunDir(run_dir).neighbours_figure(checkpoint.name)
    md = ["## Nearest training images in fc7 space (figure 4)", ""]
    if neighbours.exists():
        return [*md, f"![neighbours](../figures/{neighbours.name})"]
    return [
        *md,
        f"Not made yet: `python -m pipeline.tools.analysis neighbours --run-dir {run_dir} --checkpoint {which}`.",
    ]


def checkpoints_section(run_dir: Path) -> list[str]:
    return ["", "## Checkpoints", "", *checkpoints_table(run_dir)]


def config_section(config: dict[str, Any]) -> list[str]:
    return ["", "## Resolved config", "", "```json", json.dumps(config, indent=1), "```", ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tools.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--checkpoint", default="best", help="best, latest, or a checkpoint directory")
    parser.add_argument("--no-evaluate", action="store_true", help="do not evaluate missing errors here")
    args = parser.parse_args(argv)

    def body() -> int:
        print(f"written: {report(args.run_dir, args.checkpoint, not args.no_evaluate)}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
