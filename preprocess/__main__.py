"""Command line: ``python -m preprocess {shard,finalize,make-demo,replicate,bench} ...``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from basics.errors import UserError, run_cli
from preprocess import format as fmt


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


def add_shard_arguments(p: argparse.ArgumentParser) -> None:
    from preprocess import shards
    from preprocess.build import default_workers

    p.add_argument(
        "--src",
        required=True,
        help="ImageFolder tree (SRC/<wnid>/*), flat val folder, or an official ILSVRC2012 "
        "train/val tar (read directly, no extraction)",
    )
    p.add_argument("--out", required=True, type=Path, help="dataset directory (shards + manifest.json)")
    p.add_argument("--split", required=True, choices=fmt.SPLITS)
    p.add_argument("--devkit", help="ILSVRC2012_devkit_t12(.tar.gz): val labels, class names (meta.mat)")
    p.add_argument("--labels", help="val labels: LOC_val_solution.csv, or the devkit's ground-truth .txt")
    p.add_argument(
        "--workers",
        type=int,
        default=_env_int("SLURM_CPUS_PER_TASK") or default_workers(),
        help="worker processes (default: $SLURM_CPUS_PER_TASK or all usable cores)",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the cross-class shuffle")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored images")
    p.add_argument(
        "--max-file-mb",
        type=int,
        default=shards.ShardParams.max_file_mb,
        help="source files (or archive members) larger than this are skipped unread and listed "
        "in the manifest (ImageNet's largest JPEG is ~15 MB)",
    )
    p.add_argument(
        "--task-index",
        type=int,
        default=0,
        help="this task's index in an array job, 0-based (slurm/preprocess.sh passes it)",
    )
    p.add_argument("--task-count", type=int, default=1, help="tasks in the array job")
    p.add_argument(
        "--stats-images", type=int, default=10000, help="train images sampled for the mean image and RGB PCA (0 = all)"
    )
    p.add_argument(
        "--no-finalize", action="store_true", help="never write the manifest from this run (use `finalize` later)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_shard(args: argparse.Namespace) -> int:
    from preprocess import shards
    from preprocess.build import ShardJob, run_shard_job

    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality must be in 1..100 (got {args.quality})")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1 (got {args.workers})")
    if not 1 <= args.max_file_mb <= 1 << 20:
        raise UserError(f"--max-file-mb must be in 1..{1 << 20} (got {args.max_file_mb})")
    job = ShardJob(
        src=args.src,
        out=args.out,
        params=shards.ShardParams(
            split=args.split,
            shard_size=args.shard_size,
            seed=args.seed,
            quality=args.quality,
            max_file_mb=args.max_file_mb,
        ),
        workers=args.workers,
        task_index=args.task_index,
        task_count=args.task_count,
        devkit=args.devkit,
        labels=args.labels,
        stats_images=args.stats_images,
        finalize=not args.no_finalize,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    run_shard_job(job)
    return 0


def add_finalize_arguments(p: argparse.ArgumentParser) -> None:
    from preprocess.build import default_workers

    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--split", required=True, choices=fmt.SPLITS)
    p.add_argument("--workers", type=int, default=_env_int("SLURM_CPUS_PER_TASK") or default_workers())
    p.add_argument("--stats-images", type=int, default=10000)


def run_finalize(args: argparse.Namespace) -> int:
    from preprocess.build import finalize

    finalize(args.out, args.split, args.workers, args.stats_images)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from preprocess import bench, demo, replicate

    parser = argparse.ArgumentParser(prog="python -m preprocess", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, adder, runner, text in (
        (
            "shard",
            add_shard_arguments,
            run_shard,
            "ImageNet (folders or ILSVRC2012 archives) -> 256x256 JPEG WebDataset shards + manifest",
        ),
        (
            "finalize",
            add_finalize_arguments,
            run_finalize,
            "verify every shard of a split and write the manifest (after an array job)",
        ),
        ("make-demo", demo.add_arguments, demo.run, "write the embedded procedural demo dataset"),
        (
            "replicate",
            replicate.add_arguments,
            replicate.run,
            "a dataset of ImageNet's sample count from existing shards: hard links + one manifest (no new bytes)",
        ),
        ("bench", bench.add_arguments, bench.run, "preprocessing speed against a naive PIL baseline"),
    ):
        sub = commands.add_parser(
            name, help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        adder(sub)
        sub.set_defaults(run=runner)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(
        lambda: args.run(args), on_interrupt="interrupted; completed shards are kept, re-run the same command to resume"
    )


if __name__ == "__main__":
    sys.exit(main())
