"""Where the time goes in a profiled window, per rank, without a trace viewer.

    python -m pipeline.tools.profile RUN_DIR/profiles/<time> [--json]

Reads the traces a run wrote (``launch.profile`` or ``--profile.steps``; one ``rank-N.json`` per rank) and
prints, per rank, the window's wall time split into parts that add up to it:

- the timeline is the device's (CUDA kernels) on a GPU, the training thread's operators on a CPU;
- at each instant where compute runs (a kernel, or an operator of the training thread that is not a
  collective), the time belongs to the trainer phase that launched it: ``data`` (the phases data and
  loader), ``forward``, ``backward`` (with gradient-sync), ``optimizer`` (step), ``other`` (control,
  validation, checkpoint); the phases are the trainer's own marks (``pipeline.phases``),
  recorded as ``phase/<name>`` ranges;
- where only communication runs (NCCL kernels; on CPU gloo's ``gloo:<collective>`` ranges, which
  run in gloo's threads: all-reduce, all-gather, broadcast ...), the time is ``communication``: the
  part that compute does not hide;
- where neither runs, the time is ``data`` while the trainer waits for a batch, else ``idle``
  (launch and Python overhead, waiting for another rank outside a collective, a sync).

Below the parts: the communication in all (per collective), and how much of it overlaps compute.

Why not Holistic Trace Analysis (HTA, the maintained library for these traces): it analyses GPU kernels
only. On the CPU traces of gloo runs (what the tests and the demo produce) its temporal breakdown fails
(IndexError) and its communication/compute overlap is NaN (HTA 0.5.0, tried on this project's traces), it
knows nothing of the trainer's phases (data, forward, backward ...), and it would bring pandas, plotly and
psutil into the project. On GPU traces it reads the same files (``TraceAnalysis(trace_dir=...)``) for
what it adds: kernel breakdowns, idle-time causes, queue lengths.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basics.errors import UserError, run_cli

PHASE_PREFIX = "phase/"  # pipeline.profiling.PHASE_PREFIX (not imported: this tool needs no torch)
PARTS = ("data", "forward", "backward", "communication", "optimizer", "other", "idle")
CATEGORY = {
    "data": "data",
    "loader": "data",
    "forward": "forward",
    "backward": "backward",
    "gradient-sync": "backward",
    "step": "optimizer",
    "step-sync": "optimizer",  # the divergence guard's all-reduce (its wait is communication or idle anyway)
}
COMM_PREFIXES = ("gloo:", "nccl:")  # torch's record_param_comms ranges of a collective
# The host's launch calls, tied to their kernels by correlation id: the runtime API's (cudaLaunchKernel ...) and
# the driver API's (cuLaunchKernel, cuLaunchKernelEx: Triton's kernels under torch.compile, many of cuDNN's).
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
MAX_TRACE_BYTES = 2 * 2**30


@dataclass
class Summary:
    rank: int
    timeline: str  # "cuda kernels" or "cpu operators"
    wall_s: float  # the window as the profiler measured it (perf_counter), from the trace's metadata
    span_s: float  # the window's span in the trace (first to last phase mark)
    steps: tuple[int, int]
    parts: dict[str, float] = field(default_factory=dict)
    comm_s: float = 0.0
    comm_overlapped_s: float = 0.0
    collectives: dict[str, float] = field(default_factory=dict)

    @property
    def overlap(self) -> float | None:
        return self.comm_overlapped_s / self.comm_s if self.comm_s > 0 else None


def load(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_TRACE_BYTES:
            raise UserError(f"{path}: over {MAX_TRACE_BYTES >> 30} GiB; profile fewer steps")
        trace = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"{path}: not a JSON trace ({e}); was it written by this project's profiler?") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise UserError(f"{path}: no traceEvents; not a torch.profiler Chrome trace")
    return trace


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersect(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


class _Phases:
    """The training thread's phase ranges, to ask which phase held at a time."""

    def __init__(self, ranges: list[tuple[float, float, str]]):
        self.ranges = sorted(ranges)
        self.starts = [r[0] for r in self.ranges]

    def at(self, t: float) -> str | None:
        i = bisect.bisect_right(self.starts, t) - 1
        if i >= 0 and self.ranges[i][0] <= t < self.ranges[i][1]:
            return self.ranges[i][2]
        return None


def summarise(trace: dict[str, Any], rank: int) -> Summary:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e and "ts" in e]
    # The host's ranges (kineto also copies them onto the GPU streams as gpu_user_annotation: not those).
    phase_events = [
        e for e in events if str(e.get("name", "")).startswith(PHASE_PREFIX) and e.get("cat") != "gpu_user_annotation"
    ]
    if not phase_events:
        raise UserError(f"rank {rank}: the trace has no {PHASE_PREFIX}* ranges; was it written by pipeline.profiling?")
    # The training thread is the one that marks the phases (the autograd thread may mark gradient-sync too).
    counts: dict[Any, int] = defaultdict(int)
    for e in phase_events:
        counts[e["tid"]] += 1
    main_tid = max(counts, key=counts.__getitem__)
    phases = _Phases(
        [(e["ts"], e["ts"] + e["dur"], e["name"][len(PHASE_PREFIX) :]) for e in phase_events if e["tid"] == main_tid]
    )
    w0 = min(r[0] for r in phases.ranges)
    w1 = max(r[1] for r in phases.ranges)

    kernels = [e for e in events if e.get("cat") == "kernel"]
    comm: list[tuple[float, float]] = []
    compute: list[tuple[float, float, str]] = []  # (start, end, part)
    collectives: dict[str, float] = defaultdict(float)
    if kernels:
        timeline = "cuda kernels"
        launches = {
            e["args"].get("correlation"): e["ts"]
            for e in events
            if e.get("cat") in LAUNCH_CATEGORIES and isinstance(e.get("args"), dict)
        }
        for k in kernels:
            a, b = k["ts"], k["ts"] + k["dur"]
            if "nccl" in k["name"].lower():
                comm.append((a, b))
                collectives[_nccl_name(k["name"])] += k["dur"]
            else:
                launched = launches.get((k.get("args") or {}).get("correlation"), a)
                compute.append((a, b, CATEGORY.get(phases.at(launched) or "", "other")))
    else:
        timeline = "cpu operators"
        comm_ops = [
            (e["ts"], e["ts"] + e["dur"])
            for e in events
            if e["tid"] == main_tid and e.get("cat") == "cpu_op" and str(e["name"]).startswith("c10d::")
        ]
        comm_ops.sort()
        for e in events:
            if e["tid"] != main_tid or e.get("cat") != "cpu_op" or str(e["name"]).startswith("c10d::"):
                continue
            a, b = e["ts"], e["ts"] + e["dur"]
            if _inside(comm_ops, a, b) or _contains(comm_ops, a, b):
                continue  # a collective's own copies, or an op waiting in one (autograd's): communication
            compute.append((a, b, CATEGORY.get(phases.at(a) or "", "other")))
        for e in events:
            name = str(e["name"])
            if name.startswith(COMM_PREFIXES):
                comm.append((e["ts"], e["ts"] + e["dur"]))
                collectives[name] += e["dur"]

    clip = [(w0, w1)]
    comm_u = _intersect(_union(comm), clip)
    compute_u = _intersect(_union([(a, b) for a, b, _ in compute]), clip)
    parts = dict.fromkeys(PARTS, 0.0)
    # Compute time goes to the phase of its operator or kernel; where several are active (an aten op inside
    # another, kernels of two streams), to the earliest-started one: each instant counts once.
    for (a, b), part in _attribute(compute, w0, w1):
        parts[part] += b - a
    exposed = _subtract(comm_u, compute_u)
    parts["communication"] = _length(exposed)
    # The rest: waiting for data, or idle.
    busy = _union(compute_u + exposed)
    for a, b in _subtract(clip, busy):
        for seg_a, seg_b, phase in _phase_segments(phases, a, b):
            parts["data" if CATEGORY.get(phase or "") == "data" else "idle"] += seg_b - seg_a
    meta = trace.get("alexnet") or {}
    return Summary(
        rank=int(meta.get("rank", rank)),
        timeline=timeline,
        wall_s=float(meta.get("wall_s", (w1 - w0) / 1e6)),
        span_s=(w1 - w0) / 1e6,
        steps=(int(meta.get("first_step", 0)) + 1, int(meta.get("last_step", 0))),
        parts={k: v / 1e6 for k, v in parts.items()},
        comm_s=_length(comm_u) / 1e6,
        comm_overlapped_s=_length(_intersect(comm_u, compute_u)) / 1e6,
        collectives={k: v / 1e6 for k, v in sorted(collectives.items())},
    )


def _attribute(compute: list[tuple[float, float, str]], w0: float, w1: float) -> list[tuple[tuple[float, float], str]]:
    """A sweep over the intervals (clipped to the window): each piece of their union with the part of the
    earliest-started interval active there."""
    points = sorted({t for a, b, _ in compute for t in (max(a, w0), min(b, w1)) if a < w1 and b > w0})
    starts = sorted((max(a, w0), min(b, w1), part) for a, b, part in compute if a < w1 and b > w0)
    active: list[tuple[float, int, float, str]] = []  # heap of (start, order, end, part)
    out, k = [], 0
    for lo, hi in zip(points, points[1:]):
        while k < len(starts) and starts[k][0] <= lo:
            heapq.heappush(active, (starts[k][0], k, starts[k][1], starts[k][2]))
            k += 1
        while active and active[0][2] <= lo:
            heapq.heappop(active)
        if active:  # the earliest start may have ended while a later one runs: drop ended ones below the top
            out.append(((lo, hi), active[0][3]))
    return out


def _inside(sorted_ranges: list[tuple[float, float]], a: float, b: float) -> bool:
    i = bisect.bisect_right(sorted_ranges, (a, float("inf"))) - 1
    return i >= 0 and sorted_ranges[i][0] <= a and b <= sorted_ranges[i][1]


def _contains(sorted_ranges: list[tuple[float, float]], a: float, b: float) -> bool:
    i = bisect.bisect_left(sorted_ranges, (a, float("-inf")))
    return i < len(sorted_ranges) and sorted_ranges[i][1] <= b


def _subtract(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """x minus y (both sorted, disjoint)."""
    out = []
    j = 0
    for a, b in x:
        t = a
        while j < len(y) and y[j][1] <= t:
            j += 1
        k = j
        while k < len(y) and y[k][0] < b:
            if y[k][0] > t:
                out.append((t, y[k][0]))
            t = max(t, y[k][1])
            k += 1
        if t < b:
            out.append((t, b))
    return out


def _phase_segments(phases: _Phases, a: float, b: float) -> list[tuple[float, float, str | None]]:
    """[a, b) cut at the phase boundaries, each piece with its phase."""
    out = []
    t = a
    i = max(bisect.bisect_right(phases.starts, a) - 1, 0)
    while t < b:
        while i < len(phases.ranges) and phases.ranges[i][1] <= t:
            i += 1
        if i >= len(phases.ranges) or phases.ranges[i][0] >= b:
            out.append((t, b, None))
            break
        s, e, name = phases.ranges[i]
        if s > t:
            out.append((t, s, None))
            t = s
        end = min(e, b)
        out.append((t, end, name))
        t = end
    return out


def _nccl_name(kernel: str) -> str:
    low = kernel.lower()
    for name in ("allreduce", "allgather", "reducescatter", "broadcast", "sendrecv", "alltoall"):
        if name in low:
            return f"nccl:{name}"
    return "nccl:other"


def summarise_dir(folder: Path) -> list[Summary]:
    if not folder.is_dir():
        raise UserError(f"{folder}: not a directory; pass RUN_DIR/profiles/<time> (the run's log names it)")
    paths = sorted(folder.glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1]) if p.stem[5:].isdigit() else 0)
    if not paths:
        raise UserError(f"{folder}: no rank-N.json traces; pass RUN_DIR/profiles/<time> (the run's log names it)")
    return [summarise(load(p), int(p.stem.split("-")[1]) if p.stem[5:].isdigit() else 0) for p in paths]


def format_summary(s: Summary) -> str:
    total = sum(s.parts.values())
    lines = [
        f"rank {s.rank}: steps {s.steps[0]}..{s.steps[1]}, {s.wall_s:.3f} s wall ({s.timeline})",
        *(f"  {name:<14}{sec:>9.3f} s {100 * sec / total if total else 0:>6.1f}%" for name, sec in s.parts.items()),
        f"  {'sum':<14}{total:>9.3f} s (window {s.wall_s:.3f} s)",
    ]
    if s.comm_s > 0:
        per = ", ".join(f"{k} {v:.3f} s" for k, v in s.collectives.items())
        lines.append(
            f"  communication {s.comm_s:.3f} s in all ({per}); "
            f"{100 * (s.overlap or 0):.0f}% of it overlapped by compute"
        )
    else:
        lines.append("  no collectives in the window")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tools.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", type=Path, help="RUN_DIR/profiles/<time>: one rank-N.json per rank")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON (seconds)")
    args = parser.parse_args(argv)

    def body() -> int:
        summaries = summarise_dir(args.folder)
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            "rank": s.rank,
                            "timeline": s.timeline,
                            "steps": list(s.steps),
                            "wall_s": s.wall_s,
                            "span_s": s.span_s,
                            "parts": s.parts,
                            "comm_s": s.comm_s,
                            "comm_overlapped_s": s.comm_overlapped_s,
                            "overlap": s.overlap,
                            "collectives": s.collectives,
                        }
                        for s in summaries
                    ],
                    indent=1,
                )
            )
        else:
            print("\n\n".join(format_summary(s) for s in summaries))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
