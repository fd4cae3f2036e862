"""What the on-demand profiler costs the loop outside its windows, and what a window costs.

    python -m pipeline.bench.profiling [--size tiny] [--steps 300] [--rounds 3] [--window-steps 20]

The real ``Trainer.fit`` on in-memory synthetic batches (the narrow "tiny" model by default, whose step
is so cheap that any per-step cost of the loop shows), taking turns (``--rounds``; the best round
counts) between:

- ``with``: the trainer as it is, no window requested: the loop calls ``Profiler.step`` at every step
  boundary and each phase mark tests for a profiler hook;
- ``without``: the same trainer with ``Profiler.step`` replaced by a builtin that does nothing (the
  call site's cost left, the object's gone);
- ``window`` (``--window-steps`` > 0): every timed step inside a profiler window (``--profile.steps``):
  the cost while recording, trace written after the timed steps.

Figures and their reading: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from basics.errors import UserError, run_cli
from pipeline.bench.harness import SIZES, Setup, environment, run_trainer, synthetic_batches


def _one(setup: Setup, variant: str, *, warmup: int, steps: int, run_dir: Path) -> dict[str, float]:
    from pipeline import profiling, train

    source = synthetic_batches(setup)
    original_step, original_init = profiling.Profiler.step, profiling.Profiler.__init__

    def window_init(self: Any, run_dir: Any, cfg: Any, **kwargs: Any) -> None:
        cfg.steps = f"{warmup}:{warmup + steps + 1}"  # the trace is written after the timed steps
        original_init(self, run_dir, cfg, **kwargs)

    try:
        if variant == "without":
            profiling.Profiler.step = staticmethod(id)  # type: ignore[method-assign,assignment]
        elif variant == "window":
            profiling.Profiler.__init__ = window_init  # type: ignore[method-assign]
        assert train.Profiler is profiling.Profiler
        record = run_trainer(setup, _data_config(), source, warmup=warmup, steps=steps, run_dir=run_dir)
    finally:
        profiling.Profiler.step, profiling.Profiler.__init__ = original_step, original_init  # type: ignore[method-assign]
    return record.window(warmup, steps)


def _data_config() -> Any:
    from pipeline.data import DataConfig

    return DataConfig(data="unused (synthetic batches)")


def measure(size: str, *, steps: int, warmup: int, rounds: int, window_steps: int) -> dict[str, Any]:
    widths, fc_width, batch = SIZES[size]
    setup = Setup(widths, fc_width, num_classes=10, batch_size=batch, device="cpu")
    variants = ["with", "without"]
    per: dict[str, list[dict[str, float]]] = {v: [] for v in variants + (["window"] if window_steps else [])}
    scratch = Path(tempfile.mkdtemp(prefix="bench-profiling-"))
    try:
        for r in range(rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                per[v].append(_one(setup, v, warmup=warmup, steps=steps, run_dir=scratch / f"{v}-{r}"))
            if window_steps:
                run_dir = scratch / f"window-{r}"
                per["window"].append(_one(setup, "window", warmup=warmup, steps=window_steps, run_dir=run_dir))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best = {v: max(rs, key=lambda w: w["images_per_s"]) for v, rs in per.items()}
    least_cpu = {v: min(w["main_cpu_s_per_step"] for w in rs) for v, rs in per.items()}
    env = {**environment("cpu"), "command": "python -m pipeline.bench.profiling " + " ".join(sys.argv[1:])}
    return {
        "environment": env,
        "size": size,
        "steps": steps,
        "window_steps": window_steps,
        "rounds": per,
        "images_per_s": {v: w["images_per_s"] for v, w in best.items()},
        "main_cpu_s_per_step": least_cpu,
        "ratio_with_over_without": best["with"]["images_per_s"] / best["without"]["images_per_s"],
        "cpu_ratio_with_over_without": least_cpu["with"] / least_cpu["without"],
        **(
            {"window_slowdown": best["without"]["images_per_s"] / best["window"]["images_per_s"]}
            if window_steps
            else {}
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench.profiling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model and batch (tiny: narrow)")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each variant counts")
    parser.add_argument("--window-steps", type=int, default=20, help="timed steps inside a window (0 = skip)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.steps < 1 or args.rounds < 1 or args.warmup < 1 or args.window_steps < 0:
            raise UserError("--steps, --rounds and --warmup must be at least 1, --window-steps at least 0")
        report = measure(
            args.size, steps=args.steps, warmup=args.warmup, rounds=args.rounds, window_steps=args.window_steps
        )
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        ips, cpu = report["images_per_s"], report["main_cpu_s_per_step"]
        for v in ips:
            print(f"{v:<8} {ips[v]:8.1f} images/s  {1000 * cpu[v]:7.2f} ms CPU per step (training thread)")
        print(
            f"with/without: {report['ratio_with_over_without']:.3f} (images/s), "
            f"{report['cpu_ratio_with_over_without']:.3f} (CPU per step)"
        )
        if "window_slowdown" in report:
            print(f"inside a window: {report['window_slowdown']:.2f}x slower")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
