"""Where a run's hours went: goodput and badput by cause, per run and per attempt, from RUN_DIR/goodput/.

    python -m pipeline.tools.goodput RUN_DIR [RUN_DIR ...]          # several runs side by side
    python -m pipeline.tools.goodput RUN_DIR --attempts             # and each attempt of each run
    python -m pipeline.tools.goodput RUN_DIR --json                 # for scripts
    python -m pipeline.tools.goodput RUN_DIR --project 8,64,512 --node-mtbf-hours 2000
                                # its goodput at larger node counts, for a per-node MTBF (pipeline.goodput.projection)

Goodput is the training steps' time that was kept over the wall-clock from the first attempt's process
start to the last attempt's last record, the gaps between attempts included (``pipeline.goodput.account``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from basics.errors import UserError, run_cli
from pipeline.goodput import CATEGORIES, RunAccount, account, read_records
from pipeline.goodput.interval import history
from pipeline.goodput.projection import SHARES, Measured, Projection, fastest, measure, project
from pipeline.run_dir import RunDir


def records_of(run_dir: str | Path) -> list[dict]:
    path = RunDir(run_dir).goodput_ledger
    records = read_records(path)
    if not records:
        raise UserError(f"{run_dir}: no goodput ledger ({path}); it is written by training runs from this version on")
    return records


def load(run_dir: str | Path) -> RunAccount:
    return account(records_of(run_dir))


def measured_for_projection(run_dir: str | Path, save_stall_s: float | None) -> Measured:
    records = records_of(run_dir)
    past = history(records)
    measured = measure(account(records), past.saves, past.stall_s)
    if save_stall_s is not None:
        measured.save_stall_s = save_stall_s
    elif not past.saves:
        raise UserError(f"{run_dir}: its ledger records no checkpoint save; pass a save's stall: --save-stall-s S")
    return measured


def projection_table(name: str, measured: Measured, projections: list[Projection], node_mtbf_h: float) -> str:
    m = measured
    restart = ", ".join(f"{k} {_duration(v)}" for k, v in m.restart_s.items())
    source = f"mean of {m.restarts} restarts" if m.restarts else "no restart in this run: the first start-up"
    saves = f"mean of {m.saves} saves" if m.saves else "given"
    lines = [
        f"{name}: projected at {node_mtbf_h:g} h MTBF per node (the job's: that / nodes), checkpoints at Young/Daly's "
        "interval (pipeline.goodput.projection)",
        f"  measured: save stall {m.save_stall_s:.2f} s ({saves}); per restart {restart} ({source}); "
        f"steady goodput {m.steady:.1%} (without checkpoints and failures)",
        f"{'nodes':>7} {'job MTBF':>9} {'interval':>9} " + " ".join(f"{k:>14}" for k in SHARES) + f" {'goodput':>8}",
    ]
    for p in projections:
        shares = " ".join(f"{p.shares[k]:>14.1%}" for k in SHARES)
        lines.append(f"{p.nodes:>7} {_duration(p.mtbf_s):>9} {_duration(p.interval_s):>9} {shares} {p.goodput:>8.1%}")
    if len(projections) > 1:
        cause, small, large = fastest(projections)
        lines.append(
            f"grows fastest: {cause}, {small:.1%} of the wall-clock at {projections[0].nodes} nodes -> {large:.1%} "
            f"at {projections[-1].nodes}"
        )
    return "\n".join(lines)


def node_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"expected node counts like 8,64,512, got {text!r}")
    return counts


def table(runs: dict[str, RunAccount]) -> str:
    """Runs side by side: seconds and share of wall-clock per cause."""
    names = list(runs)
    width = max(12, *(len(n) for n in names))
    lines = ["cause".ljust(24) + "".join(n.rjust(width + 2) for n in names)]

    def row(label: str, cells: list[str]) -> None:
        lines.append(label.ljust(24) + "".join(c.rjust(width + 2) for c in cells))

    row("goodput", [f"{r.goodput:.1%}" for r in runs.values()])
    row("wall-clock", [_duration(r.wall) for r in runs.values()])
    row("attempts", [str(len(r.attempts)) for r in runs.values()])
    for cause in CATEGORIES:
        row(cause, [f"{_duration(r.totals[cause])} {_share(r.totals[cause], r.wall)}" for r in runs.values()])
    row("background saves", [_duration(sum(a.background_s for a in r.attempts)) for r in runs.values()])
    return "\n".join(lines)


def attempts_table(name: str, run: RunAccount) -> str:
    head = f"{name}: attempts"
    lines = [head, f"{'#':>3} {'steps':>13} {'span':>9} {'start-up':>9} {'kept':>9} {'lost':>9} {'gap':>9}  ended"]
    for i, a in enumerate(run.attempts):
        s = a.seconds
        waited = s["gap"] + s["hang_detection"]
        lines.append(
            f"{i:>3} {f'{a.first_step}-{a.last_step}':>13} {_duration(a.span):>9} {_duration(a.startup):>9} "
            f"{_duration(s['kept']):>9} {_duration(s['lost']):>9} {_duration(waited):>9}  {a.ended}"
        )
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if abs(seconds) < 120:
        return f"{seconds:.1f}s"
    if abs(seconds) < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.2f}h"


def _share(part: float, whole: float) -> str:
    return f"({part / whole:5.1%})" if whole > 0 else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.goodput", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--attempts", action="store_true", help="also each attempt of each run")
    parser.add_argument("--json", action="store_true", help="one JSON object: run directory -> its account")
    parser.add_argument(
        "--project", type=node_counts, metavar="NODES[,NODES...]", help="also each run's goodput at these node counts"
    )
    parser.add_argument("--node-mtbf-hours", type=float, metavar="H", help="with --project: one node's MTBF")
    parser.add_argument(
        "--save-stall-s", type=float, metavar="S", help="with --project: a save's stall (default: the ledger's mean)"
    )
    args = parser.parse_args(argv)

    def body() -> int:
        if args.project and not (args.node_mtbf_hours and args.node_mtbf_hours > 0):
            raise UserError("--project needs the per-node failure rate: --node-mtbf-hours H (H > 0)")
        runs = {str(d): load(d) for d in args.run_dirs}
        projected = {}
        for name in runs if args.project else ():
            measured = measured_for_projection(name, args.save_stall_s)
            projected[name] = (measured, [project(measured, n, args.node_mtbf_hours) for n in args.project])
        if args.json:
            out = {name: run.as_json() for name, run in runs.items()}
            for name, (measured, projections) in projected.items():
                out[name]["projection"] = {"measured": vars(measured), "at": [p.as_json() for p in projections]}
            json.dump(out, sys.stdout, indent=1)
            print()
            return 0
        print(table({Path(n).name or n: r for n, r in runs.items()}))
        if args.attempts:
            for name, run in runs.items():
                print()
                print(attempts_table(name, run))
        for name, (measured, projections) in projected.items():
            print()
            print(projection_table(Path(name).name or name, measured, projections, args.node_mtbf_hours))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
