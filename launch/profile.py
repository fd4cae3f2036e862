"""Ask a running training job to record its next steps with torch.profiler, without restarting it.

    python -m launch.profile RUN_DIR [--steps 20] [--shapes] [--stacks]

Writes a request file into the run directory (as ``launch.lr_drop`` does); global rank 0 of the job
notices it at its next control step, and every rank records the same ``--steps`` steps from there and
writes its trace to ``RUN_DIR/profiles/<time>/rank-N.json`` (Perfetto, https://ui.perfetto.dev, and
TensorBoard's trace viewer open it). The job logs one line saying where; the request file is renamed
``profile.started-stepN`` (or ``rejected-stepN`` while another profile is under way). Then:

    python -m pipeline.tools.profile RUN_DIR/profiles/<time>     # where the time goes, per rank

A run directory no running job holds (no live ``writer.lease``) is an error: nobody would answer.
To profile from the start, give the run ``--profile.steps A:B``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from basics.errors import UserError, run_cli
from pipeline.faults.lease import live_writer
from pipeline.profiling import MAX_STEPS, request_profile
from pipeline.run_dir import CONFIG, LEASE, RunDir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="the running job's --run-dir")
    parser.add_argument("--steps", type=int, default=20, help=f"steps to record, 1..{MAX_STEPS} (default 20)")
    parser.add_argument("--shapes", action="store_true", help="record operator input shapes (larger traces)")
    parser.add_argument("--stacks", action="store_true", help="record Python stacks (larger traces, slower window)")
    args = parser.parse_args(argv)

    def body() -> int:
        if not 1 <= args.steps <= MAX_STEPS:
            raise UserError(f"--steps must be between 1 and {MAX_STEPS} (got {args.steps})")
        if not RunDir(args.run_dir).is_run():
            raise UserError(f"{args.run_dir}: not a run directory (no {CONFIG}); pass the job's --run-dir")
        if live_writer(args.run_dir) is None:
            raise UserError(
                f"{args.run_dir}: no running job holds this run directory (no live {LEASE}), so nobody would "
                "record a profile; profile while it trains, or start it with --profile.steps A:B"
            )
        path = request_profile(args.run_dir, args.steps, shapes=args.shapes, stacks=args.stacks)
        print(
            f"requested a profile of {args.steps} steps: {RunDir(args.run_dir).profiles}/<time>/ once the job's next "
            f"control step has seen {path.name}; the job logs where"
        )
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
