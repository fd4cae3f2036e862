"""The node ledger: nodes that failed a job, kept beside the run directories so that later jobs avoid them
(Meta's cluster study calls them "lemon nodes": they fail job after job).

A node is appended (one JSON line: node, source, detail, time, job) when a hang names it unreachable
(RUN_DIR/hangs/*/hang.json, recorded by slurm/train.sh after the job step), when the pre-flight names a rank
on it (launch.preflight), or when a divergence that did not repeat when re-run in place names it
(pipeline.faults.divergence). The ledger is ``RUN_DIR/../.alexnet-nodes.jsonl`` (``RunDir.node_ledger``:
every run directory under one parent shares it), or ``$ALEXNET_NODE_LEDGER`` when set. slurm/train.sh reads it
before each job step and excludes the nodes in it, saying so in the job log:

    python -m pipeline.faults.nodes exclude RUN_DIR        # the ledger's nodes, comma-separated
    python -m pipeline.faults.nodes record-hangs RUN_DIR   # the nodes hangs named unreachable, into the ledger

A node back in service is taken off by deleting its lines (the file is plain JSON lines).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from basics.files import append_json_line, read_json_lines
from pipeline.run_dir import RunDir

ENV = "ALEXNET_NODE_LEDGER"


def ledger(run_dir: str | Path | RunDir) -> Path:
    layout = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    return Path(os.environ[ENV]) if os.environ.get(ENV) else layout.node_ledger


def record(run_dir: str | Path | RunDir, node: str, source: str, detail: str = "") -> None:
    """Append ``node`` (a Slurm node name, else a host name) with what named it."""
    entry = {"node": node, "source": source, "detail": detail, "time": time.time()}
    append_json_line(ledger(run_dir), {**entry, "job": os.environ.get("SLURM_JOB_ID", "")})


def failed_nodes(run_dir: str | Path | RunDir) -> list[str]:
    """Every node in the ledger, in the order they first failed."""
    names = [r.get("node") for r in read_json_lines(ledger(run_dir)) if isinstance(r, dict)]
    return list(dict.fromkeys(n for n in names if isinstance(n, str) and n))


def record_hangs(run_dir: str | Path) -> list[str]:
    """The nodes RUN_DIR's hangs named unreachable (hangs/*/hang.json) that the ledger lacks, appended."""
    known, added = set(failed_nodes(run_dir)), []
    for report in sorted(RunDir(run_dir).hangs.glob("*/hang.json")):
        try:
            unreachable = json.loads(report.read_text()).get("unreachable") or []
        except (OSError, ValueError):
            continue
        for entry in unreachable:
            node = entry.get("node") if isinstance(entry, dict) else None
            if node and node not in known:
                record(run_dir, node, "hang", f"unreachable from the other nodes ({report.parent.name})")
                known.add(node)
                added.append(node)
    return added


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline.faults.nodes", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("exclude", help="print the ledger's nodes, comma-separated").add_argument("run_dir")
    sub.add_parser("record-hangs", help="append the nodes RUN_DIR's hangs named unreachable").add_argument("run_dir")
    args = p.parse_args(argv)
    found = failed_nodes(args.run_dir) if args.command == "exclude" else record_hangs(args.run_dir)
    print(",".join(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
