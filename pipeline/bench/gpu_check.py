"""The GPU path, proven on one GPU in one command: ``make gpu-check`` (``python3 -m pipeline.bench.gpu_check``).

From a checkout, on the machine's own torch (whatever version it has; the report says which) with DALI,
simplejpeg and webdataset installed beside it (docs/gpu-check.md), in about 8 minutes on one H100, it runs
in order, each step under its own time limit:

1. versions: Python, torch (+ its CUDA), the driver and GPU, DALI, the checkout's commit;
2. shards it makes itself: the procedural demo dataset through ``python -m preprocess`` (JPEG 4:2:0, as
   ImageNet's shards);
3. the CUDA-marked tests (``pytest -m cuda``: device-time phase clock, mixed vs CPU decode, device checks);
4. a CPU-written checkpoint resumed on the GPU in the same layout (the CPU run saved no CUDA RNG state);
5. a short training run on one GPU: DALI mixed decode, bf16, channels_last, ``torch.compile``, the watchdog
   at its defaults, two epochs with a validation each (the compile allowances, the progress line's device
   data-wait, the straggler figures' clock);
6. the pre-flight on this GPU (one process: the link ping-pong needs two GPUs and is not measured here);
7. the GPU report (``python -m pipeline.bench.train --gpu-report``: DALI alone, loader, model, together,
   the torchvision baseline, GPU vs CPU augmentation).

One report, ``OUT/gpu-check.json`` and ``OUT/gpu-check.md`` (versions, each step's status, seconds, figures
and the tail of its output), and the full logs in ``OUT/gpu-check.log``. Exit 0 when every step passed,
1 otherwise. Without CUDA it refuses in one line (exit 2) before it writes anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from basics.errors import UserError, run_cli

REPO = Path(__file__).resolve().parents[2]
NEEDED = ("nvidia.dali", "simplejpeg", "webdataset")  # what the device image lacks (docs/gpu-check.md)
NARROW = ["--model.widths", "16,32,48,48,32", "--model.fc-width", "64"]


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    rc: int | None
    command: str
    figures: dict[str, Any] = field(default_factory=dict)
    tail: str = ""


class Check:
    def __init__(self, out: Path, work: Path, budget_s: float):
        self.out, self.work = out, work
        self.deadline = time.monotonic() + budget_s
        self.steps: list[Step] = []
        self.log = (out / "gpu-check.log").open("w")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "4"}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

    def run(self, name: str, args: list[str], limit_s: float, figures: Any = None) -> Step:
        """One step as a subprocess of this Python, killed at ``limit_s`` (or the check's deadline)."""
        left = self.deadline - time.monotonic()
        limit = max(min(limit_s, left), 0)
        command = " ".join(args)
        self.log.write(f"\n===== {name}: {command}\n")
        self.log.flush()
        start = time.monotonic()
        if limit < 5:
            step = Step(name, False, 0.0, None, command, tail="skipped: the check's time budget is spent")
        else:
            try:
                proc = subprocess.run(
                    args, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=limit, check=False
                )
                output, rc = proc.stdout + proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as e:
                output = _text(e.stdout) + _text(e.stderr) + f"\n(killed after {limit:.0f} s)"
                rc = None
            self.log.write(output)
            step = Step(name, rc == 0, time.monotonic() - start, rc, command, tail=output[-3000:])
            if figures is not None and rc == 0:
                try:
                    step.figures = figures(output)
                except (OSError, ValueError, KeyError) as e:
                    step.figures = {"error": f"could not read the figures: {e}"}
        self.steps.append(step)
        status = "ok" if step.ok else "FAILED"
        print(f"gpu-check: {name}: {status} ({step.seconds:.0f} s)", flush=True)
        return step

    def python(self, name: str, args: list[str], limit_s: float, figures: Any = None) -> Step:
        return self.run(name, [sys.executable, *args], limit_s, figures)


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def versions() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name(0),
        "gpus_visible": torch.cuda.device_count(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "host": platform.node(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError:
        info["dali"] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run(
            [smi, "--query-gpu=driver_version,memory.total", "--format=csv,noheader"], capture_output=True, text=True
        )
        info["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    info["commit"] = git.stdout.strip() if git.returncode == 0 else "unknown (no git metadata in this copy)"
    return info


def refuse_without_cuda() -> None:
    """One line, before anything is written: this check is for a GPU machine."""
    try:
        import torch
    except ImportError:
        raise UserError(
            f"gpu-check: {sys.executable} has no torch; run it with the GPU machine's Python (PYTHON=...)"
        ) from None

    if not torch.cuda.is_available():
        raise UserError(
            f"gpu-check needs a CUDA GPU and torch {torch.__version__} sees none (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run it on a GPU machine (docs/gpu-check.md)"
        )
    missing = [m for m in NEEDED if not _importable(m)]
    if missing:
        raise UserError(
            f"gpu-check: {', '.join(missing)} not importable; install them beside torch first "
            "(pip install nvidia-dali-cuda130 simplejpeg webdataset: docs/gpu-check.md)"
        )


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# ------------------------------------------------------------------------------------------ figures


# The progress line (pipeline.train_log): "... loss L ... R img/s [F TFLOP/s/device MFU M%] data D% ETA ..."
PROGRESS = re.compile(r"step (\d+)/\d+ .* loss ([\d.]+) .* ([\d.]+) img/s(?: [^\n]*?)? data (\d+)%")


def training_figures(output: str) -> dict[str, Any]:
    """From the progress lines: the last one's figures and the best images/s; hangs and stragglers seen."""
    rows = [m.groups() for m in PROGRESS.finditer(output)]
    figures: dict[str, Any] = {
        "progress_lines": len(rows),
        "hang_reported": "hang:" in output,
        "stragglers_named": output.count("straggler:"),
    }
    if rows:
        step, loss, rate, data = rows[-1]
        figures.update(
            last_step=int(step),
            last_loss=float(loss),
            images_per_s_last=float(rate),
            images_per_s_best=max(float(r[2]) for r in rows),
            data_wait_percent_last=int(data),
        )
    vals = re.findall(r"val: top-1 error ([\d.]+)%", output)
    if vals:
        figures["val_top1_error_percent"] = [float(v) for v in vals]
    return figures


def resume_figures(output: str) -> dict[str, Any]:
    m = re.search(r"resumed from (\S+): epoch (\d+), step (\d+)", output)
    if not m:
        raise ValueError("no 'resumed from' line: the GPU run did not resume the CPU checkpoint")
    return {"resumed_from": m.group(1), "resumed_at_step": int(m.group(3)), **training_figures(output)}


def report_figures(path: Path) -> dict[str, Any]:
    report = json.loads(path.read_text())
    return {"summary": report.get("summary"), "gpu_vs_cpu": report.get("gpu_vs_cpu_augmentation")}


def preflight_figures(output: str) -> dict[str, Any]:
    lines = [line for line in output.splitlines() if line.strip()]
    head = next((i for i, line in enumerate(lines) if line.strip().startswith("rank")), None)
    return {"table": lines[head : head + 3] if head is not None else lines[-3:]}


# ------------------------------------------------------------------------------------------ the check


def check(args: argparse.Namespace) -> int:
    refuse_without_cuda()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    c = Check(out, work, args.budget_s)
    started = time.monotonic()
    info = versions()
    print(f"gpu-check: {info['gpu']}, torch {info['torch']} (CUDA {info['torch_cuda']}), DALI {info['dali']}")
    shards, src = work / "shards", work / "src"
    workers = str(max(os.cpu_count() or 1, 1))

    shard = ["-m", "preprocess", "shard", "--out", str(shards), "--workers", workers, "--no-progress"]
    # 4,000 train images: 31 batches of 128, an epoch long enough for the GPU report's loader part (steps + 6)
    c.python("shards", ["-m", "preprocess", "make-demo", str(src), "--train-per-class", "400"], 60)
    c.python("shards train", [*shard, "--src", str(src / "train"), "--split", "train"], 90)
    c.python("shards val", [*shard, "--src", str(src / "val"), "--devkit", str(src / "devkit"), "--split", "val"], 60)

    # The file that holds them: collecting every test module would import what this machine need not have.
    cuda_tests = ["-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider", "tests/unit/test_gpu_path.py"]
    c.python("cuda tests", cuda_tests, 90)

    run_cpu = work / "resume-run"
    small = ["--data", str(shards), "--run-dir", str(run_cpu), "--tp", "1", *NARROW, "--batch-size", "32",
             "--train.ten-crop", "false", "--checkpoint.every-minutes", "0", "--train.log-every", "1"]  # fmt: skip
    c.python("cpu checkpoint", ["-m", "launch.train", *small, "--train.device", "cpu", "--max-steps", "2"], 60)
    c.python(
        "resume on gpu",
        ["-m", "launch.train", *small, "--train.device", "cuda", "--train.amp", "bf16", "--max-steps", "6"],
        60,
        resume_figures,
    )

    train = ["-m", "launch.train", "--data", str(shards), "--run-dir", str(work / "gpu-run"), "--tp", "1",
             "--train.device", "cuda", "--train.amp", "bf16", "--data.channels-last", "true",
             "--model.channels-last", "true", "--model.compile", "true", "--epochs", "2",
             "--train.ten-crop", "false", "--train.log-every", "5", "--checkpoint.every-minutes", "0"]  # fmt: skip
    c.python("training", train, 150, training_figures)

    c.python("preflight", ["-m", "launch.preflight", "--data", str(shards), "--device", "cuda"], 45, preflight_figures)
    report_json = work / "gpu-report.json"
    report = ["--steps", "15", "--warmup", "5", "--rounds", "1", "--json", str(report_json)]
    report_args = ["-m", "pipeline.bench.train", "--gpu-report", "--data", str(shards), *report]
    c.python("gpu report", report_args, 210, lambda _: report_figures(report_json))

    result = {
        "ok": all(s.ok for s in c.steps),
        "seconds": time.monotonic() - started,
        "versions": info,
        "steps": [asdict(s) for s in c.steps],
        "not_checked": [
            "the pre-flight link ping-pong and NCCL (one GPU: a second rank cannot share it under NCCL)",
            "DDP over several GPUs, tp=2 (the paper's split) and a straggler named on a real slow GPU",
        ],
    }
    (out / "gpu-check.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu-check.md").write_text(markdown(result))
    c.log.close()
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"gpu-check: {'all passed' if result['ok'] else 'FAILED'} in {result['seconds']:.0f} s; report {out}")
    return 0 if result["ok"] else 1


def markdown(result: dict[str, Any]) -> str:
    v = result["versions"]
    lines = [
        f"# GPU check: {'all passed' if result['ok'] else 'FAILED'} ({result['seconds']:.0f} s)",
        "",
        f"{v['gpu']} (sm {v['capability']}, driver {v.get('driver')}), torch {v['torch']} (CUDA {v['torch_cuda']},"
        f" cuDNN {v['cudnn']}), DALI {v['dali']}, Python {v['python']}, commit {v['commit']}, {v['date_utc']}",
        "",
        "| step | status | seconds | figures |",
        "|---|---|---|---|",
    ]
    for s in result["steps"]:
        figures = json.dumps(s["figures"], default=str)[:300] if s["figures"] else ""
        lines.append(f"| {s['name']} | {'ok' if s['ok'] else 'FAILED'} | {s['seconds']:.0f} | {figures} |")
    for s in result["steps"]:
        if not s["ok"]:
            lines += ["", f"## {s['name']} (exit {s['rc']})", "", "```", s["tail"][-2000:], "```"]
    lines += ["", "Not checked on one GPU: " + "; ".join(result["not_checked"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check", help="directory for gpu-check.{json,md,log}")
    p.add_argument("--work", help="scratch directory for shards and runs (default OUT/work, removed at the end)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    p.add_argument("--budget-s", type=float, default=480, help="the whole check's time budget (steps past it skip)")
    args = p.parse_args(argv)
    return run_cli(lambda: check(args))


if __name__ == "__main__":
    sys.exit(main())
