"""pipeline.faults.crashes: which attempts' crashes make a crash that repeats (the journal read in-process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from pipeline.faults import crashes


def _crash(message: str) -> BaseException:
    try:
        raise RuntimeError(message)
    except RuntimeError as e:
        return e


def _attempt(run_dir: Path, monkeypatch: pytest.MonkeyPatch, restart: int, *errors: tuple[int, BaseException]) -> None:
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))
    crashes.record_start(run_dir)
    for rank, (step, error) in enumerate(errors):
        crashes.record_crash(run_dir, error, step=step, rank=rank)


@pytest.fixture
def job(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    return monkeypatch


def test_the_same_error_at_the_same_step_twice_repeats(tmp_path: Path, job: pytest.MonkeyPatch) -> None:
    _attempt(tmp_path, job, 0, (5, _crash("bad shape 3 at 0x7f00")))
    assert crashes.repeated(tmp_path) is None  # once is bad luck
    _attempt(tmp_path, job, 1, (5, _crash("bad shape 3 at 0x7f80")))  # the numbers differ: still the same
    found = crashes.repeated(tmp_path)
    assert found is not None and found.step == 5 and "RuntimeError: bad shape 3 at 0x7f80" in found.line()
    assert crashes.repeated(tmp_path, this=crashes.attempt_id()) is None  # this attempt is not one of the two
    job.setenv("SLURM_JOB_ID", "78")
    assert crashes.repeated(tmp_path) is None  # a new job starts afresh


PEER_GONE = "Connection closed by peer [127.0.0.1]:5"


@pytest.mark.parametrize(
    "first, second",
    [
        ((5, _crash("bad shape 3")), (6, _crash("bad shape 3"))),  # another step
        ((5, _crash("bad shape 3")), (5, _crash("another message"))),  # another error
        ((5, dist.DistBackendError(PEER_GONE)), (5, dist.DistBackendError(PEER_GONE))),  # what a peer's death is
    ],
)
def test_another_step_another_error_or_a_peers_death_do_not(
    tmp_path: Path, job: pytest.MonkeyPatch, first: tuple[int, BaseException], second: tuple[int, BaseException]
) -> None:
    _attempt(tmp_path, job, 0, first)
    _attempt(tmp_path, job, 1, second)
    assert crashes.repeated(tmp_path) is None


def test_an_attempt_between_that_did_not_crash_resets_it(tmp_path: Path, job: pytest.MonkeyPatch) -> None:
    _attempt(tmp_path, job, 0, (5, _crash("x")))
    _attempt(tmp_path, job, 1)  # a hang, a preemption: no crash record
    _attempt(tmp_path, job, 2, (5, _crash("x")))
    assert crashes.repeated(tmp_path) is None
    (tmp_path / "crashes.jsonl").open("a").write('{"crash": "77/0/2", "cut sh')  # a kill mid-line is skipped
    assert crashes.main(["check", str(tmp_path)]) == 0
