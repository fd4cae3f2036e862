"""The GPU path, proven on one GPU in one command: ``make gpu-check`` (``python3 -m pipeline.bench.gpu_check``).

From a checkout, on the machine's own torch (whatever version it has; the report says which), within an
8-minute budget on one H100 (:data:`PLAN`: each step's expected seconds and its limit, the limits' sum
and the margin left), it runs in order:

0. what the machine lacks (DALI's CUDA wheel, simplejpeg, webdataset) installed from the package index
   with ``pip install`` beside its torch, outside the budget (its time is the network's); ``--no-install``
   refuses in one line instead;
1. versions: Python, torch (+ its CUDA), the driver and GPU, DALI, the checkout's commit;
2. shards it makes itself: the procedural demo dataset through ``python -m preprocess`` (JPEG 4:2:0, as
   ImageNet's shards);
3. the CUDA-marked tests (``pytest -m cuda``: device-time phase clock, mixed vs CPU decode, device checks);
4. a CPU-written checkpoint (contiguous weights) resumed on the GPU with ``--model.channels-last true``:
   the CPU run saved no CUDA RNG state, and fused SGD on CUDA refuses momentum in other strides;
5. a short training run on one GPU: DALI mixed decode, bf16, channels_last, ``torch.compile``, the watchdog
   at its defaults, one epoch with its validation, and a profile window (``--profile.steps``);
6. the profile window summarised (``python -m pipeline.tools.profile``): forward and backward seen on the
   device's kernels;
7. the pre-flight on this GPU (one process: the link ping-pong needs two GPUs and is not measured here);
8. the GPU report (``python -m pipeline.bench.train --gpu-report``: DALI alone, loader, model, together,
   the torchvision baseline, GPU vs CPU augmentation).

Passing means more than exiting 0: the figures are held against :data:`THRESHOLDS` (docs/BENCHMARKS.md,
"The GPU check's thresholds"): the trainer within 10% of the model alone at the same batch, its data wait
below 5%, the GPU-augmented batches within the CPU pipeline's tolerance.

One report, ``OUT/gpu-check.json`` and ``OUT/gpu-check.md`` (versions, each step's status, seconds, limit,
figures and the tail of its output; each threshold's verdict), and the full logs in ``OUT/gpu-check.log``.
Exit 0 when every step and every threshold passed, 1 otherwise. Without CUDA it refuses in one line
(exit 2) before it writes or installs anything.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
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
from pipeline.run_dir import RunDir

REPO = Path(__file__).resolve().parents[2]
# What a GPU machine's Python usually lacks, module -> the pip requirement (constraints.txt's versions).
NEEDED = {
    "nvidia.dali": "nvidia-dali-cuda{cuda}==2.4.0",
    "simplejpeg": "simplejpeg==1.9.0",
    "webdataset": "webdataset==1.0.2",
}
NARROW = ["--model.widths", "16,32,48,48,32", "--model.fc-width", "64"]
BUDGET_S = 480  # 8 minutes on one H100
INSTALL_LIMIT_S = 300  # outside the budget: a ~0.5 GB download at the network's speed, not the GPU's


@dataclass(frozen=True)
class Planned:
    """A step's expected seconds on one H100 (an estimate from the CPU figures and the compile times of
    docs/BENCHMARKS.md until a GPU run replaces it) and its limit: at least 1.5x that."""

    name: str
    expected_s: float
    limit_s: float


PLAN = (
    Planned("shards demo", 12, 20),  # 4,000 + 500 procedural images
    Planned("shards train", 20, 35),  # JPEG 4:2:0 encode and pack on the machine's cores
    Planned("shards val", 8, 15),
    Planned("cuda tests", 25, 40),  # torch + CUDA start-up, 4096^2 matmuls, three DALI graphs
    Planned("cpu checkpoint", 15, 25),  # narrow model, 2 steps on the CPU, one save
    Planned("resume on gpu, channels_last", 25, 40),  # CUDA and DALI start-up, 4 steps
    Planned("training", 75, 115),  # compile (forward+backward ~35 s, evaluation ~15 s), 31 steps, 1 save
    Planned("profile summary", 3, 15),
    Planned("preflight", 12, 20),
    Planned("gpu report", 75, 115),  # eight parts of 15 steps after 5, two of them compiled
)
LIMITS = {p.name: p.limit_s for p in PLAN}


def margin_s(plan: tuple[Planned, ...] = PLAN, budget_s: float = BUDGET_S) -> float:
    """What the budget keeps beyond every step's limit: the versions, Python start-ups, the report."""
    return budget_s - sum(p.limit_s for p in plan)


@dataclass(frozen=True)
class Threshold:
    """A figure of a step held against a limit (docs/BENCHMARKS.md, "The GPU check's thresholds")."""

    name: str
    step: str
    figure: str
    at_most: bool  # True: value <= limit passes; False: value >= limit passes
    limit: float


THRESHOLDS = (
    Threshold(
        "trainer within 10% of the model alone (same batch)", "gpu report", "trainer_vs_model_alone", False, 0.90
    ),
    Threshold("trainer's data wait below 5%", "gpu report", "trainer_data_wait_fraction", True, 0.05),
    # The GPU-decoded and augmented batches against the CPU pipeline's (0..255 scale; pipeline.bench.gpu).
    Threshold("GPU batches: worst image's mean abs. difference", "gpu report", "image_mae_max", True, 2.0),
    Threshold("GPU batches: largest channel-mean gap", "gpu report", "channel_mean_gap", True, 1.0),
    Threshold("profile window: forward seconds on the device", "profile summary", "forward_s", False, 1e-6),
    Threshold("profile window: backward seconds on the device", "profile summary", "backward_s", False, 1e-6),
)


def verdicts(
    figures: dict[str, dict[str, Any]], thresholds: tuple[Threshold, ...] = THRESHOLDS
) -> list[dict[str, Any]]:
    """Each threshold's verdict on the steps' figures ({step: {figure: value}}); a missing figure fails."""
    out = []
    for t in thresholds:
        value = figures.get(t.step, {}).get(t.figure)
        ok = isinstance(value, (int, float)) and (value <= t.limit if t.at_most else value >= t.limit)
        out.append(
            {"name": t.name, "value": value, "limit": ("<= " if t.at_most else ">= ") + f"{t.limit:g}", "ok": ok}
        )
    return out


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    rc: int | None
    command: str
    limit_s: float = 0.0
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
            step = Step(name, False, 0.0, None, command, limit, tail="skipped: the check's time budget is spent")
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
            step = Step(name, rc == 0, time.monotonic() - start, rc, command, limit, tail=output[-3000:])
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


def requirements(missing: list[str], torch_cuda: str | None) -> list[str]:
    """The pip requirements of the modules missing: DALI's wheel for torch's CUDA major (12 or 13)."""
    cuda = "120" if (torch_cuda or "13").split(".")[0] == "12" else "130"
    return [NEEDED[m].format(cuda=cuda) for m in missing]


def install_missing(log: Any, allowed: bool) -> str | None:
    """``pip install`` from the package index what is not importable, beside this Python's torch. Returns the
    command run (None: nothing was missing); a one-line error when it is refused, fails or leaves a gap."""
    import torch

    missing = [m for m in NEEDED if not _importable(m)]
    if not missing:
        return None
    wanted = requirements(missing, torch.version.cuda)
    command = [sys.executable, "-m", "pip", "install", *wanted]
    if not allowed:
        raise UserError(f"gpu-check: {', '.join(missing)} not importable; install them first: {' '.join(command[1:])}")
    print(f"gpu-check: installing {' '.join(wanted)} from the package index (docs/gpu-check.md)", flush=True)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_LIMIT_S, check=False)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired:
        output, rc = "", None
    log.write(f"\n===== install: {' '.join(command)}\n{output}")
    importlib.invalidate_caches()
    still = [m for m in missing if not _importable(m)]
    if rc != 0 or still:
        last = output.strip().splitlines()[-1] if output.strip() else f"no answer in {INSTALL_LIMIT_S} s"
        raise UserError(
            f"gpu-check: pip install {' '.join(wanted)} failed ({last}); without a package index see "
            "docs/gpu-check.md (wheels carried in)"
        )
    return " ".join(command)


def _importable(module: str) -> bool:
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
    """The GPU report's figures the thresholds read, flat, and its whole summary."""
    report = json.loads(path.read_text())
    summary, augmentation = report["summary"], report["gpu_vs_cpu_augmentation"]
    return {
        "trainer_vs_model_alone": summary["trainer_vs_model_alone"],
        "trainer_data_wait_fraction": summary["trainer_data_wait_fraction"],
        "image_mae_max": augmentation["image_mae_max"],
        "channel_mean_gap": augmentation["channel_mean_gap"],
        "summary": summary,
    }


def profile_figures(output: str) -> dict[str, Any]:
    """``python -m pipeline.tools.profile --json``'s first rank: its timeline and parts (seconds)."""
    (first, *_) = json.loads(output[output.index("[") :])
    return {"timeline": first["timeline"], **{f"{k}_s": v for k, v in first["parts"].items()}}


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
    installed = install_missing(c.log, allowed=not args.no_install)
    c.deadline = time.monotonic() + args.budget_s  # the install's time is the network's, not the budget's
    started = time.monotonic()
    info = versions()
    print(f"gpu-check: {info['gpu']}, torch {info['torch']} (CUDA {info['torch_cuda']}), DALI {info['dali']}")
    shards, src = work / "shards", work / "src"
    workers = str(max(os.cpu_count() or 1, 1))

    shard = ["-m", "preprocess", "shard", "--out", str(shards), "--workers", workers, "--no-progress"]
    # 4,000 train images: 31 batches of 128, an epoch long enough for the GPU report's loader part (steps + 6)
    c.python(
        "shards demo", ["-m", "preprocess", "make-demo", str(src), "--train-per-class", "400"], LIMITS["shards demo"]
    )
    c.python("shards train", [*shard, "--src", str(src / "train"), "--split", "train"], LIMITS["shards train"])
    val = [*shard, "--src", str(src / "val"), "--devkit", str(src / "devkit"), "--split", "val"]
    c.python("shards val", val, LIMITS["shards val"])

    # The file that holds them: collecting every test module would import what this machine need not have.
    cuda_tests = ["-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider", "tests/unit/test_gpu_path.py"]
    c.python("cuda tests", cuda_tests, LIMITS["cuda tests"])

    run_cpu = work / "resume-run"
    small = ["--data", str(shards), "--run-dir", str(run_cpu), "--tp", "1", *NARROW, "--batch-size", "32",
             "--train.ten-crop", "false", "--checkpoint.every-minutes", "0", "--train.log-every", "1"]  # fmt: skip
    cpu = ["-m", "launch.train", *small, "--train.device", "cpu", "--max-steps", "2"]
    c.python("cpu checkpoint", cpu, LIMITS["cpu checkpoint"])
    # Saved with contiguous weights, resumed channels_last: the momentum must take the live weights' strides.
    gpu = ["-m", "launch.train", *small, "--train.device", "cuda", "--train.amp", "bf16", "--max-steps", "6",
           "--model.channels-last", "true", "--data.channels-last", "true"]  # fmt: skip
    c.python("resume on gpu, channels_last", gpu, LIMITS["resume on gpu, channels_last"], resume_figures)

    gpu_run = work / "gpu-run"
    train = ["-m", "launch.train", "--data", str(shards), "--run-dir", str(gpu_run), "--tp", "1",
             "--train.device", "cuda", "--train.amp", "bf16", "--data.channels-last", "true",
             "--model.channels-last", "true", "--model.compile", "true", "--epochs", "1",
             "--train.ten-crop", "false", "--train.log-every", "5", "--checkpoint.every-minutes", "0",
             "--profile.steps", "20:24"]  # fmt: skip
    c.python("training", train, LIMITS["training"], training_figures)
    windows = sorted(RunDir(gpu_run).profiles.glob("*")) if RunDir(gpu_run).profiles.is_dir() else []
    profile = ["-m", "pipeline.tools.profile", str(windows[-1] if windows else RunDir(gpu_run).profiles), "--json"]
    c.python("profile summary", profile, LIMITS["profile summary"], profile_figures)

    preflight = ["-m", "launch.preflight", "--data", str(shards), "--device", "cuda"]
    c.python("preflight", preflight, LIMITS["preflight"], preflight_figures)
    report_json = work / "gpu-report.json"
    report = ["--steps", "15", "--warmup", "5", "--rounds", "1", "--json", str(report_json)]
    report_args = ["-m", "pipeline.bench.train", "--gpu-report", "--data", str(shards), *report]
    c.python("gpu report", report_args, LIMITS["gpu report"], lambda _: report_figures(report_json))

    judged = verdicts({s.name: s.figures for s in c.steps})
    result = {
        "ok": all(s.ok for s in c.steps) and all(v["ok"] for v in judged),
        "seconds": time.monotonic() - started,
        "budget_s": args.budget_s,
        "installed": installed,
        "versions": info,
        "steps": [asdict(s) for s in c.steps],
        "thresholds": judged,
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
        "| step | status | seconds | limit | figures |",
        "|---|---|---|---|---|",
    ]
    for s in result["steps"]:
        figures = json.dumps(s["figures"], default=str)[:300] if s["figures"] else ""
        status = "ok" if s["ok"] else "FAILED"
        lines.append(f"| {s['name']} | {status} | {s['seconds']:.0f} | {s.get('limit_s', 0):.0f} | {figures} |")
    lines += ["", "| threshold (docs/BENCHMARKS.md) | value | limit | verdict |", "|---|---|---|---|"]
    for v in result.get("thresholds", []):
        value = f"{v['value']:.4g}" if isinstance(v["value"], (int, float)) else "no figure"
        lines.append(f"| {v['name']} | {value} | {v['limit']} | {'ok' if v['ok'] else 'FAILED'} |")
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
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="the check's time budget (steps past it skip)")
    p.add_argument("--no-install", action="store_true", help="refuse instead of pip-installing what is missing")
    args = p.parse_args(argv)
    return run_cli(lambda: check(args))


if __name__ == "__main__":
    sys.exit(main())
