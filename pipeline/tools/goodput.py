"""Where a run's hours went: goodput and badput by cause, per run and per attempt, from RUN_DIR/goodput/.

    python -m pipeline.tools.goodput RUN_DIR [RUN_DIR ...]          # several runs side by side
    python -m pipeline.tools.goodput RUN_DIR --attempts             # and each attempt of each run
    python -m pipeline.tools.goodput RUN_DIR --json                 # for scripts

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
from pipeline.run_dir import RunDir


def load(run_dir: str | Path) -> RunAccount:
    path = RunDir(run_dir).goodput_ledger
    records = read_records(path)
    if not records:
        raise UserError(f"{run_dir}: no goodput ledger ({path}); it is written by training runs from this version on")
    return account(records)


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
    args = parser.parse_args(argv)

    def body() -> int:
        runs = {str(d): load(d) for d in args.run_dirs}
        if args.json:
            json.dump({name: run.as_json() for name, run in runs.items()}, sys.stdout, indent=1)
            print()
            return 0
        print(table({Path(n).name or n: r for n, r in runs.items()}))
        if args.attempts:
            for name, run in runs.items():
                print()
                print(attempts_table(name, run))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
