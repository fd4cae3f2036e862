"""Fixed costs at ImageNet's sample count against a small set: what grows with the dataset (issue 21).

    python -m preprocess replicate --src SMALL --out BIG --samples 1281167     # hard links, no new bytes
    python -m pipeline.bench.scale --small SMALL --big BIG [--baseline-tree DIR] [--out results.json]

Every figure comes from a fresh child process (so memory and start-up are the process's own), for
each code tree (``--baseline-tree``, e.g. a ``git worktree`` of the commit before, imported through
``PYTHONPATH``; and this checkout) and each dataset:

Each dataset is first read once (a loader built and dropped), as by an earlier run: caches that
live with the dataset are warm, as they are for every run but the first.

- **trainer**: ``launch.train``, one process, the narrow model, ``--data.verify size``, batch 64:
  seconds from spawning to the first step's log line; then the same run resumed from the checkpoint
  it saved (checkpoint load, rebuild, first step); and the process's peak RSS (``wait4``).
- **data**: the loaders alone (one process, dp 1, batch 64, ``--data.verify size``): the first
  batch of epoch 0; the first batch of epoch 1 built after epoch 0's (where the code prepares an
  epoch ahead, after that preparation has finished, as it has when an epoch of training is over);
  epoch 0 resumed at 10% and at 90% of its steps; validation's first batch; peak RSS.
- **hashing** (``--data.verify full``, dp 4, rank 0's shards, the page cache warm): a new run's
  ``train_loader`` with nothing verified yet, then a second new run (the baseline remembered
  hashes per run dir; a new run dir starts over), then the two ranks of a tensor-parallel pair
  starting together on a fresh cache.

The rows take turns per dataset; wall-clock seconds on a shared machine are noisy, so each is the
best of ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BATCH = 64
NARROW = ["--model.widths", "16,32,48,48,32", "--model.fc-width", "64"]
HERE = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- children (run in the tree measured)


def child_data(data: str) -> dict[str, Any]:
    import resource

    import pipeline.data as D

    cfg = D.DataConfig(data=data, loader="dali", mean="channel", verify="size", workers=1)
    kw: dict[str, Any] = dict(dp_rank=0, dp_size=1, seed=0, device="cpu", batch_size=BATCH, num_classes=None)
    ahead = D.Ahead() if hasattr(D, "Ahead") else None
    extra = {"ahead": ahead} if ahead is not None else {}
    out: dict[str, Any] = {}

    def first(make: Any) -> tuple[Any, float]:
        """The loader and the seconds to its first batch; its CPU seconds (all threads) go in ``cpu``."""
        start, cpu = time.perf_counter(), time.process_time()
        loader = make()
        next(iter(loader))
        cpu_seconds.append(time.process_time() - cpu)
        return loader, time.perf_counter() - start

    cpu_seconds: list[float] = []

    loader0, out["epoch0_first_batch_s"] = first(lambda: D.train_loader(cfg, epoch=0, **kw, **extra))
    steps = loader0.steps_in_epoch
    batches = iter(loader0)
    next(batches), next(batches)  # the first step done (the next epoch is being prepared, where it is)
    if ahead is not None:
        ahead.wait()  # as after an epoch of training
    loader1, out["epoch1_first_batch_s"] = first(lambda: D.train_loader(cfg, epoch=1, **kw, **extra))
    if ahead is not None:
        ahead.wait()
    out["rss_two_epochs_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del loader0, loader1
    for at in (0.1, 0.9):
        k = int(at * steps)
        _, out[f"resume{int(at * 100)}_first_batch_s"] = first(
            lambda: D.train_loader(cfg, epoch=0, start_batch=k, **kw)  # noqa: B023 (called at once)
        )
    _, out["val_first_batch_s"] = first(lambda: D.val_loader(cfg, dp_rank=0, dp_size=1, device="cpu", batch_size=BATCH))
    out["rss_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    names = ("epoch0", "epoch1", "resume10", "resume90", "val")
    out.update({f"{name}_first_batch_cpu_s": cpu for name, cpu in zip(names, cpu_seconds)})
    out["steps_per_epoch"] = steps
    if ahead is not None:
        ahead.close()
    return out


def child_warm(data: str) -> dict[str, Any]:
    """One loader built and dropped: what a previous run on the dataset leaves behind (caches)."""
    import pipeline.data as D

    cfg = D.DataConfig(data=data, loader="torch", mean="channel", verify="size", workers=1)
    D.train_loader(cfg, dp_rank=0, dp_size=1, epoch=0, seed=0, device="cpu", batch_size=BATCH)
    return {}


def child_hash(data: str, run_dir: str, dp_rank: int) -> dict[str, Any]:
    """``train_loader`` with ``verify full`` minus the same with ``verify size``: the hashing's own seconds."""
    import inspect
    from dataclasses import replace

    import pipeline.data as D

    cfg = D.DataConfig(data=data, loader="torch", mean="channel", verify="size", workers=0)
    kw: dict[str, Any] = dict(dp_rank=dp_rank, dp_size=4, epoch=0, seed=0, device="cpu", batch_size=BATCH)
    if "ahead" not in inspect.signature(D.train_loader).parameters:
        kw["verify_cache"] = Path(run_dir) / "verified-shards"  # what the baseline's trainer passed
    D.train_loader(cfg, **kw)  # imports, page cache
    start = time.perf_counter()
    D.train_loader(cfg, **kw)
    size_only = time.perf_counter() - start
    start = time.perf_counter()
    D.train_loader(replace(cfg, verify="full"), **kw)
    return {"hash_s": time.perf_counter() - start - size_only}


# ---------------------------------------------------------------------------- the parent


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def _child(tree: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *args],
        cwd=tree,
        env=_env(tree),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args} in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def trainer(tree: Path, data: Path, run_dir: Path, steps: int) -> dict[str, float]:
    """Seconds from spawn to the first step's log line, and the process's peak RSS."""
    cmd = [sys.executable, "-m", "launch.train", "--data", str(data), "--run-dir", str(run_dir)]
    cmd += [*NARROW, "--num-classes", str(_classes(data)), "--batch-size", str(BATCH), "--max-steps", str(steps)]
    cmd += ["--data.verify", "size", "--data.mean", "channel", "--data.workers", "1", "--train.log-every", "1"]
    cmd += ["--train.ten-crop", "false", "--checkpoint.every-minutes", "0", "--tp", "1"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tree, env=_env(tree), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    first_step, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first_step is None and re.search(r"step \d+/\d+ \(\d+/\d+ in epoch\)", line):
            first_step = time.monotonic() - start
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or first_step is None:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{''.join(lines[-30:])}")
    return {
        "first_step_s": first_step,
        "total_s": time.monotonic() - start,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # the whole run's, all threads: less noisy than wall time
        "rss_peak_mib": usage.ru_maxrss / 1024,
    }


def _classes(data: Path) -> int:
    return len(json.loads((data / "manifest.json").read_text())["classes"])


def measure(tree: Path, data: Path, scratch: Path, with_trainer: bool = True) -> dict[str, Any]:
    run = scratch / "run"
    shutil.rmtree(run, ignore_errors=True)
    _child(tree, "warm", str(data))  # not the dataset's first run: its caches exist, as they will
    out: dict[str, Any] = {}
    if with_trainer:
        out = {"trainer": trainer(tree, data, run, 2), "resume": trainer(tree, data, run, 4)}
    out["data"] = _child(tree, "data", str(data))
    return out


def measure_hashing(tree: Path, data: Path, scratch: Path) -> dict[str, Any]:
    def fresh() -> None:
        shutil.rmtree(data / ".alexnet-cache", ignore_errors=True)  # "after": the dataset's cache
        shutil.rmtree(data / ".verified-shards", ignore_errors=True)
        for run in scratch.glob("hash-run*"):
            shutil.rmtree(run)

    fresh()
    first = _child(tree, "hash", str(data), str(scratch / "hash-run1"), "0")["hash_s"]
    second = _child(tree, "hash", str(data), str(scratch / "hash-run2"), "0")["hash_s"]
    fresh()
    pair_run = scratch / "hash-pair"  # a pair shares its run dir
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "hash", str(data), str(pair_run), "0"]
    pair = [subprocess.Popen(cmd, cwd=tree, env=_env(tree), stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate()[0] for p in pair]
    if any(p.returncode != 0 for p in pair):
        raise RuntimeError("the tensor-parallel pair's hashing failed")
    both = max(json.loads(o.strip().splitlines()[-1])["hash_s"] for o in outputs)
    fresh()
    return {"new_run_s": first, "second_new_run_s": second, "pair_new_run_s": both}


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *args = sys.argv[2:]
        if kind == "hash":
            result = child_hash(args[0], args[1], int(args[2]))
        else:
            result = child_data(*args) if kind == "data" else child_warm(*args)
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=Path, required=True, help="the small dataset")
    parser.add_argument("--big", type=Path, required=True, help="the same, replicated to ImageNet's count")
    parser.add_argument("--baseline-tree", type=Path, help="a checkout of the code to compare against")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-hashing", action="store_true", help="skip the sha256 rows (minutes at full size)")
    parser.add_argument("--no-trainer", action="store_true", help="skip the launch.train rows (the loaders only)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    trees = {"after": HERE}
    if args.baseline_tree:
        trees = {"before": args.baseline_tree.resolve(), **trees}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        scratch = Path(tmp)
        for round_no in range(args.rounds):
            for name, tree in trees.items():
                for size, data in (("small", args.small), ("big", args.big)):
                    got = measure(tree, data.resolve(), scratch, with_trainer=not args.no_trainer)
                    print(f"round {round_no} {name} {size}: {json.dumps(got)}", flush=True)
                    results.setdefault(name, {}).setdefault(size, []).append(got)
        if not args.no_hashing:
            for name, tree in trees.items():
                for size, data in (("small", args.small), ("big", args.big)):
                    got = measure_hashing(tree, data.resolve(), scratch)
                    print(f"hashing {name} {size}: {json.dumps(got)}", flush=True)
                    results.setdefault(name, {}).setdefault(f"{size}_hashing", []).append(got)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
