"""The goodput ledger's file (whole records, a torn last line skipped, a SIGKILL mid-write) and its account
(the parts of each attempt add up to its span; lost work, gaps and hangs booked where they belong)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.goodput import CATEGORIES, Ledger, account, read_records
from pipeline.goodput.account import hang_detect_s
from pipeline.goodput.interval import young_daly_minutes
from tests.support import REPO
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
