"""Ablations: short runs from one base config, each with one of the paper's choices switched off, as a
markdown table and a PNG of the curves.

    python -m pipeline.tools.ablate --out runs/ablate [--config demo|paper|FILE|defaults] [--data demo/shards] \\
        [--switches tanh,no-lrn,...] [--seeds 0,1] [-- TRAIN_ARGS ...]
    python -m pipeline.tools.ablate --out runs/ablate --submit [--sbatch-args "-p gpu"] ...   # one Slurm job a run
    python -m pipeline.tools.ablate --out runs/ablate --collect          # the table of finished runs only

Every run is an ordinary ``launch.train`` run in ``OUT/<switch>-seed<s>`` (``base`` = the config as
given), so it resumes where it stopped when the runner is started again and logs to TensorBoard;
``TRAIN_ARGS`` after ``--`` go to every run (e.g. ``--epochs 3``). Each switch is one config field
(``SWITCHES``). Runs of several seeds give each row a mean and a spread (the sample standard
deviation over seeds); a difference from the base smaller than the larger of the two spreads is
reported as "within seed spread", and a single seed says that it cannot tell. The table
(``OUT/ablation.md``, also printed) and the curves (``OUT/ablation.png``) come from the runs'
TensorBoard scalars; ``--submit`` queues the runs with ``sbatch slurm/train.sh`` and returns, and
``--collect`` writes the table once they are done.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from basics.errors import UserError, run_cli
from basics.files import write_bytes_atomic, write_json_atomic
from pipeline.run_dir import RunDir
from pipeline.tools.report import read_scalars, save_figure

REPO = Path(__file__).resolve().parents[2]
RESULT = "ablation-result.json"


@dataclass(frozen=True)
class Switch:
    what: str
    """the paper's choice that is switched off"""
    args: tuple[str, ...]
    """the launch.train options that switch it off"""
    claim: str
    """what the paper reports for it"""
    measure: str = "val"
    """val: the paper's claim is on final val error; speed: on the steps to reach the target train error"""


SWITCHES = {
    "tanh": Switch(
        "ReLU -> tanh", ("--model.activation", "tanh"), "ReLU reaches 25% train error ~6x sooner (fig. 1)", "speed"
    ),
    "no-lrn": Switch("LRN off", ("--model.lrn", "false"), "LRN: -1.4% top-1, -1.2% top-5"),
    "no-overlap": Switch("pooling 3/2 -> 2/2", ("--model.overlap-pool", "false"), "overlap: -0.4% top-1, -0.3% top-5"),
    "no-lighting": Switch("PCA lighting off", ("--data.lighting-std", "0"), "lighting: > -1% top-1"),
    "no-dropout": Switch("dropout off", ("--model.dropout", "0"), "without dropout: substantial overfitting"),
    "one-column": Switch(
        "2 towers -> 1 full-width column",
        ("--model.towers", "1", "--tp", "1"),
        "two GPUs: -1.7% top-1, -1.2% top-5 (vs. a half-width one-GPU net)",
    ),
}


def run_name(switch: str, seed: int) -> str:
    return f"{switch}-seed{seed}"


def train_argv(args: argparse.Namespace, switch: str, seed: int) -> list[str]:
    """``launch.train`` options of one run: base config, data, shared TRAIN_ARGS, then the switch."""
    argv = ["--run-dir", str(args.out / run_name(switch, seed)), "--seed", str(seed)]
    if args.config:
        argv += ["--config", str(args.config)]
    if args.data:
        argv += ["--data", str(args.data)]
    argv += ["--tp", str(args.tp), *args.train_args]
    return argv + (list(SWITCHES[switch].args) if switch != "base" else [])


def launch_local(args: argparse.Namespace, argv: list[str], log: Path) -> None:
    if args.nproc == 1:
        cmd = [sys.executable, "-m", "launch.train", *argv]
    else:
        cmd = [
            str(Path(sys.executable).with_name("torchrun")),
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
            "launch.train",
            *argv,
        ]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        status = subprocess.run(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        ).returncode
    if status != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
        raise UserError(f"run {log.parent.name} failed (exit {status}): {tail[0][:300]}; full log {log}")


def submit(args: argparse.Namespace, argv: list[str], name: str) -> str:
    cmd = [
        "sbatch",
        "--parsable",
        f"--job-name=ablate-{name}",
        *shlex.split(args.sbatch_args),
        str(REPO / "slurm" / "train.sh"),
        *argv,
    ]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    except FileNotFoundError:
        raise UserError("--submit needs Slurm's sbatch on PATH") from None
    if proc.returncode != 0:
        raise UserError(f"sbatch failed for {name}: {proc.stderr.strip()[:300]}")
    return proc.stdout.strip().split(";")[0]


# ---------------------------------------------------------------------------- summaries


def finished(run_dir: Path) -> bool:
    """Whether the run's latest checkpoint has reached its configured epochs (or --max-steps)."""
    from pipeline.checkpoint import resolve as resolve_checkpoint
    from pipeline.config import upgrade

    try:
        config = json.loads(RunDir(run_dir).config.read_text())
        meta = json.loads((resolve_checkpoint(run_dir, "latest") / "meta.json").read_text())
    except (OSError, ValueError, UserError):
        return False
    progress, train = meta["progress"], upgrade(config)["train"]
    return progress["epoch"] >= train["epochs"] or 0 < train["max_steps"] <= progress["step"]


def summarise_run(run_dir: Path, target: float) -> dict[str, Any] | None:
    """Final numbers and curves of a finished run from its TensorBoard scalars (None if it has none)."""
    scalars = read_scalars(run_dir)
    train, val = scalars.get("train/top1_error", []), scalars.get("val/top1_error", [])
    if not train or not val:
        return None
    tail = [v for _, v in train[-max(1, len(train) // 5) :]]
    return {
        "train_top1_error": statistics.fmean(tail),
        "val_top1_error": val[-1][1],
        "val_top5_error": scalars.get("val/top5_error", [(0, math.nan)])[-1][1],
        "steps_to_target": steps_to(train, target),
        "train_curve": train,
        "val_curve": val,
    }


def steps_to(curve: list[tuple[int, float]], target: float, window: int = 3) -> int | None:
    """The first step at which the mean of the last ``window`` logged values is at or below ``target``."""
    for i in range(len(curve)):
        recent = [v for _, v in curve[max(0, i - window + 1) : i + 1]]
        if statistics.fmean(recent) <= target:
            return curve[i][0]
    return None


def mean_spread(values: list[float]) -> tuple[float, float | None]:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    if not clean:
        return math.nan, None
    return statistics.fmean(clean), statistics.stdev(clean) if len(clean) > 1 else None


def verdict(delta: float, spread: float | None, seeds: int) -> str:
    """Whether switching the paper's choice off made things worse (delta > 0), beyond the seed spread."""
    if math.isnan(delta):
        return "not reached"
    if seeds < 2 or spread is None:
        return ("worse" if delta > 0 else "not worse") + " (1 seed: spread unknown)"
    if abs(delta) <= spread:
        return "within seed spread: add seeds"
    return "reproduced (worse without it)" if delta > 0 else "not reproduced (better without it)"


def table(results: dict[str, list[dict[str, Any]]], seeds: list[int], target: float) -> str:
    def pct(m: float, s: float | None) -> str:
        return f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if s is not None else "")

    base_val, base_val_sd = mean_spread([r["val_top1_error"] for r in results["base"]])
    base_steps, base_steps_sd = mean_spread([r["steps_to_target"] for r in results["base"]])
    lines = [
        f"Seeds {', '.join(map(str, seeds))}; mean ± sample std over seeds; errors in %. "
        f"'steps to {100 * target:.0f}%': first logged step where the train top-1 error "
        f"(mean of 3 logged batches) is at most {100 * target:.0f}%.",
        "",
        "| run | switched off | paper's claim | train top-1 | val top-1 | Δ val top-1 | val top-5 | "
        f"steps to {100 * target:.0f}% | direction |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        val, val_sd = mean_spread([r["val_top1_error"] for r in runs])
        train, train_sd = mean_spread([r["train_top1_error"] for r in runs])
        top5, top5_sd = mean_spread([r["val_top5_error"] for r in runs])
        steps, steps_sd = mean_spread([r["steps_to_target"] for r in runs])
        reached = sum(r["steps_to_target"] is not None for r in runs)
        steps_text = "not reached" if not reached else f"{steps:.0f}" + (f" ± {steps_sd:.0f}" if steps_sd else "")
        if reached and reached < len(runs):
            steps_text += f" ({reached}/{len(runs)} runs)"
        if name == "base":
            lines.append(
                f"| base | (paper's choices) | | {pct(train, train_sd)} | {pct(val, val_sd)} | | "
                f"{pct(top5, top5_sd)} | {steps_text} | |"
            )
            continue
        switch = SWITCHES[name]
        if switch.measure == "speed":
            slower = steps - base_steps if reached else math.nan
            spreads = [s for s in (steps_sd, base_steps_sd) if s is not None]
            direction = verdict(slower, max(spreads) if len(spreads) == 2 else None, len(runs))
            direction = direction.replace("worse", "slower")
        else:
            spreads = [s for s in (val_sd, base_val_sd) if s is not None]
            direction = verdict(val - base_val, max(spreads) if len(spreads) == 2 else None, len(runs))
        lines.append(
            f"| {name} | {switch.what} | {switch.claim} | {pct(train, train_sd)} | {pct(val, val_sd)} | "
            f"{100 * (val - base_val):+.1f} | {pct(top5, top5_sd)} | {steps_text} | {direction} |"
        )
    return "\n".join(lines) + "\n"


def curves_figure(results: dict[str, list[dict[str, Any]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    for i, (name, runs) in enumerate(results.items()):
        colour = f"C{i}"
        for j, run in enumerate(runs):
            label = name if j == 0 else None
            train_ax.plot(*zip(*run["train_curve"]), color=colour, alpha=0.8, lw=1, label=label)
            val_ax.plot(*zip(*run["val_curve"]), color=colour, marker="o", ms=3, lw=1, label=label)
    for ax, title in ((train_ax, "train top-1 error (batches)"), (val_ax, "val top-1 error")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    val_ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)


# ---------------------------------------------------------------------------- the command line


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tools.ablate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="directory of the runs, the table and the curves")
    parser.add_argument(
        "--config",
        default="demo",
        help="base config of every run: a file, or a name of configs/ (demo = configs/demo.toml, the default; "
        "paper = configs/paper.toml, the paper's recipe); 'defaults': no file, the built-in defaults",
    )
    parser.add_argument("--data", default="demo/shards", help="dataset directory (default: demo/shards)")
    parser.add_argument(
        "--switches", default=",".join(SWITCHES), help=f"comma-separated, from {', '.join(SWITCHES)} (default: all)"
    )
    parser.add_argument("--seeds", default="0,1", help="comma-separated run seeds (default: 0,1)")
    parser.add_argument("--tp", type=int, default=1, choices=(1, 2), help="layout of every run (default: 1)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per local run (torchrun when > 1)")
    parser.add_argument(
        "--target-error",
        type=float,
        default=0.25,
        help="train top-1 error whose first crossing the table reports (the paper's fig. 1: 0.25)",
    )
    parser.add_argument("--submit", action="store_true", help="queue every run with sbatch slurm/train.sh and return")
    parser.add_argument("--sbatch-args", default="", help="extra sbatch options for --submit, one string")
    parser.add_argument("--collect", action="store_true", help="train nothing: the table of the finished runs")
    args = parser.parse_args(own)
    args.train_args = train_args
    args.out = args.out.resolve()  # the runs start in the repository, not in the caller's directory
    args.data = str(Path(args.data).resolve()) if args.data else None
    return run_cli(lambda: ablate(args))


def base_config(given: str) -> Path | None:
    """``--config``: a file; a bare name of ``configs/`` (``paper``: configs/paper.toml); ``defaults``: none."""
    if given in ("defaults", ""):
        return None
    named = REPO / "configs" / f"{given}.toml"
    if "/" not in given and not Path(given).suffix and named.is_file():
        return named
    path = Path(given).resolve()
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in (REPO / "configs").glob("*.toml")))
        raise UserError(f"--config {given}: no such file; give a config file, one of {names}, or defaults")
    return path


def ablate(args: argparse.Namespace) -> int:
    args.config = base_config(args.config) if isinstance(args.config, str) else args.config
    switches = ["base", *[s.strip() for s in args.switches.split(",") if s.strip()]]
    unknown = [s for s in switches[1:] if s not in SWITCHES]
    if unknown:
        raise UserError(f"--switches: unknown {', '.join(unknown)}; choose from {', '.join(SWITCHES)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers (got {args.seeds!r})") from None
    if not seeds:
        raise UserError("--seeds: give at least one seed")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for switch in switches:
        for seed in seeds:
            name = run_name(switch, seed)
            result_path = args.out / name / RESULT
            if not result_path.exists() and finished(args.out / name):  # e.g. a submitted job that is done
                summary = summarise_run(args.out / name, args.target_error)
                if summary is not None:
                    write_json_atomic(result_path, summary)
            if not result_path.exists() and not args.collect:
                if args.submit:
                    print(f"{name}: job {submit(args, train_argv(args, switch, seed), name)}")
                    continue
                print(f"{name}: training ...", flush=True)
                launch_local(args, train_argv(args, switch, seed), args.out / name / "train.log")
                summary = summarise_run(args.out / name, args.target_error)
                if summary is None:
                    raise UserError(
                        f"{args.out / name}: finished without validation scalars; "
                        "give enough --epochs for one validation"
                    )
                write_json_atomic(result_path, summary)
            if result_path.exists():
                results.setdefault(switch, []).append(json.loads(result_path.read_text()))
            else:
                print(f"{name}: not finished; left out of the table")
    if args.submit and not args.collect:
        print(
            f"submitted; when the jobs are done: python -m pipeline.tools.ablate --out {args.out} --collect "
            f"--switches {args.switches} --seeds {args.seeds}"
        )
        return 0
    if "base" not in results:
        raise UserError(f"{args.out}: no finished base run to compare with")
    text = "# Ablations\n\n" + table(results, seeds, args.target_error)
    write_bytes_atomic(args.out / "ablation.md", text.encode())
    curves_figure(results, args.out / "ablation.png")
    print(text)
    print(f"written: {args.out / 'ablation.md'}, {args.out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
