"""Pre-flight: find the bad node before it costs a training run. Runs on every rank, in seconds.

    torchrun --nproc_per_node=8 -m launch.preflight --data SHARDS           # one node
    srun ... torchrun --nnodes=N ... -m launch.preflight --data SHARDS --strict   # slurm/train.sh

Each rank measures: a matmul's throughput on its device, how fast it reads the training shards (MB/s,
the page cache dropped first where the file system allows), its device's free memory, the
data-parallel all-reduce bandwidth and its link to rank 0 (a ping-pong: the figure that names a slow
link). Global rank 0 prints one table (rank, host, figures) and one line per rank whose figure is
below ``--far-below`` x the median of the other ranks; ``--strict`` makes that exit 1. On NCCL the
transport NCCL chose is read from NCCL's own INFO output (``NCCL_DEBUG_FILE``) and a multi-node job
that fell back to TCP sockets is warned about. On CPU the same checks run over gloo.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from basics.errors import UserError, run_cli
from pipeline.faults import nodes
from pipeline.faults.reach import node_name
from pipeline.process import ProcessEnv, process_group, select_device

log = logging.getLogger("alexnet")

# (key, column heading, format): the figures every rank reports; higher is better for each.
FIGURES = (
    ("matmul", "matmul GFLOP/s", "{:.0f}"),
    ("read", "read MB/s", "{:.0f}"),
    ("memory", "free mem GiB", "{:.1f}"),
    ("link", "link to 0 MB/s", "{:.0f}"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.preflight", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the shard directory training will read (its train/ split)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="as --train.device")
    p.add_argument("--far-below", type=float, default=0.5, help="name a rank below this x the others' median")
    p.add_argument("--strict", action="store_true", help="exit 1 when a rank is named")
    p.add_argument("--read-mb", type=float, default=256, help="MB of shards each rank reads at most")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per timed check (matmul, read, all-reduce)")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if not 0 < args.far_below < 1:
        raise UserError(f"--far-below must be between 0 and 1 (got {args.far_below})")
    if not (Path(args.data) / "train").is_dir():
        raise UserError(f"--data {args.data}: no train/ split there; pass the directory preprocess wrote")
    return args


def timed(fn, seconds: float, sync) -> tuple[int, float]:
    """Calls of ``fn`` in about ``seconds`` (after one warm-up) and their wall time."""
    fn()
    sync()
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    sync()
    return calls, time.perf_counter() - start


def matmul_gflops(device: torch.device, seconds: float, sync) -> float:
    n = 4096 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    calls, wall = timed(lambda: a @ b, seconds, sync)
    return 2 * n**3 * calls / wall / 1e9


def read_mb_per_s(data: Path, rank: int, world_size: int, limit_mb: float, seconds: float) -> float:
    """This rank's share of the train shards (every world_size-th), read cold where possible, for about
    ``seconds`` or ``limit_mb`` (a share smaller than that is read again: small files time badly)."""
    shards = sorted((data / "train").glob("*.tar"))
    if not shards:
        raise UserError(f"--data {data}: no shards in {data / 'train'}")
    mine = shards[rank % len(shards) :: world_size]
    total, limit, start = 0, limit_mb * 1e6, time.perf_counter()
    for path in itertools.cycle(mine):
        with open(path, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # drop it from the page cache
            while chunk := f.read(4 << 20):
                total += len(chunk)
        if total >= limit or time.perf_counter() - start >= seconds:
            break
    return total / 1e6 / max(time.perf_counter() - start, 1e-9)


def free_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**30
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def allreduce_gb_per_s(device: torch.device, seconds: float, sync) -> float:
    """Bus bandwidth of an all-reduce over every rank (the nccl-tests convention: 2(n-1)/n x bytes / time)."""
    n = dist.get_world_size()
    buf = torch.ones((64 if device.type == "cuda" else 2) << 18, device=device)  # 64 MB / 2 MB of fp32
    dist.all_reduce(buf)  # warm-up
    sync()
    start = time.perf_counter()
    dist.all_reduce(buf)
    sync()
    # Every rank must make the same number of calls, so the count is agreed on, not timed per rank: under
    # load the ranks' clocks run their loops to different counts, and the extra call waits forever.
    one = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    dist.all_reduce(one, op=dist.ReduceOp.MAX)
    calls = max(1, min(10_000, int(seconds / max(float(one), 1e-6))))
    start = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(buf)
    sync()
    wall = time.perf_counter() - start
    return buf.nbytes * calls * 2 * (n - 1) / n / wall / 1e9


def link_mb_per_s(device: torch.device, rank: int, world_size: int, sync) -> list[float]:
    """Rank 0 ping-pongs a buffer with each other rank in turn; the MB/s of each link (rank 0's own: inf).

    One untimed exchange first: on NCCL the first send to a peer builds a 2-rank communicator (seconds),
    which is set-up, not the link. The clock stops after ``sync``: on NCCL a send/recv only enqueues, and
    without it the figure is enqueue time (and ``--far-below`` would name healthy ranks). Only a GPU shows
    the difference: ``make gpu-check`` runs this on one.
    """
    buf = torch.ones((16 if device.type == "cuda" else 2) << 18, device=device)  # 16 MB / 2 MB
    rounds, figures = 3, [float("inf")] * world_size

    def exchange(other: int) -> None:
        if rank == 0:
            dist.send(buf, other)
            dist.recv(buf, other)
        else:
            dist.recv(buf, other)
            dist.send(buf, other)

    for peer in range(1, world_size):
        if rank not in (0, peer):
            continue
        other = peer if rank == 0 else 0
        exchange(other)  # warm-up: the pair's communicator and buffers
        sync()
        start = time.perf_counter()
        for _ in range(rounds):
            exchange(other)
        sync()
        figures[peer] = 2 * rounds * buf.nbytes / 1e6 / (time.perf_counter() - start)
    box = [figures]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def nccl_transports(debug_dir: Path) -> set[str]:
    """The transports NCCL logged for this process's channels ("P2P/IPC", "NET/IB", "NET/Socket", ...)."""
    found: set[str] = set()
    for path in debug_dir.glob(f"nccl.*.{os.getpid()}.log"):
        for m in re.finditer(r" via (\S+)", path.read_text(errors="replace")):
            found.add(m.group(1).split("/")[0] + ("/" + m.group(1).split("/")[1] if "/" in m.group(1) else ""))
    return found


def socket_fallback(transports: list[str], hosts: set[str]) -> str | None:
    """The warning for a multi-node NCCL job whose network transport is TCP sockets, else None."""
    if len(hosts) < 2 or "NET/Socket" not in transports:
        return None
    return (
        f"preflight: NCCL uses TCP sockets (NET/Socket) between {len(hosts)} nodes: no InfiniBand/RoCE "
        "transport was found; check NCCL_IB_HCA / NCCL_SOCKET_IFNAME and the NCCL net plugin"
    )


def far_below(rows: list[dict], factor: float) -> list[str]:
    """One line per (rank, figure) below ``factor`` x the median of the other ranks."""
    lines = []
    for key, heading, fmt in FIGURES:
        for r, row in enumerate(rows):
            others = [o[key] for i, o in enumerate(rows) if i != r and o[key] == o[key] and o[key] != float("inf")]
            value = row[key]
            if not others or value != value or value == float("inf"):
                continue
            median = statistics.median(others)
            if value < factor * median:
                lines.append(
                    f"preflight: rank {r} (host {row['host']}) {heading} {fmt.format(value)} is below "
                    f"{factor:g} x the other ranks' median {fmt.format(median)}"
                )
    return lines


def table(rows: list[dict], allreduce: float, transports: str) -> str:
    head = ["rank", "host"] + [h for _, h, _ in FIGURES]
    body = [
        [str(r), row["host"]] + [fmt.format(row[k]) if row[k] != float("inf") else "-" for k, _, fmt in FIGURES]
        for r, row in enumerate(rows)
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *body]]
    lines.append(f"all-reduce bus bandwidth {allreduce:.2f} GB/s over {len(rows)} ranks; transport {transports}")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    from launch.train import setup_logging

    env = ProcessEnv.from_environ()
    setup_logging(env.rank)
    args = parse(argv)
    device = select_device(args.device, env.local_rank, option="--device")
    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="preflight-nccl-") as debug:  # NCCL's log, read and removed here
        return _check(args, env, device, backend, Path(debug))


def _check(args: argparse.Namespace, env: ProcessEnv, device: torch.device, backend: str, debug_dir: Path) -> int:
    if backend == "nccl":  # NCCL says which transport it chose ("via NET/IB/0"), into a file per process
        os.environ.update(
            NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET", NCCL_DEBUG_FILE=str(debug_dir / "nccl.%h.%p.log")
        )
    with process_group(env, device, timedelta(minutes=5)):

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        row = {
            "host": socket.gethostname(),
            "node": node_name(),  # as Slurm names it: what the node ledger keeps
            "matmul": matmul_gflops(device, args.seconds, sync),
            "read": read_mb_per_s(Path(args.data), env.rank, env.world_size, args.read_mb, args.seconds),
            "memory": free_memory_gib(device),
        }
        if not dist.is_initialized():
            row["link"] = float("inf")
            print(table([row], float("nan"), "none (one process)"))
            return 0
        allreduce = allreduce_gb_per_s(device, args.seconds, sync)
        row["link"] = link_mb_per_s(device, env.rank, env.world_size, sync)[env.rank]
        transports = sorted(nccl_transports(debug_dir)) if backend == "nccl" else ["gloo/TCP"]
        rows: list[dict] = [{}] * env.world_size
        dist.all_gather_object(rows, {**row, "transports": transports})
        if env.rank != 0:
            return 0
        used = sorted({t for r in rows for t in r["transports"]}) or ["?"]
        print(table(rows, allreduce, ", ".join(used)), flush=True)
        named = far_below(rows, args.far_below)
        hosts = {r["host"] for r in rows}
        if backend == "nccl" and (warning := socket_fallback(used, hosts)):
            named.append(warning)
        for line in named:
            log.warning("%s", line)
        if named and args.strict and os.environ.get(nodes.ENV):  # the job ends: later jobs avoid the node too
            named_ranks = {
                r for r in range(len(rows)) if any(line.startswith(f"preflight: rank {r} ") for line in named)
            }
            for node in sorted({rows[r]["node"] for r in named_ranks}):
                nodes.record(Path("."), node, "preflight", "a rank far below the others (PREFLIGHT=strict)")
        if not named:
            log.info("preflight: no rank far below the others (%d ranks on %d hosts)", len(rows), len(hosts))
        return 1 if named and args.strict else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
