"""Faults on a real run: a worker killed mid-epoch, a kill during a checkpoint write, a truncated shard,
a full disk under the preprocessing output. Each must end in a resumable state or a one-line error."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline import checkpoint
from pipeline.checkpoint import META, export_model
from tests.support import HARNESS, PYTHON, SMALL_RUN, flags
from tests.support.faults import RUN_TIMEOUT, _mount_tmpfs, _one_error_line, _train_error, _umount
from tests.support.processes import (
    children,
    cmdline,
    descendants,
    environ,
    kill_group,
    run_logged,
    small_env,
    start_logged,
    tail,
    wait_for,
)


def _latest(run_dir: Path) -> Path | None:
    return checkpoint.latest(run_dir)


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


# ------------------------------------------------------------------------------------------------
# kill -9 of one worker under torchrun's elastic restarts


@pytest.mark.multiprocess
def test_killed_worker_restarts_and_resumes(demo_shards: Path, tmp_path: Path) -> None:
    run_dir, out, log = tmp_path / "run", tmp_path / "out", tmp_path / "torchrun.log"
    out.mkdir()
    # 2 epochs of 12 steps, the paper's tower pair (tp=2) as 2 local processes, a checkpoint every 2 steps.
    argv = [
        PYTHON,
        *flags("-m torch.distributed.run --standalone --nproc_per_node=2"),
        *flags("--max-restarts=2 --monitor-interval=0.2"),
        HARNESS,
        *flags("--data {} --run-dir {}", demo_shards, run_dir),
        *SMALL_RUN,
        *flags("--tp 2 --epochs 2 --checkpoint.every-steps 2 --train.log-every 1"),
    ]
    # As slurm/train.sh does: without it the restarted group reads the dead group's addresses from torchrun's
    # shared rendezvous store and gloo's init fails with "Connection refused" (pytorch/pytorch#135712).
    env = small_env({"HARNESS_OUT": str(out), "HARNESS_DATA": "real", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    # Both ranks hold before step 3 (after the checkpoint at step 2): the kill lands mid-epoch on any machine.
    gate = tmp_path / "gate"
    gate.mkdir()
    env.update(HARNESS_PAUSE_AT="3", HARNESS_GATE=str(gate))
    agent = start_logged(argv, log, env)
    try:
        wait_for(lambda: len(list(gate.glob("paused-rank*"))) == 2, 180, "both ranks at step 3", agent)
        first = _latest(run_dir)
        workers = [p for p in children(agent.pid) if HARNESS in cmdline(p)]
        assert len(workers) == 2, (workers, tail(log))
        victim = next(p for p in workers if environ(p).get("LOCAL_RANK") == "1")
        step_at_kill = json.loads((first / META).read_text())["step"]
        assert step_at_kill == 2, first
        os.kill(victim, signal.SIGKILL)
        (gate / "go").touch()  # the survivor goes on into a collective with a dead peer
        rc = agent.wait(timeout=RUN_TIMEOUT)
    finally:
        kill_group(agent)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-6000:]

    # torchrun saw the worker die and restarted the group once; rank 0 of the new group resumed.
    assert f"failed (exitcode: -9) local_rank: 1 (pid: {victim})" in text, text[-6000:]
    assert text.count("world 2 = dp 1 x tp 2") == 2, text[-6000:]  # the first and the restarted group
    resumed = re.findall(r"resumed from (\S+): epoch (\d+), step (\d+)", text)
    assert len(resumed) == 1, text[-6000:]
    resumed_step = int(resumed[0][2])
    assert resumed_step == step_at_kill, resumed
    outcome = json.loads((out / "outcome-rank0.json").read_text())
    assert outcome["progress"] == {"epoch": 2, "step": 24, "step_in_epoch": 0}, outcome

    # Every checkpoint left is complete and loads; nothing half-written is left behind.
    checkpoints = _checkpoints(run_dir)
    assert checkpoints and not [p for p in checkpoints if p.name.endswith(".tmp")], checkpoints
    assert _latest(run_dir).name == "step-00000024"
    for path in checkpoints:
        assert (path / META).exists(), path
        weights = export_model(path)
        assert weights["conv1.weight"].shape == (16, 3, 11, 11)
        assert all(bool(v.isfinite().all()) for v in weights.values()), path


# ------------------------------------------------------------------------------------------------
# kill -9 while a checkpoint is being written


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_the_previous_one(demo_shards: Path, tmp_path: Path) -> None:
    """The paper-width model (~435 MB per checkpoint, a few seconds to write): killed mid-write."""
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    argv = [
        PYTHON,
        *flags("-m launch.train --data {} --run-dir {} --num-classes 4 --tp 1", demo_shards, run_dir),
        *flags("--batch-size 2 --data.workers 1 --train.ten-crop false"),
        *flags("--checkpoint.every-minutes 0 --checkpoint.every-steps 1 --max-steps 2"),
        # At batch 2 the paper-width model's loss jumps ~25x in its second step (1.4 -> 35), which the divergence
        # guard's cap rightly calls a spike; this test is about the write, so the cap is off here.
        *flags("--train.log-every 1 --faults.divergence.spike-factor 0"),
    ]
    ckpt_dir = run_dir / "checkpoints"

    def writing() -> Path | None:
        """A step-N.tmp with data in it while an older complete checkpoint is `latest`."""
        latest = _latest(run_dir)
        if latest is None:
            return None
        for tmp in ckpt_dir.glob("step-*.tmp"):
            if tmp.name > latest.name and any(f.is_file() and f.stat().st_size > 0 for f in tmp.iterdir()):
                return tmp
        return None

    try:
        proc = start_logged(argv, log, small_env())
        try:
            tmp = wait_for(writing, 240, "a checkpoint being written after a complete one", proc, poll=0.01)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            kill_group(proc)
        assert proc.returncode == -signal.SIGKILL
        assert tmp.is_dir(), f"{tmp} was completed before the kill landed"
        previous = _latest(run_dir)
        assert previous is not None and previous.name < tmp.name.removesuffix(".tmp"), (previous, tmp)
        assert (ckpt_dir / "latest").read_text().strip() == previous.name
        weights = export_model(previous)
        assert weights["conv1.weight"].shape == (96, 3, 11, 11) and weights["fc6.weight"].shape == (4096, 9216)
        del weights

        # The same command again: resumes from the previous checkpoint, finishes, and the .tmp is gone.
        rc = run_logged(argv, log, small_env(), timeout=RUN_TIMEOUT)
        text = log.read_text(errors="replace")
        assert rc == 0, text[-4000:]
        assert f"resumed from {previous}" in text, text[-4000:]
        assert not list(ckpt_dir.glob("*.tmp")), list(ckpt_dir.iterdir())
        assert _latest(run_dir).name == "step-00000002"
        assert all((p / META).exists() for p in _checkpoints(run_dir)), _checkpoints(run_dir)
        meta = json.loads((_latest(run_dir) / META).read_text())
        assert meta["progress"]["step"] == 2
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # ~1.3 GB of checkpoints


# ------------------------------------------------------------------------------------------------
# Damaged shards: one-line errors, exit code 2


@pytest.mark.slow
def test_corrupt_shard_of_the_right_size_is_a_one_line_error(demo_shards: Path, tmp_path: Path) -> None:
    """Same size as the manifest says: the sha256 check names the shard before anything trains; with
    --data.verify size only the loader can find it, still one line naming the shard (not only its
    directory), exit 2."""
    data = tmp_path / "shards"
    shutil.copytree(demo_shards, data)
    shard = data / "train" / "train-000001.tar"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # zero the middle half: tar headers and JPEG bytes of ~20 samples
        f.seek(size // 4)
        f.write(b"\0" * (size // 2))
    rc, stderr = _train_error(data, tmp_path / "run", "--epochs", "1")
    assert rc == 2, stderr[-4000:]
    line = _one_error_line(stderr)
    assert str(shard) in line and "sha256" in line, line
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))

    rc, stderr = _train_error(data, tmp_path / "run2", "--epochs", "1", "--data.verify", "size")
    assert rc == 2, stderr[-4000:]
    line = _one_error_line(stderr)
    assert f"{shard}: sample " in line, line  # the shard README promises, and the sample in it


# ------------------------------------------------------------------------------------------------
# The kill soak: SIGKILL at random moments, the same command again, the same weights at the end

SOAK_KILLS = 10


def _soak_argv(data: Path, run_dir: Path) -> list[str]:
    # 4 epochs x 12 steps of the tower pair (tp=2) as 2 ranks; a checkpoint at every step, so kills land
    # in checkpoint writes as well as in steps, validation and start-up. Saves run in the background
    # (--checkpoint.async-save), the path where a kill can land between a step and its save's commit.
    return [
        PYTHON,
        *flags("-m torch.distributed.run --standalone --nproc_per_node=2"),
        HARNESS,
        *flags("--data {} --run-dir {}", data, run_dir),
        *SMALL_RUN,
        *flags("--tp 2 --epochs 4 --checkpoint.every-steps 1 --checkpoint.keep-last 2"),
        *flags("--checkpoint.async-save true --train.log-every 1"),
    ]


def _progress_step(run_dir: Path) -> int:
    latest = _latest(run_dir)
    return json.loads((latest / META).read_text())["step"] if latest else -1


@pytest.mark.multiprocess
def test_kill_soak_resumes_to_the_uninterrupted_weights(demo_shards: Path, tmp_path: Path) -> None:
    import random

    rng = random.Random(1234)
    straight, soaked = tmp_path / "straight", tmp_path / "soaked"
    out, gate = tmp_path / "out", tmp_path / "gate"
    out.mkdir()
    gate.mkdir()
    env = small_env({"HARNESS_OUT": str(out), "HARNESS_DATA": "real"})
    log = tmp_path / "soak.log"
    assert run_logged(_soak_argv(demo_shards, straight), tmp_path / "straight.log", env, RUN_TIMEOUT) == 0, tail(
        tmp_path / "straight.log"
    )

    in_write = 0
    for kill in range(SOAK_KILLS):
        before = _progress_step(soaked)
        # Each round moves the run on by a few steps at most (whatever the machine's speed), so 10 fit in 48.
        assert before < 40, f"kill {kill}: the run is at step {before} already"
        (gate / "held").unlink(missing_ok=True)
        hold = ("written", "renamed")[kill // 2 % 2] if kill % 2 else ""
        (gate / "hold").write_text(hold)
        proc = start_logged(_soak_argv(demo_shards, soaked), log, {**env, "HARNESS_HOLD_SAVE": str(gate)})
        try:
            if hold:  # inside a checkpoint save: its data written and nothing committed, or renamed before `latest`
                wait_for(lambda: (gate / "held").exists(), RUN_TIMEOUT, f"a checkpoint save held at {hold!r}", proc)
                in_write += 1
            else:  # a random moment after the run made progress: in a step, in validation, in a save
                wait_for(lambda before=before: _progress_step(soaked) > before, RUN_TIMEOUT, "progress", proc, 0.01)
                give_up = time.monotonic() + rng.uniform(0, 0.6)
                while time.monotonic() < give_up and _progress_step(soaked) <= before + 2:
                    time.sleep(0.005)
            for pid in [proc.pid, *descendants(proc.pid)]:  # the whole tree at once, as a node loss would
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(timeout=30)
        finally:
            kill_group(proc)
        # Whatever moment the kill hit, an intact checkpoint is there to resume from.
        assert any(checkpoint.verify(p) is None for p in checkpoint.candidates(soaked)), list(
            (soaked / "checkpoints").iterdir()
        )

    (gate / "hold").write_text("")
    assert run_logged(_soak_argv(demo_shards, soaked), log, env, RUN_TIMEOUT) == 0, tail(log)
    text = log.read_text(errors="replace")
    assert in_write == SOAK_KILLS // 2, in_write
    assert "error:" not in text and text.count("resumed from") >= SOAK_KILLS, text[-4000:]
    final = _latest(soaked)
    assert final is not None and checkpoint.verify(final) is None
    assert json.loads((final / META).read_text())["progress"] == {"epoch": 4, "step": 48, "step_in_epoch": 0}
    a, b = export_model(_latest(straight)), export_model(final)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    print(
        f"kill soak: {SOAK_KILLS} SIGKILLs survived, {in_write} inside a checkpoint save, the last at step {before}/48"
    )


# ------------------------------------------------------------------------------------------------
# A full disk during a checkpoint save


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(demo_shards: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")

    def argv(run_dir: Path) -> list[str]:
        return [
            PYTHON,
            *flags("-m launch.train --data {} --run-dir {}", demo_shards, run_dir),
            *SMALL_RUN,
            *flags("--tp 1 --max-steps 4 --checkpoint.every-steps 1 --checkpoint.keep-last 10"),
        ]

    # How much a run needs up to its second checkpoint, measured on a roomy disk.
    roomy = tmp_path / "roomy"
    assert run_logged(argv(roomy), tmp_path / "roomy.log", small_env(), RUN_TIMEOUT) == 0, tail(tmp_path / "roomy.log")
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in _checkpoints(roomy)}
    one = max(sizes.values())
    rest = sum(f.stat().st_size for f in roomy.rglob("*") if f.is_file() and "checkpoints" not in f.parts)
    size_kb = (rest + 2 * one + one // 2) // 1024 + 64

    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, size_kb)
    try:
        run_dir, log = mnt / "run", tmp_path / "full.log"
        rc = run_logged(argv(run_dir), log, small_env(), RUN_TIMEOUT)
        text = log.read_text(errors="replace")
        assert rc == 2, text[-4000:]
        line = _one_error_line(text)
        assert "checkpoint at step" in line and "no space left" in line.lower() and "intact" in line, line
        kept = _latest(run_dir)
        assert kept is not None and checkpoint.verify(kept) is None
        assert not list((run_dir / "checkpoints").glob("*.tmp")), list((run_dir / "checkpoints").iterdir())

        grown = subprocess.run(flags("mount -o remount,size=64m {}", mnt), capture_output=True, text=True, timeout=30)
        assert grown.returncode == 0, grown.stderr
        assert run_logged(argv(run_dir), log, small_env(), RUN_TIMEOUT) == 0, tail(log)
        assert f"resumed from {kept}" in log.read_text(errors="replace")
        a, b = export_model(_latest(roomy)), export_model(_latest(run_dir))
        assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    finally:
        _umount(mnt)
