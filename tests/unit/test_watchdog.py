"""The progress watchdog on a real 2-rank torchrun job: a rank SIGSTOPped mid-epoch is named in one line,
every live rank's stacks are written, the job restarts by itself and finishes from its last checkpoint.
Also: the verdict logic on records, and slow-but-progressing phases that must not trip it."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.faults.watchdog import HANG_EXIT, VERDICT, Record, Verdict, Watchdog, judge
from pipeline.phases import Allowance, PhaseMarks
from tests.support import flags
from tests.support.processes import wait_for


def _record(rank: int, seq: int, phase: str, progress_at: float, beat_at: float) -> Record:
    return Record(rank, "h", 100 + rank, "a", seq, 7, phase, progress_at, beat_at)


# ------------------------------------------------------------------------------------------------
# The verdict, on hand-made records


def test_judge_names_the_silent_rank_else_the_one_behind() -> None:
    allowance, now = Allowance(10, 60), 1000.0
    # rank 1 stopped 30 s ago (no heartbeat), rank 0 waits in the all-reduce, heartbeat fresh
    records = {0: _record(0, 12, "backward", now - 30, now), 1: _record(1, 11, "forward", now - 30, now - 30)}
    verdict = judge(records, 2, now, allowance, stale_s=3)
    assert verdict is not None and [r.rank for r in verdict.culprits] == [1] and verdict.silent == {1}

    # both alive (rank 1 stuck in a read with the interpreter free): the rank behind is the culprit
    records = {0: _record(0, 12, "backward", now - 30, now), 1: _record(1, 9, "data", now - 30, now)}
    verdict = judge(records, 2, now, allowance, stale_s=3)
    assert verdict is not None and [r.rank for r in verdict.culprits] == [1] and not verdict.silent

    # all at the same marker: a hang, but nobody to blame
    records = {r: _record(r, 12, "backward", now - 30, now) for r in range(3)}
    verdict = judge(records, 3, now, allowance, stale_s=3)
    assert verdict is not None and verdict.culprits == []

    # one rank still progressing (a slow validation on it): no verdict
    records = {0: _record(0, 12, "validation", now - 30, now), 1: _record(1, 12, "validation", now - 2, now)}
    assert judge(records, 2, now, allowance, stale_s=3) is None

    # a live rank writing a checkpoint for longer than the step allowance but within its own: no verdict
    records = {0: _record(0, 12, "checkpoint", now - 30, now), 1: _record(1, 12, "checkpoint", now - 30, now)}
    assert judge(records, 2, now, allowance, stale_s=3) is None
    # ... but a stopped process in a checkpoint write is judged by the step allowance
    records[1] = _record(1, 12, "checkpoint", now - 30, now - 30)
    verdict = judge(records, 2, now, allowance, stale_s=3)
    assert verdict is not None and [r.rank for r in verdict.culprits] == [1]

    # a rank with no record of this attempt yet: not judged (the rendezvous owns that case)
    assert judge({0: _record(0, 12, "backward", now - 30, now)}, 2, now, allowance, stale_s=3) is None


def test_verdict_says_how_long_and_names_its_folder_by_the_culprits_last_progress() -> None:
    allowance, now = Allowance(10, 60), 1_000_000.0
    # rank 1 silent since 30 s, rank 0 waiting since 40 s: stuck for 30 s (the latest progress), folder by rank 1
    records = {0: _record(0, 12, "backward", now - 40, now), 1: _record(1, 11, "forward", now - 30, now - 30)}
    verdict = judge(records, 2, now, allowance, stale_s=3)
    assert verdict is not None and verdict.stuck_s == pytest.approx(30)
    assert verdict.folder_name() == time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now - 30))
    # nobody behind: the folder is named by the earliest progress of all
    records = {0: _record(0, 12, "backward", now - 40, now), 1: _record(1, 12, "backward", now - 25, now)}
    verdict = judge(records, 2, now, allowance, stale_s=3)
    assert verdict is not None and verdict.culprits == [] and verdict.stuck_s == pytest.approx(25)
    assert verdict.folder_name() == time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now - 40))


# ------------------------------------------------------------------------------------------------
# When the verdict comes, on a fake wall clock: one pass of the watchdog's thread every PASS_S


PASS_S = 0.25  # the fake clock's step: the verdict's time is known to within it


class _FakeRun:
    """This process as rank 0 of 2 with a fake wall clock; rank 1's record is written by hand each pass."""

    def __init__(self, tmp_path: Path, allowance: Allowance, start: float = 1_000_000.0) -> None:
        self.now = start
        self.marks = PhaseMarks(wall=lambda: self.now)
        self.dog = Watchdog(tmp_path, 0, 2, "att", self.marks, allowance, clock=lambda: self.now)
        self.dog.progress_dir.mkdir(parents=True)

    def peer(self, seq: int, phase: str, progress_at: float, beat_at: float | None = None) -> None:
        rec = Record(1, "h", 4242, "att", seq, 5, phase, progress_at, self.now if beat_at is None else beat_at)
        (self.dog.progress_dir / "rank-1.json").write_text(json.dumps(vars(rec)))

    def run_until_verdict(self, seconds: float, peer: Callable[[], None]) -> float | None:
        """Advance the clock pass by pass (this rank's record, the peer's, the check) up to ``seconds``; the
        seconds since the start at the first verdict, None without one."""
        start = self.now
        for i in range(1, round(seconds / PASS_S) + 1):
            self.now = start + i * PASS_S
            peer()
            self.dog._publish()  # what the thread does at a change or a beat
            if self.dog.check() is not None:
                return self.now - start
        return None


@pytest.mark.parametrize(
    "mine, theirs, silent, expected",
    [
        ("backward", "gradient-sync", False, 10),  # stuck in a step: the step allowance
        ("checkpoint", "checkpoint", False, 60),  # both in a slow save: the slow allowance
        ("checkpoint", "checkpoint", True, 10),  # the peer stopped: the step allowance, whatever the phase
    ],
)
def test_the_verdict_comes_when_the_allowance_is_spent(
    tmp_path: Path, mine: str, theirs: str, silent: bool, expected: float
) -> None:
    """Not before the allowance (a slow step is not a hang) and not later: the report follows within one
    pass of the thread, a few percent of the timeout (an allowance stretched to 1.25x fails here)."""
    allowance = Allowance(10, 60)
    run = _FakeRun(tmp_path, allowance)
    run.marks.enter(mine, 5)
    t0 = run.now
    verdict_after = run.run_until_verdict(80, lambda: run.peer(1, theirs, t0, t0 if silent else None))
    assert verdict_after is not None and expected <= verdict_after <= expected + PASS_S + 1e-6, verdict_after
    assert run.dog.poll_s <= 0.02 * allowance.step_s + 1e-9, run.dog.poll_s  # the thread looks that often
    run.dog.close()


def test_a_tick_is_progress(tmp_path: Path) -> None:
    """Validation batches of 4 s against a 10 s step allowance: each batch after the first is a tick (no mark),
    and each tick keeps the watchdog quiet and reaches the peer's view; the verdict comes 10 s after the last."""
    run = _FakeRun(tmp_path, Allowance(10, 60))
    t0 = run.now

    def peer() -> None:  # the peer finished its batches and waits in the counts' all-reduce, alive
        run.peer(2, "validation-sync", t0)

    run.marks.enter("loader", 5)
    for n, _ in enumerate(run.marks.ticking(range(8), "validation")):
        assert run.run_until_verdict(4.0, peer) is None, f"a verdict during batch {n}"
    mine = Record.read(run.dog.progress_dir / "rank-0.json")
    assert mine is not None and mine.phase == "validation" and mine.seq == 2, mine  # ticks add no mark
    assert mine.progress_at == pytest.approx(t0 + 7 * 4.0), (mine, t0)  # the last batch's tick
    assert run.run_until_verdict(20, peer) == pytest.approx(10 - 4.0, abs=PASS_S + 1e-6)
    run.dog.close()


@pytest.mark.parametrize(
    "args, option",
    [
        (["--faults.hang.timeout", "-1"], "--faults.hang.timeout"),
        (["--faults.hang.timeout", "700"], "--faults.hang.timeout"),  # above the slow-phase allowance
        # the collective would fail first:
        (["--faults.hang.slow-phase-timeout", "700"], "--faults.hang.collective-timeout-min"),
        (["--faults.hang.collective-timeout-min", "0"], "--faults.hang.collective-timeout-min"),
        (["--faults.stragglers.threshold", "0.9"], "--faults.stragglers.threshold"),
        (["--faults.stragglers.window", "0"], "--faults.stragglers.window"),
    ],
)
def test_watchdog_options_are_checked(args: list[str], option: str) -> None:
    from basics.errors import UserError
    from pipeline import config

    with pytest.raises(UserError, match=re.escape(option)):
        config.parse([*args, "--data", "/nonexistent"])


def test_hang_timeout_0_starts_no_watchdog(tmp_path: Path) -> None:
    """``--faults.hang.timeout 0`` is accepted and starts no thread and writes no record (the collective timeout
    is then what ends a hang); any other value starts the thread, which publishes this rank's record."""
    import threading

    from launch.train import start_watchdog
    from pipeline import config
    from pipeline.process import ProcessEnv

    def cfg(run_dir: Path, timeout: str):
        return config.validate(
            config.parse(flags("--data {} --run-dir {} --faults.hang.timeout {}", tmp_path, run_dir, timeout))[0]
        )

    env = ProcessEnv(0, 1, 0)
    assert start_watchdog(cfg(tmp_path / "off", "0"), env, PhaseMarks()) is None
    assert not (tmp_path / "off").exists()
    assert "progress-watchdog" not in {t.name for t in threading.enumerate()}

    dog = start_watchdog(cfg(tmp_path / "on", "5"), env, PhaseMarks())
    try:
        assert dog is not None and "progress-watchdog" in {t.name for t in threading.enumerate()}
        assert dog.allowance == Allowance(5, 480)  # the options as they are (--train.slow-phase-timeout's default)
        record = json.loads((tmp_path / "on" / "progress" / "rank-0.json").read_text())
        assert record["rank"] == 0 and record["pid"] == os.getpid()
    finally:
        if dog is not None:
            dog.close()


def test_watchdog_thread_dumps_stacks_and_exits(tmp_path: Path) -> None:
    """One process as rank 0 of 2, its peer's record stopped: the report names the peer, stacks are written."""
    marks, exits = PhaseMarks(), []
    marks.enter("backward", 5)
    dog = Watchdog(tmp_path, 0, 2, "att", marks, Allowance(1.0, 2.0), exit_process=exits.append)
    dog.progress_dir.mkdir(parents=True)
    old = time.time() - 60
    peer = Record(1, "elsewhere", 4242, "att", 3, 5, "forward", old, old)
    (dog.progress_dir / "rank-1.json").write_text(json.dumps(vars(peer)))
    earlier = Record(0, "x", 1, "earlier-attempt", 99, 99, "data", time.time(), time.time())
    (dog.progress_dir / "rank-0.json").write_text(json.dumps(vars(earlier)))
    assert dog.read_records() == {1: peer}  # a record of an earlier attempt is not this attempt's
    dog.start()
    try:
        wait_for(lambda: exits, 30, "the watchdog's exit")
    finally:
        dog.close()
    assert exits[0] == HANG_EXIT
    (folder,) = (tmp_path / "hangs").iterdir()
    text = (folder / "rank-0.txt").read_text()
    assert "phase backward step 5" in text and "test_watchdog.py" in text, text  # the main thread's stack


def test_a_rank_that_does_not_report_leaves_only_after_the_reporters_line(tmp_path: Path) -> None:
    """Rank 2 stopped; rank 0 reports, rank 1 does not. Rank 1 must not exit (which lets the launcher kill
    rank 0) before rank 0's verdict is on disk: it waits for hang.json, then exits (the chaos campaign's lost
    line). The wait is a state (the file), bounded for a reporter that never writes."""
    marks, exits = PhaseMarks(), []
    marks.enter("backward", 5)
    dog = Watchdog(tmp_path, 1, 3, "att", marks, Allowance(1.0, 2.0), exit_process=exits.append)
    now = time.time()
    records = {r: Record(r, "h", 100 + r, "att", 3, 5, "backward", now - 20, now) for r in (0, 1)}
    records[2] = Record(2, "h", 102, "att", 3, 5, "forward", now - 20, now - 20)
    verdict = Verdict([records[2]], {2}, records, 20.0)
    acting = threading.Thread(target=dog.act, args=(verdict,))
    acting.start()
    folder = tmp_path / "hangs" / verdict.folder_name()
    wait_for(lambda: (folder / "rank-1.txt").exists(), 30, "rank 1's stacks")
    acting.join(timeout=1.0)  # rank 1 has written its stacks and now waits for the reporter
    assert not exits and acting.is_alive(), "rank 1 left before the reporter's line was written"
    (folder / VERDICT).write_text("{}")  # rank 0's verdict arrives
    acting.join(timeout=30)
    assert exits == [HANG_EXIT]
    # A reporter that never writes: the wait ends by itself
    exits.clear()
    dog.beat_s = dog.poll_s = 0.01
    gone = Verdict([records[2]], {2}, {**records, 2: Record(2, "h", 102, "att", 3, 5, "data", now - 90, now - 90)}, 90)
    started = time.monotonic()
    dog.act(gone)
    assert exits == [HANG_EXIT] and time.monotonic() - started < 60
    dog.close()


# ------------------------------------------------------------------------------------------------
# A checkpoint's collectives are judged by the step allowance, its disk work by the slow one


def test_waiting_for_a_background_save_shows_the_writers_phase(tmp_path: Path, monkeypatch) -> None:
    """With async saves the writer thread marks nothing itself; the training thread, waiting for it, shows its
    phase (here DCP's plan exchange, "checkpoint-sync") without adding markers of its own."""
    import threading

    import torch

    from pipeline.checkpoint import CheckpointConfig, Checkpointer, TrainState
    from pipeline.checkpoint.writer import PhaseMarkingWriter
    from pipeline.config import RunConfig
    from pipeline.model import ModelConfig, build_model
    from pipeline.schedule import LRSchedule

    cfg = RunConfig(run_dir=str(tmp_path))
    cfg.model = ModelConfig(num_classes=4, widths=(8, 16, 16, 16, 8), fc_width=16)
    model = build_model(cfg.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    layout = {"world_size": 1, "dp_size": 1, "tp_size": 1}
    state = TrainState(model, optimizer, LRSchedule(cfg.schedule, 0.01), cfg, layout, rank=0, tp_rank=0)
    marks = PhaseMarks()
    saver = Checkpointer(tmp_path, CheckpointConfig(every_minutes=0, async_save=True), rank=0, marks=marks)
    exchange = PhaseMarkingWriter.prepare_global_plan
    monkeypatch.setattr(
        PhaseMarkingWriter, "prepare_global_plan", lambda self, plans: (time.sleep(1.5), exchange(self, plans))[1]
    )
    saver.save(state, torch.device("cpu"))
    assert marks.current.phase == "checkpoint"  # the training thread's last marker: the copy to host memory
    before, seen, done = marks.current.seq, set(), threading.Event()
    writer = saver._pending.thread

    def sample() -> None:  # while the writer runs (then the outcome's all-gather enters checkpoint-sync anyway)
        while not done.is_set():
            phase = marks.current.phase
            if writer.is_alive():
                seen.add(phase)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    saver.wait()
    done.set()
    sampler.join()
    assert "checkpoint-sync" in seen, seen
    assert marks.current.seq == before + 1  # the outcome's all-gather only (a marker every rank enters)
