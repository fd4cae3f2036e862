"""The progress watchdog on a real 2-rank torchrun job: a rank SIGSTOPped mid-epoch is named in one line,
every live rank's stacks are written, the job restarts by itself and finishes from its last checkpoint.
Also: the verdict logic on records, and slow-but-progressing phases that must not trip it."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from pipeline import checkpoint
from pipeline.faults.watchdog import HANG_EXIT
from pipeline.phases import Allowance
from tests.support import HARNESS, PYTHON, SMALL_RUN, flags
from tests.support.processes import (
    children,
    cmdline,
    kill_group,
    rank_of,
    resume,
    run_logged,
    small_env,
    start_logged,
    tail,
    wait_for,
)
from tests.support.run_records import progress_record

RUN_TIMEOUT = 300
HANG_S = 10  # --faults.hang.timeout in these tests (default 120)
WATCH = [
    *flags("--faults.hang.timeout {} --faults.hang.slow-phase-timeout 20", HANG_S),
    *flags("--faults.hang.collective-timeout-min 2"),
]


# ------------------------------------------------------------------------------------------------
# A rank SIGSTOPped mid-epoch under torchrun


TRAINING_PHASES = ("data", "forward", "backward", "gradient-sync", "step", "step-sync", "control")
SAVE_PHASES = ("checkpoint", "checkpoint-sync")  # stopped in its slow save, or just after it
VALIDATION_PHASES = ("validation", "validation-sync")


@pytest.mark.multiprocess
def test_stopped_rank_is_named_and_the_job_comes_back(demo_shards: Path, tmp_path: Path) -> None:
    """Rank 1 SIGSTOPped three times in one run: mid-epoch, in a checkpoint save, in validation. Each time one
    line names it, rank 0's stacks are written, torchrun restarts the group, and the run finishes (exit 0)."""
    run_dir, out, log = tmp_path / "run", tmp_path / "out", tmp_path / "torchrun.log"
    out.mkdir()
    # dp=2 (tp=1): rank 1 stops while rank 0 waits in the gradient all-reduce. 2 epochs of 12 steps.
    argv = [
        PYTHON,
        *flags("-m torch.distributed.run --standalone --nproc_per_node=2"),
        *flags("--max-restarts=3 --monitor-interval=0.2"),
        HARNESS,
        *flags("--data {} --run-dir {}", demo_shards, run_dir),
        *SMALL_RUN,
        *flags("--tp 1 --epochs 2 --checkpoint.every-steps 3 --train.log-every 1"),
        *WATCH,
    ]
    # torchrun's default, a rendezvous store shared with the workers: the case whose restart used to fail
    # ("Gloo connectFullMesh failed ... Connection refused"); pipeline.process.process_group_store fixes it.
    # Rank 1's saves and validation batches take 1.5 s longer, so a stop can land inside them.
    env = small_env(
        {
            "HARNESS_OUT": str(out),
            "HARNESS_DATA": "real",
            "HARNESS_SLOW_RANK": "1",
            "HARNESS_SLOW_SAVE_S": "1.5",
            "HARNESS_SLOW_VAL_S": "1.5",
        }
    )
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    agent = start_logged(argv, log, env)
    victims: list[int] = []
    times: list[tuple[float, float, float]] = []
    try:
        for attempt, phases in enumerate([TRAINING_PHASES, SAVE_PHASES, VALIDATION_PHASES]):

            def rank1(attempt: int = attempt) -> int | None:
                pids = [p for p in children(agent.pid) if HARNESS in cmdline(p) and rank_of(p) == 1]
                return pids[0] if pids and pids[0] not in victims else None

            victim = wait_for(rank1, 180, f"rank 1 of attempt {attempt}", agent)
            # The moment: rank 1's own record says it is in the phase (mid-epoch: training, after step 6's save).
            wait_for(
                lambda v=victim, ph=phases: (
                    (r := progress_record(run_dir, 1)) and r["pid"] == v and r["phase"] in ph and r["step"] >= 7
                ),
                180,
                f"rank 1 in {phases}",
                agent,
                poll=0.01,
            )
            os.kill(victim, signal.SIGSTOP)
            victims.append(victim)
            stopped_at = time.monotonic()
            n = attempt + 1
            wait_for(lambda n=n: len(_hang_lines(log)) >= n, 120, f"hang report {n}", agent, poll=0.05)
            reported_at = time.monotonic()
            wait_for(lambda n=n: log.read_text(errors="replace").count("resumed from") >= n, 120, "resume", agent)
            times.append((stopped_at, reported_at, time.monotonic()))
        rc = agent.wait(timeout=RUN_TIMEOUT)
        done_at = time.monotonic()
    finally:
        resume(*victims)
        kill_group(agent)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-6000:]

    # One line per hang names the stopped rank, its host, pid, phase and step, and says it can leave no stack.
    lines = _hang_lines(log)
    assert len(lines) == 3, text[-6000:]
    for line, victim, phases in zip(lines, victims, [TRAINING_PHASES, SAVE_PHASES, VALIDATION_PHASES]):
        m = re.search(r"rank 1 \(host (\S+), pid (\d+)\) last seen in phase ([\w-]+) at step (\d+)", line)
        assert m and int(m.group(2)) == victim and m.group(3) in phases, (line, victim, phases)
        assert "process state T (stopped)" in line and "no stack from it" in line, line
        folder = Path(re.search(r"stacks of every rank that can run Python in (\S+)/rank-N.txt", line).group(1))
        assert folder.parent == run_dir / "hangs", folder
        stacks = (folder / "rank-0.txt").read_text()
        assert "Thread" in stacks and "File" in stacks and "train.py" in stacks, stacks
        assert not (folder / "rank-1.txt").exists()
    assert text.count(f"exitcode: {HANG_EXIT}") == 3, text[-6000:]

    # Each restarted group resumed from the newest intact checkpoint; the last one trained to the end.
    assert len(re.findall(r"resumed from (\S+): epoch (\d+), step (\d+)", text)) == 3, text[-6000:]
    outcome = json.loads((out / "outcome-rank0.json").read_text())
    assert outcome["progress"] == {"epoch": 2, "step": 24, "step_in_epoch": 0}, outcome
    for where, (stopped, reported, resumed) in zip(["mid-epoch", "checkpoint", "validation"], times):
        print(
            f"SIGSTOP {where}: report after {reported - stopped:.1f} s, resumed after {resumed - stopped:.1f} s "
            f"(hang-timeout {HANG_S} s)"
        )
    print(f"finished {done_at - times[-1][0]:.1f} s after the last stop")
    # The report comes hang-timeout after the last progress on any rank: rank 1's last mark precedes the stop
    # by at most a slowed validation batch (1.5 s), rank 0 blocks within a step of it; the watchdog then
    # acts within its poll (0.2 s here) and this test sees the line within its own (0.05 s). README quotes
    # 10.1-10.2 s; the margin above is for a loaded machine (the verdict's timing itself, to within a pass of
    # the thread, is pinned by test_the_verdict_comes_when_the_allowance_is_spent: a 1.25x allowance fails it).
    delays = [round(reported - stopped, 1) for stopped, reported, _ in times]
    assert all(HANG_S - 2 <= d <= HANG_S + 3 for d in delays), (delays, HANG_S)


def _hang_lines(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if "hang: " in line]


def _torchrun(data: Path, run_dir: Path, *extra: str, restarts: int = 0) -> list[str]:
    return [
        PYTHON,
        *flags("-m torch.distributed.run --standalone --nproc_per_node=2"),
        f"--max-restarts={restarts}",
        "--monitor-interval=0.2",
        HARNESS,
        *flags("--data {} --run-dir {}", data, run_dir),
        *SMALL_RUN,
        "--tp",
        "1",
        *extra,
    ]


# ------------------------------------------------------------------------------------------------
# False alarms: a slow validation (progressing batch by batch) and a slow checkpoint write


@pytest.mark.multiprocess
def test_slow_validation_and_checkpoint_do_not_trip_it(demo_shards: Path, tmp_path: Path) -> None:
    """Rank 1's validation takes 3 x 4 s and its checkpoint save 10 s (within the 20 s checkpoint allowance):
    no report, no exit, the run finishes. The first batch's wait counts as the loader's start (the slow
    allowance); the phase "validation" then lasts 2 x 4 s, more than the 6 s allowance: only the progress
    each batch reports keeps the watchdog quiet."""
    run_dir, out, log = tmp_path / "run", tmp_path / "out", tmp_path / "train.log"
    out.mkdir()
    watch = flags("--faults.hang.timeout 6 --faults.hang.slow-phase-timeout 20 --faults.hang.collective-timeout-min 2")
    argv = _torchrun(demo_shards, run_dir, "--epochs", "1", *watch)
    env = small_env(
        {
            "HARNESS_OUT": str(out),
            "HARNESS_DATA": "real",
            "HARNESS_SLOW_RANK": "1",
            "HARNESS_SLOW_VAL_S": "4",
            "HARNESS_SLOW_SAVE_S": "10",
        }
    )
    started = time.monotonic()
    rc = run_logged(argv, log, env, RUN_TIMEOUT)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-6000:]
    assert "hang: " not in text and not (run_dir / "hangs").exists(), text[-6000:]
    assert "epoch 0 val:" in text and checkpoint.latest(run_dir).name == "step-00000012", text[-4000:]
    assert time.monotonic() - started > 3 * 4 + 10  # the slow phases really ran on rank 1


# ------------------------------------------------------------------------------------------------
# A straggler: rank 1 stopped and continued in a duty cycle


@pytest.mark.multiprocess
def test_straggler_is_named(demo_shards: Path, tmp_path: Path) -> None:
    run_dir, out, log = tmp_path / "run", tmp_path / "out", tmp_path / "train.log"
    out.mkdir()
    argv = _torchrun(
        demo_shards,
        run_dir,
        "--epochs",
        "4",
        "--train.control-every",
        "2",
        "--faults.stragglers.window",
        "3",
        "--faults.stragglers.threshold",
        "1.5",
    )
    env = small_env({"HARNESS_OUT": str(out), "HARNESS_DATA": "real"})
    agent = start_logged(argv, log, env)
    victim = None
    try:
        wait_for(lambda: "dp 2 x tp 1" in log.read_text(errors="replace"), 180, "the workers' start", agent)
        victim = next(p for p in children(agent.pid) if HARNESS in cmdline(p) and rank_of(p) == 1)

        def named() -> str | None:
            return next((ln for ln in log.read_text(errors="replace").splitlines() if "straggler: " in ln), None)

        line = None
        while line is None and agent.poll() is None:  # stopped 75% of the time until it is named
            os.kill(victim, signal.SIGSTOP)
            time.sleep(0.15)
            os.kill(victim, signal.SIGCONT)
            time.sleep(0.05)
            line = named()
        rc = agent.wait(timeout=RUN_TIMEOUT)
    finally:
        resume(victim)
        kill_group(agent)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-6000:]
    line = named()
    assert line is not None, text[-6000:]
    assert re.search(r"straggler: rank 1 \(host \S+\) works [\d.]+ s per step", line), line
    # Stopped at random moments, it is slow in whichever phase the stops land, so either verdict is right
    # here (deterministic ones: test_a_slow_rank_is_named_with_its_cause_and_shown_in_tensorboard).
    assert re.search(r"it waits \d+% of that on data \(others \d+%\): slow on (data|compute) \(", line), line
    assert text.count("straggler: ") == 1, text[-6000:]
    print(line)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "cause, knob, verdict",
    [
        ("data", "HARNESS_SLOW_DATA_S", "slow on data (its input pipeline or storage is slow)"),
        ("compute", "HARNESS_SLOW_STEP_S", "slow on compute (its device, host or process is slow)"),
    ],
)
def test_a_slow_rank_is_named_with_its_cause_and_shown_in_tensorboard(
    demo_shards: Path, tmp_path: Path, cause: str, knob: str, verdict: str
) -> None:
    """Rank 1's batches arrive 0.4 s late (data), or its optimizer steps take 0.4 s longer (compute): it is
    named once, with that cause, and TensorBoard's straggler scalars show it as the slowest rank."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, out, log = tmp_path / "run", tmp_path / "out", tmp_path / "train.log"
    out.mkdir()
    argv = _torchrun(demo_shards, run_dir, *flags("--epochs 1 --train.control-every 2 --faults.stragglers.window 2"))
    env = small_env({"HARNESS_OUT": str(out), "HARNESS_DATA": "real", "HARNESS_SLOW_RANK": "1", knob: "0.4"})
    assert run_logged(argv, log, env, RUN_TIMEOUT) == 0, tail(log)
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "straggler: " in ln]
    assert len(lines) == 1 and "straggler: rank 1 " in lines[0], lines
    assert lines[0].endswith(verdict), lines[0]

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    perf = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if tag.startswith("perf/")}
    wanted = {"perf/rank_work_s_max", "perf/rank_work_s_median", "perf/slowest_rank"}
    assert wanted | {"perf/rank_data_wait_fraction_max", "perf/rank_data_wait_fraction_median"} <= perf.keys()
    # At the last control step (and at most of them) rank 1 works longest, at over the threshold x the median
    # (of 2 ranks: their mean, so the max is then over 2 x 1.5 / (1 + 1.5) = 1.2 x it).
    slowest = perf["perf/slowest_rank"]
    assert slowest[-1] == 1.0 and slowest.count(1.0) > len(slowest) / 2, slowest
    assert perf["perf/rank_work_s_max"][-1] > 1.2 * perf["perf/rank_work_s_median"][-1], perf
    share = perf["perf/rank_data_wait_fraction_max"][-1]
    if cause == "data":  # rank 1 waits 0.4 s of its ~0.6 s on data
        assert share > 0.5, perf["perf/rank_data_wait_fraction_max"]


# ------------------------------------------------------------------------------------------------
# A checkpoint's collectives are judged by the step allowance, its disk work by the slow one


def _runs(samples: list[list]) -> dict[str, float]:
    """The longest uninterrupted stretch of each phase in a rank's samples, in seconds."""
    longest: dict[str, float] = {}
    start = 0
    for i in range(1, len(samples) + 1):
        if i == len(samples) or samples[i][1] != samples[start][1]:
            phase = samples[start][1]
            longest[phase] = max(longest.get(phase, 0.0), samples[i - 1][0] - samples[start][0])
            start = i
    return longest


@pytest.mark.multiprocess
def test_a_rank_waiting_in_a_checkpoints_collectives_is_in_checkpoint_sync(tmp_path: Path) -> None:
    """Two gloo ranks save, each slow in turn (tests/support/checkpoint_phases.py): whoever waits for the
    other is in "checkpoint-sync" (the step allowance), whoever does disk work in "checkpoint"; both end
    with the same number of markers (the one behind is still found by its count)."""
    from tests.support.checkpoint_phases import DELAY_S, save_with_delays
    from tests.support.tensor_parallel import spawn_two_ranks

    spawn_two_ranks(save_with_delays, (str(tmp_path),), timeout_s=180)
    ranks = [json.loads((tmp_path / f"phases-rank{r}.json").read_text()) for r in range(2)]
    runs = [_runs(r["samples"]) for r in ranks]
    for rank, waited in enumerate(runs):
        # each rank waited for the other's slow part (late start, slow write, slow commit) in a collective
        assert waited.get("checkpoint-sync", 0) >= 0.7 * DELAY_S, (rank, waited)
    # the slow parts themselves: rank 0's late start and its commit, rank 1's file write
    assert all(r.get("checkpoint", 0) >= 0.7 * DELAY_S for r in runs), runs
    assert ranks[0]["seq"] == ranks[1]["seq"], ranks
    assert Allowance(10, 60).for_phase("checkpoint-sync") == 10 and Allowance(10, 60).for_phase("checkpoint") == 60
