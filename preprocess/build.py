"""The ``shard`` and ``finalize`` jobs: plan a split, write this task's shards, then the manifest.

On one machine a single ``shard`` run writes every shard with a process pool and finalizes. As a
Slurm array, each task writes its subset; the task that finds every shard complete when it is
done verifies them all and writes the manifest (``finalize`` does the same by hand), under a
lock file that needs no flock (preprocess.locks).

Ctrl-C reaches every process of a terminal's process group: pool workers ignore it and the parent
alone acts, terminating the workers, removing this task's unfinished shard files and printing
one line (run_cli); completed shards stay and a re-run continues.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from basics.errors import UserError
from preprocess import format as fmt
from preprocess import shards, stats
from preprocess.locks import FileLock


@dataclass
class ShardJob:
    src: str
    out: Path
    params: shards.ShardParams
    workers: int = 1
    task_index: int = 0
    task_count: int = 1
    devkit: str | None = None
    labels: str | None = None
    stats_images: int = 10000
    finalize: bool = True  # write the manifest when every shard is complete
    progress: bool = True


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_shard_job(job: ShardJob) -> dict[str, Any]:
    """Write this task's shards (skipping verified ones); finalize if the split is complete."""
    started = time.monotonic()
    out = prepare_output(job.out, job.params.split)
    source = _open_source(job)
    plan = shards.make_plan(source, job.src, job.params)
    shards.save_plan(out, plan)
    plan_dict = plan.to_dict()

    mine = shards.tasks_shards(len(plan.shards), job.task_index, job.task_count)
    shards.remove_unfinished(shards.split_dir(out, job.params.split), [plan.shard_file(out, i).name for i in mine])
    todo = [i for i in mine if shards.verify_shard(plan.shard_file(out, i), plan.fingerprint) is None]
    _log(
        f"{job.params.split}: {plan.num_items} images -> {len(plan.shards)} shards; this task owns "
        f"{len(mine)}, {len(mine) - len(todo)} already complete, {len(todo)} to write "
        f"with {job.workers} worker(s)"
    )

    results = _write_shards(out, plan, plan_dict, todo, job)
    summary = _summary(results, time.monotonic() - started)
    _log(_format_summary(job.params.split, summary))

    if job.finalize:
        missing = [i for i in range(len(plan.shards)) if shards.read_done(plan.shard_file(out, i)) is None]
        if missing:
            _log(
                f"{len(missing)} of {len(plan.shards)} shards are still being written by other tasks; "
                "the last task to finish writes the manifest"
            )
        else:
            summary["manifest"] = str(finalize(out, job.params.split, job.workers, job.stats_images))
    return summary


def prepare_output(out: Path, split: str) -> Path:
    """Create the output directory and prove it is writable before any work starts."""
    out = Path(out)
    directory = shards.split_dir(out, split)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"{directory}: output is not writable ({e.strerror or e}); choose another --out or fix its permissions"
        ) from None
    return out


def _open_source(job: ShardJob) -> Any:
    from preprocess import sources

    classes = None
    if fmt.manifest_path(job.out).exists():
        # A second split must use the class indices the first one recorded.
        classes = fmt.read_manifest(job.out).wnids
    return sources.open_source(job.src, job.params.split, devkit=job.devkit, labels=job.labels, classes=classes)


def _write_shards(
    out: Path, plan: shards.ShardPlan, plan_dict: dict[str, Any], todo: list[int], job: ShardJob
) -> list[dict[str, Any]]:
    images = sum(len(plan.shards[i]) for i in todo)
    calls = [(out, plan_dict, i, plan.shards[i]) for i in todo]
    results = []
    try:
        with (
            _progress(images, job.progress, f"{job.params.split} shards") as bar,
            _worker_pool(min(job.workers, len(todo))) as pool,
        ):
            # A worker's UserError (e.g. disk full) is re-raised here.
            for result in _results(pool, shards.process_shard, calls, ordered=False):
                results.append(result)
                bar.update(result["samples"] + len(result["skipped"]))
    except BaseException:
        # Workers were killed mid-shard: leave nothing of theirs behind, only complete shards.
        shards.remove_unfinished(shards.split_dir(out, job.params.split), [plan.shard_file(out, i).name for i in todo])
        raise
    return results


@contextmanager
def _progress(total: int, enabled: bool, desc: str) -> Iterator[Any]:
    from tqdm import tqdm

    with tqdm(
        total=total,
        unit="img",
        desc=desc,
        disable=not enabled or total == 0,
        file=sys.stderr,
        smoothing=0.1,
        dynamic_ncols=True,
    ) as bar:
        yield bar


def _summary(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    reasons = collections.Counter(s["reason"] for r in results for s in r["skipped"])
    written = sum(r["samples"] for r in results)
    return {
        "written": written,
        "skipped": dict(reasons),
        "shards": len(results),
        "seconds": round(seconds, 2),
        "images_per_s": round(written / seconds, 1) if seconds else 0.0,
    }


def _format_summary(split: str, summary: dict[str, Any]) -> str:
    skipped = ", ".join(f"{n} {reason}" for reason, n in summary["skipped"].items()) or "none"
    return (
        f"{split}: wrote {summary['written']} images in {summary['shards']} shards in "
        f"{summary['seconds']:.1f} s ({summary['images_per_s']:.0f} img/s); skipped: {skipped}"
    )


# --------------------------------------------------------------------------------------------
# Finalize: verify every shard, compute statistics (train), write the manifest.


def finalize(out: Path, split: str, workers: int = 1, stats_images: int = 10000) -> Path:
    out = Path(out)
    plan = shards.read_plan(out, split)
    files = [shards.split_dir(out, split) / fmt.shard_name(split, i) for i in range(plan["num_shards"])]
    with _worker_pool(workers) as pool:
        records = list(_results(pool, shards.verify_shard, [(f, plan["fingerprint"]) for f in files], ordered=True))
    bad = [f.name for f, r in zip(files, records) if r is None]
    if bad:
        raise UserError(
            f"{shards.split_dir(out, split)}: {len(bad)} shard(s) missing or failing "
            f"verification ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); "
            "re-run the same `python -m preprocess shard` command to rewrite them"
        )
    split_info = fmt.SplitInfo(
        shards=[
            fmt.ShardInfo(
                path=f"{split}/{f.name}",
                index=f"{split}/{fmt.index_name(f.name)}",
                samples=r["samples"],
                sha256=r["sha256"],
                bytes=r["bytes"],
            )
            for f, r in zip(files, records)
        ],
        samples=sum(r["samples"] for r in records),
        skipped=[s for r in records for s in r["skipped"]],
        params={**plan["params"], "source": plan["source"], "plan": plan["fingerprint"]},
    )
    split_stats = _train_stats(out, split_info, workers, stats_images) if split == "train" else None
    with FileLock(out / ".manifest.lock"):  # train and val (or two array tasks) may finish together
        manifest = _merge(out, plan["classes"], split, split_info, split_stats)
        fmt.write_manifest(out, manifest)
    _log(
        f"{split}: verified {len(files)} shards, {split_info.samples} images, "
        f"{len(split_info.skipped)} skipped; manifest: {fmt.manifest_path(out)}"
    )
    return fmt.manifest_path(out)


def _train_stats(out: Path, info: fmt.SplitInfo, workers: int, stats_images: int) -> fmt.Stats:
    quotas = stats.per_shard_quota([s.samples for s in info.shards], stats_images)
    paths = [str(out / s.path) for s in info.shards]
    size = int(info.params["image_size"])
    total = stats.PixelMoments.zeros(size)
    with _worker_pool(workers) as pool:
        # In shard order: floating-point sums in another order would change the manifest between runs.
        for moments in _results(pool, stats.shard_moments, list(zip(paths, quotas, [size] * len(paths))), ordered=True):
            total = total + moments
    return stats.finish(total, out)


def _merge(
    out: Path, classes: list[dict[str, Any]], split: str, info: fmt.SplitInfo, split_stats: fmt.Stats | None
) -> fmt.Manifest:
    if fmt.manifest_path(out).exists():
        manifest = fmt.read_manifest(out)
        if manifest.wnids != [c["wnid"] for c in classes]:
            raise UserError(
                f"{fmt.manifest_path(out)}: the {split} split's classes differ from the "
                "manifest's; shard every split of one dataset with the same class set"
            )
        # Keep names known from either source (the devkit has them, an ImageFolder does not).
        manifest.classes = [
            c if c.get("name") else {**c, "name": m.get("name", "")} for c, m in zip(classes, manifest.classes)
        ]
    else:
        manifest = fmt.Manifest(classes=classes)
    manifest.splits[split] = info
    if split_stats is not None:
        manifest.stats = split_stats
    return manifest


@contextmanager
def _worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """A process pool (None: run inline) whose workers ignore Ctrl-C and die with the parent's interrupt."""
    if workers <= 1:
        yield None
        return
    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_interrupts)
    try:
        yield pool
    except BaseException:
        with _interrupts_ignored():  # a second Ctrl-C must not leave workers running on their own
            for child in set(multiprocessing.active_children()) - before:
                child.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _results(
    pool: ProcessPoolExecutor | None, fn: Callable[..., Any], calls: list[tuple[Any, ...]], *, ordered: bool
) -> Iterator[Any]:
    """``fn(*call)`` for every call, in the pool or inline; in call order or as they complete."""
    if pool is None:
        for call in calls:
            yield fn(*call)
        return
    with _interrupts_ignored():  # workers are forked by submit: they start with Ctrl-C ignored
        futures = [pool.submit(fn, *call) for call in calls]
    for future in futures if ordered else as_completed(futures):
        yield future.result()


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def _interrupts_ignored() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
