"""The phase marks (pipeline/phases.py): the rule that every rank enters the same marks in the same order, on
two real ranks through training, validation and saves; marks and ticks; seconds per phase; subscribers."""

from __future__ import annotations

import json
import time

import pytest

from pipeline.phases import Allowance, HostClock, Mark, Phase, PhaseMarks, data_wait_fraction


def test_subscribers_see_the_current_mark_then_every_mark_and_tick_until_they_leave() -> None:
    now = [100.0]
    marks = PhaseMarks(wall=lambda: now[0])
    first: list[Mark] = []
    second: list[Mark] = []
    leave_first = marks.subscribe(first.append)
    assert first == [Mark(0, 0, "start", 100.0)]  # at once: the phase in progress (the profiler's first range)
    now[0] = 101.0
    marks.enter("data", 3)
    marks.subscribe(second.append)
    now[0] = 102.0
    marks.tick()  # progress, no mark
    marks.tick("checkpoint")  # a phase only this rank is in: still no mark
    leave_first()
    marks.enter("checkpoint-sync")  # the step carries over from the last mark that named one
    assert first == [
        Mark(0, 0, "start", 100.0),
        Mark(1, 3, "data", 101.0),
        Mark(1, 3, "data", 102.0),
        Mark(1, 3, "checkpoint", 102.0),
    ]
    assert second == [
        Mark(1, 3, "data", 101.0),
        Mark(1, 3, "data", 102.0),
        Mark(1, 3, "checkpoint", 102.0),
        Mark(2, 3, "checkpoint-sync", 102.0),
    ]
    assert marks.current == second[-1]
    with pytest.raises(AttributeError):
        marks.current.seq = 5  # type: ignore[misc]  # a record replaced whole, never edited in place
    with pytest.raises(ValueError, match="unknown phase 'forwards'"):
        marks.enter("forwards")  # a misspelt phase would get an allowance nobody chose
    assert marks.current.seq == 2


def test_phase_names_and_their_allowances() -> None:
    assert Phase.GRADIENT_SYNC == "gradient-sync" and json.dumps(Phase.DATA) == '"data"'
    allowance = Allowance(step_s=10, slow_s=60)
    slow = {p for p in Phase if allowance.for_phase(p) == 60}
    assert slow == {"start", "loader", "checkpoint", "compile"}  # a save's collectives are judged like a step's
    assert allowance.for_phase("checkpoint-sync") == 10 and allowance.for_phase("validation") == 10
    assert data_wait_fraction({"data": 1.0, "forward": 3.0, "validation": 50.0}) == 0.25
    assert data_wait_fraction({}) == 0.0


def test_phase_seconds_and_marker_count_on_a_fake_clock() -> None:
    """The seconds per phase (what the straggler figures are made of) and one marker per ``enter``; each
    reader's window counts from its own last look."""
    clock = [0.0]
    marks = PhaseMarks()
    marks.use_clock(HostClock(lambda: clock[0]))  # the host clock a CPU run uses, on a fake time
    log_window = marks.window()
    for at, phase in [(1.0, "data"), (3.5, "forward"), (3.75, "data")]:
        clock[0] = at
        marks.enter(phase, 7)
    clock[0] = 4.0
    assert marks.take_seconds() == {"start": 1.0, "data": 2.75, "forward": 0.25}
    assert (marks.current.seq, marks.current.step, marks.current.phase) == (3, 7, "data")
    clock[0] = 6.0
    phases = []
    for _ in marks.ticking([1, 2, 3], "validation"):  # one marker when the first batch arrives, then ticks
        phases.append(marks.current.phase)
        clock[0] += 0.5
    assert phases == ["validation"] * 3 and marks.current.seq == 4
    assert marks.take_seconds() == {"data": 2.0, "validation": 1.5}
    assert log_window.take() == {"start": 1.0, "data": 4.75, "forward": 0.25, "validation": 1.5}
    assert marks.seconds() == {"start": 1.0, "data": 4.75, "forward": 0.25, "validation": 1.5}


def test_markers_are_the_same_sequence_on_every_rank() -> None:
    """Ranks that get different numbers of validation batches still enter the same markers (the culprit is
    the rank with the fewest), and the first training batch counts as the pipeline's start-up."""
    marks = [PhaseMarks(), PhaseMarks()]
    for rank, m in enumerate(marks):
        phases = []
        for _ in m.iterate([1, 2], "data", first="loader"):
            phases.append(m.current.phase)
        assert phases == ["loader", "data"]
        before = m.current.progress_at
        time.sleep(0.01)
        list(m.ticking(range(rank * 3), "validation"))  # rank 0: no batches, rank 1: three
        assert m.current.phase == "validation" and m.current.progress_at > before
    assert marks[0].current.seq == marks[1].current.seq
    seconds = marks[1].take_seconds()
    assert set(seconds) >= {"start", "loader", "data", "validation"} and marks[1].take_seconds().keys() <= {
        "validation"
    }
