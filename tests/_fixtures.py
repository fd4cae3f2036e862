"""Shared fixtures and helpers for the end-to-end tests (Slurm, emulated nodes, faults, TensorBoard).

``build_demo`` makes the procedural demo dataset (4 classes x 24 train / 6 val images) through the real
preprocessing: ``ROOT/src`` (the source tree and devkit) and ``ROOT/shards`` (train + val shards,
manifest); conftest.py's ``demo_data``/``demo_shards`` fixtures build it once per session.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
HARNESS = str(REPO / "tests" / "_train_harness.py")

# The demo dataset's shape and the small-run flags every end-to-end test shares.
DEMO_CLASSES, DEMO_TRAIN, DEMO_VAL = 4, 24, 6
TRAIN_SHARD_SIZE = 40
NARROW = ["--num-classes", "4", "--model.widths", "16,32,48,48,32", "--model.fc-width", "64"]
SMALL_RUN = [
    *NARROW,
    "--batch-size",
    "8",
    "--data.workers",
    "1",
    "--train.ten-crop",
    "false",
    "--checkpoint.every-minutes",
    "0",
]


def preprocess(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`python -m preprocess ARGS` from the repository (captured, bounded)."""
    proc = subprocess.run(
        [PYTHON, "-m", "preprocess", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        env=small_env(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"python -m preprocess {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return proc


def shard_args(src: Path, out: Path, split: str = "train", workers: int = 1) -> list[str]:
    """The `shard` arguments the demo dataset is built with (the manifest comparison relies on them)."""
    args = [
        "shard",
        "--src",
        str(src / split),
        "--out",
        str(out),
        "--split",
        split,
        "--workers",
        str(workers),
        "--no-progress",
    ]
    if split == "train":
        args += ["--shard-size", str(TRAIN_SHARD_SIZE)]
    else:
        args += ["--devkit", str(src / "devkit")]
    return args


def build_demo(root: Path) -> Path:
    preprocess(
        "make-demo",
        str(root / "src"),
        "--classes",
        str(DEMO_CLASSES),
        "--train-per-class",
        str(DEMO_TRAIN),
        "--val-per-class",
        str(DEMO_VAL),
    )
    preprocess(*shard_args(root / "src", root / "shards", "train"))
    preprocess(*shard_args(root / "src", root / "shards", "val"))
    return root


# --------------------------------------------------------------------------------------------
# Source images

WNIDS = ["n01440764", "n01443537", "n01484850"]


def jpeg_of_colour(rgb: tuple[int, int, int], size: tuple[int, int], seed: int) -> bytes:
    """A noisy JPEG around one colour (PIL, quality 85), ``size`` = (width, height)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb, dtype=np.float32) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def make_image_folder(root: Path) -> Path:
    """An ImageFolder tree: 3 classes x 7 images of distinct colours and sizes, plus one undecodable file."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for c, wnid in enumerate(WNIDS):
        (root / wnid).mkdir(parents=True)
        for i in range(7):
            size = (300 + 40 * i, 260 + 10 * c)
            (root / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg_of_colour(colours[c], size, seed=10 * c + i))
    (root / WNIDS[0] / f"{WNIDS[0]}_broken.JPEG").write_bytes(b"this is not an image")
    return root


# --------------------------------------------------------------------------------------------
# Processes


def small_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment with one OpenMP thread and the repository importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


def interruptible() -> None:
    """``preexec_fn`` for a process a test interrupts: SIGINT at its default, as in a terminal's foreground
    job. A suite started in the background by a non-interactive shell (``nohup make test &``) passes
    SIGINT down ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return []


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found, then theirs), from /proc."""
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_group(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """TERM, then KILL, ``proc`` (started with start_new_session=True), its group and all its descendants.

    torchrun starts its workers in sessions of their own, so the group alone misses them; and the
    trainer turns SIGTERM into a stop request, so a worker stuck in a collective ignores it: whatever
    is below ``proc`` (collected before anything dies and is re-parented) gets SIGKILL in the end.
    """
    below = descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    below += [p for p in (descendants(proc.pid) if proc.poll() is None else []) if p not in below]
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _signal(below, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=5)


def wait_for(
    predicate: Any, timeout: float, what: str, proc: subprocess.Popen[Any] | None = None, poll: float = 0.05
) -> Any:
    """Poll ``predicate()`` until it is truthy (its value); fail after ``timeout`` s or if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def run_logged(argv: Sequence[str], log: Path, env: Mapping[str, str], timeout: float, cwd: Path = REPO) -> int:
    """Run to completion with stdout+stderr into ``log``; kill its whole group on timeout."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise AssertionError(f"{' '.join(argv[:4])} ... ran past {timeout:.0f} s:\n{tail(log)}") from None
        finally:
            if proc.poll() is None:
                kill_group(proc)


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return f"({path} missing)"
