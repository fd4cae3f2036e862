"""Ask a running training job to divide its learning rate now (the paper's manual schedule).

    python -m launch.lr_drop RUN_DIR [--note "val error flat since epoch 40"]

Writes a request file into the run directory; global rank 0 of the job notices it at its next
control step and every rank applies the drop at the same step boundary. The request is renamed
``lr_drop.applied-stepN`` (or ``rejected-stepN`` when no drop is left, reported in the log and in
TensorBoard); the drop is recorded in the checkpoint and in TensorBoard.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from basics.errors import UserError, run_cli
from pipeline.run_dir import CONFIG, RunDir
from pipeline.schedule import request_manual_drop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.lr_drop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="the job's --run-dir")
    parser.add_argument("--note", default="", help="why (kept with the request)")
    args = parser.parse_args(argv)

    def body() -> int:
        if not RunDir(args.run_dir).is_run():
            raise UserError(f"{args.run_dir}: not a run directory (no {CONFIG}); pass the job's --run-dir")
        path = request_manual_drop(args.run_dir, args.note)
        print(f"requested an LR drop: {path}; the job applies it at its next control step")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
