"""The goodput ledger's file (whole records, a torn last line skipped, a SIGKILL mid-write) and its account
(the parts of each attempt add up to its span; lost work, gaps and hangs booked where they belong)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from basics.errors import UserError
from pipeline import config
from pipeline.checkpoint import CheckpointConfig, Checkpointer
from pipeline.goodput import CATEGORIES, Ledger, account, interval, read_records
from pipeline.goodput.account import hang_detect_s
from pipeline.goodput.interval import AutoInterval, History, history, young_daly_minutes
from pipeline.options import AUTO
from pipeline.run_dir import RunDir
from pipeline.tools import goodput as goodput_tool
from tests.support import REPO, flags
from tests.support.processes import small_env, wait_for


def test_a_torn_last_line_is_skipped_and_the_next_record_stays_whole(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.append({"kind": "start", "attempt": "a", "t": 1.0}, durable=True)
    ledger.close()
    with path.open("ab") as f:
        f.write(b'{"kind": "tick", "attempt": "a", "t": 2')  # a writer killed mid-line
    assert [r["t"] for r in read_records(path)] == [1.0]
    Ledger(path).append({"kind": "end", "attempt": "a", "t": 3.0})
    assert [r["t"] for r in read_records(path)] == [1.0, 3.0]


def test_the_ledger_survives_a_sigkill_mid_write(tmp_path: Path) -> None:
    """A writer appending as fast as it can is killed at an arbitrary moment: every line read back is whole."""
    path = tmp_path / "ledger.jsonl"
    code = (
        "import sys; from pipeline.goodput import Ledger\n"
        "ledger = Ledger(sys.argv[1])\n"
        "i = 0\n"
        "while True:\n"
        "    ledger.append({'kind': 'tick', 'attempt': 'a', 't': i, 'pad': 'x' * (i % 5000)}); i += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=REPO, env=small_env())
    try:
        wait_for(lambda: path.exists() and path.stat().st_size > 2_000_000, 60, "2 MB of records", proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    records = read_records(path)
    assert records and [r["t"] for r in records] == list(range(len(records)))
    assert all(r["pad"] == "x" * (r["t"] % 5000) for r in records)
    lines = path.read_bytes().split(b"\n")
    for line in lines[:-1]:
        json.loads(line)  # no interleaved or half-placed record before the last line


def _attempt(name: str, t0: float, *, resumed: int, steps: int, step_s: float, end: str | None, **extra) -> list:
    """A synthetic attempt: 1 s imports, 1 s process group, 2 s build (0.5 restore), 1 s loader, then steps."""
    start = {"kind": "start", "attempt": name, "t": t0 + 2, "process_start": t0, "entry": t0 + 1, "marks_at": t0 + 2}
    start |= extra
    first = {"start": 2.0, "loader": 1.0}
    records = [
        start,
        {"kind": "resumed", "attempt": name, "t": t0 + 4, "step": resumed, "restore_s": 0.5},
        {"kind": "first-step", "attempt": name, "t": t0 + 5, "step": resumed, "phases": first},
    ]
    phases = {**first, "forward": steps * step_s, "checkpoint": 1.0}
    last = t0 + 5 + steps * step_s + 1.0 + 0.25  # 0.25 s unmarked
    fields = {"attempt": name, "t": last, "step": resumed + steps, "phases": phases}
    records.append({"kind": "end", "reason": end, **fields} if end else {"kind": "tick", **fields})
    return records


def test_the_account_books_lost_work_gaps_and_hangs_and_adds_up() -> None:
    # killed 3 steps after the checkpoint at step 4 (a hang named after 7 s), resumed 20 s later from step 4
    first = _attempt("a", 100.0, resumed=0, steps=7, step_s=1.0, end=None)
    second = _attempt("b", first[-1]["t"] + 20, resumed=4, steps=8, step_s=1.0, end="done", hang={"detect_s": 7.0})
    run = account(first + second)
    a, b = run.attempts
    assert a.ended == "hang" and b.ended == "done"
    assert a.lost_steps == 3 and a.seconds["lost"] == pytest.approx(3.0) and a.seconds["kept"] == pytest.approx(4.0)
    assert b.seconds["hang_detection"] == pytest.approx(7.0) and b.seconds["gap"] == pytest.approx(13.0)
    assert a.seconds["startup.restore"] == 0.5 and a.seconds["startup.build"] == 1.5
    assert a.seconds["startup.imports"] == 1.0 and a.seconds["startup.process_group"] == 1.0
    for one in run.attempts:
        assert sum(one.seconds[k] for k in CATEGORIES) == pytest.approx(one.span)
        assert one.seconds["other"] == pytest.approx(0.25)
    assert run.wall == pytest.approx(second[-1]["t"] - 100.0)
    assert run.goodput == pytest.approx((4.0 + 8.0) / run.wall)


def test_rolled_back_steps_are_booked_at_the_mean_step_time() -> None:
    rows = _attempt("a", 0.0, resumed=0, steps=10, step_s=0.5, end="done")
    rows.insert(-1, {"kind": "rollback", "attempt": "a", "t": 8.0, "at_step": 9, "restored_step": 7})
    [one] = account(rows).attempts
    assert one.rolled_back_steps == 2 and one.seconds["rolled_back"] == pytest.approx(1.0)
    assert one.seconds["kept"] == pytest.approx(4.0)


def test_hang_seconds_are_read_from_the_watchdogs_line() -> None:
    line = "hang: rank 1 ...; no progress on any rank for 12 s; stacks of every rank ..."
    assert hang_detect_s(line) == 12.0 and hang_detect_s("something else") is None


def test_young_daly_interval() -> None:
    # sqrt(2 x 30 s x 24 h) = 2277 s
    assert young_daly_minutes(save_s=30.0, mtbf_s=24 * 3600) == pytest.approx(37.95, abs=0.01)


# -- --checkpoint.every-minutes auto


def test_every_minutes_takes_auto_on_the_command_line_in_a_file_and_round_trips(tmp_path: Path) -> None:
    cfg, _ = config.parse(flags("--checkpoint.every-minutes auto --checkpoint.mtbf-hours 2"))
    assert cfg.checkpoint.every_minutes == AUTO and cfg.checkpoint.mtbf_hours == 2.0
    saved = config.save(cfg, tmp_path)
    assert json.loads(saved.read_text())["checkpoint"]["every_minutes"] == "auto"
    assert config.from_dict(json.loads(saved.read_text())).checkpoint.every_minutes == AUTO
    toml = tmp_path / "c.toml"
    toml.write_text('[checkpoint]\nevery_minutes = "AUTO"\n')
    assert config.parse(["--config", str(toml)])[0].checkpoint.every_minutes == AUTO
    toml.write_text("[checkpoint]\nevery_minutes = 12\n")  # a config of before: a number still loads
    assert config.parse(["--config", str(toml)])[0].checkpoint.every_minutes == 12.0
    assert config.parse(flags("--checkpoint.every-minutes 7.5"))[0].checkpoint.every_minutes == 7.5
    assert "FLOAT|auto" in config.build_parser().format_help()
    for bad in (["--checkpoint.every-minutes", "soon"], ["--checkpoint.every-minutes", "-1"]):
        with pytest.raises((SystemExit, UserError)):
            config.parse(bad)
    toml.write_text('[checkpoint]\nevery_minutes = "soon"\n')
    with pytest.raises(UserError, match="every-minutes: expected a number or auto"):
        config.parse(["--config", str(toml)])


def _records(*attempts: tuple[float, float, str | None, int, float]) -> list[dict]:
    """Ledger records: per attempt (process start, last record, end reason or None when killed, saves, stall)."""
    out = []
    for i, (t0, t1, end, saves, stall) in enumerate(attempts):
        out.append({"kind": "start", "attempt": f"a{i}", "t": t0, "process_start": t0, "pid": 1000 + i})
        fields = {"attempt": f"a{i}", "t": t1, "step": 1, "phases": {}, "saves": saves, "save_stall_s": stall}
        out.append({"kind": "end", "reason": end, **fields} if end else {"kind": "tick", **fields})
    return out


def test_the_auto_interval_is_young_daly_of_the_mean_stall_and_the_mtbf(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="alexnet")
    given = AutoInterval(1.0, History())
    assert given.minutes() == interval.FIRST_SAVE_MIN  # no stall measured yet
    assert "the first save at 30 min" in caplog.text and "1 h MTBF (--checkpoint.mtbf-hours)" in caplog.text
    given.saved(4.0)
    given.saved(8.0)  # mean 6 s: sqrt(2 x 6 s x 3600 s) = 207.8 s
    assert given.minutes() == pytest.approx(3.464, abs=0.001)
    assert "3.5 min = Young/Daly sqrt(2 x 6.00 s save stall (mean of 2 saves) x 1 h MTBF" in caplog.text

    # from the ledger: two failed attempts (killed, an error) and a preempted one over 10 h
    attempts = (0, 3600, None, 1, 10.0), (4000, 8000, "error: X", 1, 20.0), (9000, 9500, "preempted", 0, 0)
    past = history(_records(*attempts))
    assert (past.began, past.failures, past.saves, past.stall_s) == (0, 2, 2, 30.0)
    ledger = AutoInterval(0.0, past, wall=lambda: 36000.0)
    assert ledger.mtbf()[0] == pytest.approx(5 * 3600)  # 10 h over 2 failures
    assert ledger.minutes() == pytest.approx(young_daly_minutes(15.0, 5 * 3600))
    assert "this run's ledger: 10.00 h over 2 failed attempts" in caplog.text
    none = AutoInterval(0.0, history(_records((0, 100, "done", 1, 5.0))))
    assert none.mtbf() == (interval.DEFAULT_MTBF_H * 3600, "24 h MTBF (the default: no failure in this run's ledger)")
    loop = AutoInterval(0.0, history(_records((0, 1, None, 0, 0), (2, 3, None, 0, 0))), wall=lambda: 10.0)
    assert loop.mtbf()[0] == interval.MTBF_FLOOR_H * 3600  # a crash loop: the floor
    assert history(_records((0, 1, None, 0, 0)), this_pid=1000) == History()  # this process's own attempt: not past


def test_the_interval_is_logged_again_only_when_it_moves_by_more_than_a_fifth(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="alexnet")
    auto = AutoInterval(1.0, History(saves=1, stall_s=6.0))
    auto.minutes()
    for stall in (6.5, 7.0, 20.0):  # the mean stall: 6.25, 6.5, 9.9 s; the interval x1.02, x1.04, x1.28
        auto.saved(stall)
        auto.minutes()
    assert caplog.text.count("checkpoint interval (--checkpoint.every-minutes auto)") == 2


def test_a_run_with_auto_saves_at_the_chosen_cadence(tmp_path: Path) -> None:
    """A fake clock drives the checkpointer's time decision: a step every 30 s, each save stalls 6 s. With a
    1 h MTBF the first save comes at 30 min, the next ones every sqrt(2 x 6 s x 1 h) = 3.5 min (at the first
    step past it: 4 min)."""
    now = [0.0]
    saver = Checkpointer(tmp_path, CheckpointConfig(every_minutes=AUTO, mtbf_hours=1.0), rank=0)
    saver.clock = lambda: now[0]
    saver._last_save = 0.0

    def write(*args: object) -> None:  # the disk's work, as the clock sees it
        now[0] += 6.0

    saver._write = write
    state = SimpleNamespace(
        progress=SimpleNamespace(step=0), all_finite=lambda *a: True, tensors=lambda copy: {}, meta=lambda: {}
    )
    saved_at = []
    for step in range(1, 120):
        now[0] += 30.0
        state.progress.step = step
        if saver.time_due():
            saved_at.append(now[0])
            saver.save(state, torch.device("cpu"))
    assert saver.saves == len(saved_at) and saver.save_stall_s == pytest.approx(6.0 * len(saved_at))
    assert saved_at == [1800.0 + k * (6.0 + 210.0) for k in range(9)]  # to the last step's 3570 s


# -- the tool's projection to larger node counts


def test_the_tool_projects_goodput_at_larger_node_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A synthetic run: killed 3 steps after a checkpoint, its restart named the hang after 7 s and started 20 s
    after the kill (13 s gap); 2 saves of 1 s stall each; each start-up 5 s. At 64 nodes of 100 h MTBF each the
    job fails every 5625 s: Young/Daly's interval sqrt(2 x 1 s x 5625 s) = 106 s."""
    first = _attempt("a", 100.0, resumed=0, steps=7, step_s=1.0, end=None)
    second = _attempt("b", first[-1]["t"] + 20, resumed=4, steps=8, step_s=1.0, end="done", hang={"detect_s": 7.0})
    first[-1] |= {"saves": 1, "save_stall_s": 1.0}
    second[-1] |= {"saves": 1, "save_stall_s": 1.0}
    ledger = Ledger(RunDir(tmp_path).goodput_ledger)
    for record in first + second:
        ledger.append(record)
    ledger.close()

    assert goodput_tool.main([str(tmp_path), "--project", "1,64,4096", "--node-mtbf-hours", "100", "--json"]) == 0
    projection = json.loads(capsys.readouterr().out)[str(tmp_path)]["projection"]
    measured, at = projection["measured"], {p["nodes"]: p for p in projection["at"]}
    assert measured["save_stall_s"] == 1.0 and measured["restarts"] == 1
    assert measured["restart_s"] == {"start-up": 5.0, "hang detection": 7.0, "gap": 13.0}
    run = account(first + second)
    steady = run.totals["kept"] / (run.wall - 2.0 - 3.0 - 7.0 - 13.0 - 5.0)  # less saves, lost, hang, gap, restart
    assert measured["steady"] == pytest.approx(steady)
    mtbf = 100 * 3600 / 64
    interval_s = (2 * 1.0 * mtbf) ** 0.5
    assert at[64]["interval_s"] == pytest.approx(interval_s)
    waste = 1.0 / interval_s + interval_s / (2 * mtbf) + (5.0 + 7.0 + 13.0) / mtbf
    assert at[64]["goodput"] == pytest.approx(steady * (1 - waste))
    assert at[4096]["interval_s"] == 60.0  # the floor: never more often than every minute
    assert at[1]["goodput"] > at[64]["goodput"] > at[4096]["goodput"]

    assert goodput_tool.main([str(tmp_path), "--project", "1,64,4096", "--node-mtbf-hours", "100"]) == 0
    out = capsys.readouterr().out
    assert "projected at 100 h MTBF per node" in out and "save stall 1.00 s (mean of 2 saves)" in out
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["64"])
    assert row[-1] == f"{at[64]['goodput']:.1%}"
    # lost work: 60 s / (2 x 87.9 s) = 34% at 4096 nodes, from 849 s / (2 x 100 h) = 0.1% at 1 node: more than any
    # restart part (gap: 13 s / 87.9 s = 15%)
    assert "grows fastest: lost work, 0.1% of the wall-clock at 1 nodes -> 34.1% at 4096" in out

    assert goodput_tool.main([str(tmp_path), "--project", "8"]) == 2
    assert "--node-mtbf-hours" in capsys.readouterr().err
