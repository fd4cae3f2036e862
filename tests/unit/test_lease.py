"""pipeline.faults.lease: one writer per run directory (no Slurm, no torch in the lease itself).

A second writer is refused with one line naming the holder; the same job (a requeue, an elastic
restart) takes over; a stale lease (old heartbeat, or a holder that is gone) is taken with a warning
and the old holder learns it at its next heartbeat; of several racing takers exactly one wins.
The end-to-end cases on real Slurm are in tests/integration/test_slurm_train.py and tests/integration/test_submit.py.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.faults import lease as lease_mod
from pipeline.faults.lease import LEASE_NAME, Holder, Lease, LeaseHeld, LeaseLost
from tests.support import PYTHON, REPO, flags
from tests.support.lease import MINUTE, _foreign_lease, remote
from tests.support.processes import small_env


def age_heartbeat(run_dir: Path, seconds: float) -> None:
    """Pretend the holder's last heartbeat was `seconds` ago (as an unlucky hang would leave it)."""
    path = run_dir / LEASE_NAME
    record = json.loads(path.read_text())
    record["heartbeat"] -= seconds
    record["started"] -= seconds
    path.write_text(json.dumps(record))


def test_second_writer_is_refused_with_one_line_naming_the_holder(tmp_path: Path) -> None:
    first = Lease.take(tmp_path / "run", remote("slurm:far:7"), timeout_s=30 * MINUTE)
    with pytest.raises(LeaseHeld) as err:
        Lease.take(tmp_path / "run", remote("slurm:far:8", "Slurm job 8"), timeout_s=30 * MINUTE)
    message = str(err.value)
    assert "\n" not in message
    assert f"{tmp_path / 'run'} is being written by Slurm job 7 on cluster far" in message
    assert "scancel 7" in message and "another --run-dir" in message and "30 min" in message
    # The refused taker changed nothing: the first writer still holds it and can beat and release.
    first.heartbeat(force=True)
    assert json.loads((tmp_path / "run" / LEASE_NAME).read_text())["token"] == first.token
    first.release()
    assert not (tmp_path / "run" / LEASE_NAME).exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no temporary files left behind


def test_the_same_job_takes_over_and_the_old_incarnation_learns_it(tmp_path: Path, caplog) -> None:
    old = Lease.take(tmp_path, remote("slurm:c:42", "Slurm job 42"), timeout_s=30 * MINUTE)
    with caplog.at_level(logging.INFO, logger="alexnet"):
        new = Lease.take(tmp_path, remote("slurm:c:42", "Slurm job 42"), timeout_s=30 * MINUTE)
    assert "takes over from its previous incarnation" in caplog.text
    assert new.token != old.token
    with pytest.raises(LeaseLost, match="now held by Slurm job 42"):
        old.heartbeat(force=True)
    old.release()  # not its lease any more: left alone
    assert json.loads((tmp_path / LEASE_NAME).read_text())["token"] == new.token


def test_a_stale_lease_is_taken_with_a_warning(tmp_path: Path, caplog) -> None:
    hung = Lease.take(tmp_path, remote("slurm:far:7"), timeout_s=5 * MINUTE)
    with pytest.raises(LeaseHeld):
        Lease.take(tmp_path, remote("slurm:far:8", "Slurm job 8"), timeout_s=MINUTE)
    age_heartbeat(tmp_path, 6 * MINUTE)  # its timeout (5 min), not the taker's (1 min), decides
    with caplog.at_level(logging.WARNING, logger="alexnet"):
        taker = Lease.take(tmp_path, remote("slurm:far:8", "Slurm job 8"), timeout_s=MINUTE)
    assert "takes over a stale lease (no heartbeat for 6 min, timeout 5 min)" in caplog.text
    assert caplog.records[-1].levelno == logging.WARNING
    with pytest.raises(LeaseLost, match="now held by Slurm job 8"):
        hung.heartbeat(force=True)
    taker.release()


def test_a_lease_of_a_process_that_died_here_is_free_at_once(tmp_path: Path, caplog) -> None:
    code = (
        "import os, sys; from pipeline.faults.lease import Lease, Holder; "
        "Lease.take(sys.argv[1], Holder.from_environ({}), timeout_s=3600); os._exit(9)"
    )
    subprocess.run([PYTHON, "-c", code, str(tmp_path)], cwd=REPO, env=small_env(), check=False, timeout=60)
    record = json.loads((tmp_path / LEASE_NAME).read_text())
    assert record["holder"].startswith("process ") and record["pid"] != os.getpid()
    with caplog.at_level(logging.WARNING, logger="alexnet"):
        Lease.take(tmp_path, Holder.from_environ({}), timeout_s=3600).release()
    assert f"process {record['pid']} on {record['host']} has ended" in caplog.text


def test_a_live_process_keeps_its_lease_and_a_reused_pid_does_not(tmp_path: Path) -> None:
    mine = Lease.take(tmp_path, Holder.from_environ({}), timeout_s=3600)  # this process: alive
    with pytest.raises(LeaseHeld, match=f"process {os.getpid()} on"):
        lease_mod.check(tmp_path, remote("someone:else"))
    record = json.loads((tmp_path / LEASE_NAME).read_text())
    record["probe_start"] = "1"  # the same pid, but started at another time: a reused pid
    (tmp_path / LEASE_NAME).write_text(json.dumps(record))
    assert "has ended" in lease_mod.stale_reason(record)
    mine.release()


@pytest.mark.parametrize(
    "state, free",
    [
        ("RUNNING", False),
        ("PENDING", False),
        ("COMPLETING", False),
        ("CANCELLED", True),
        ("UNKNOWN_JOB", True),
        (None, False),
    ],
)
def test_a_slurm_holder_is_free_once_slurm_says_its_job_ended(
    tmp_path: Path, state: str | None, free: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = []
    monkeypatch.setattr(lease_mod, "_slurm_job_state", lambda job, cluster: asked.append((job, cluster)) or state)
    env = {"SLURM_JOB_ID": "31", "SLURM_CLUSTER_NAME": "alexnet-local"}
    Lease.take(tmp_path, Holder.from_environ(env), timeout_s=3600)
    if free:
        Lease.take(tmp_path, remote("slurm:alexnet-local:32"), timeout_s=3600)
    else:
        with pytest.raises(LeaseHeld, match="Slurm job 31 on cluster alexnet-local .*scancel 31"):
            Lease.take(tmp_path, remote("slurm:alexnet-local:32"), timeout_s=3600)
    assert asked == [("31", "alexnet-local")]


def test_slurm_state_is_only_asked_of_the_holders_own_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "here")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("asked Slurm about another cluster's job"))
    assert lease_mod._slurm_job_state("5", "elsewhere") is None


def test_holder_identity_survives_restarts_and_tells_jobs_apart() -> None:
    slurm = Holder.from_environ({"SLURM_JOB_ID": "5", "SLURM_CLUSTER_NAME": "c", "SLURM_RESTART_COUNT": "2"}, pid=1)
    assert slurm.key == Holder.from_environ({"SLURM_JOB_ID": "5", "SLURM_CLUSTER_NAME": "c"}, pid=2).key
    assert slurm.key != Holder.from_environ({"SLURM_JOB_ID": "6", "SLURM_CLUSTER_NAME": "c"}, pid=1).key
    assert slurm.stop_hint == "scancel 5" and slurm.probe_pid is None
    # torchrun: an elastic restart has new worker pids but the same agent (and rendezvous id)
    default = {"TORCHELASTIC_RUN_ID": "none"}
    assert (
        Holder.from_environ(default, pid=10, parent_pid=9).key == Holder.from_environ(default, pid=11, parent_pid=9).key
    )
    assert (
        Holder.from_environ(default, pid=10, parent_pid=9).key != Holder.from_environ(default, pid=10, parent_pid=8).key
    )  # another torchrun, same default id
    named = Holder.from_environ({"TORCHELASTIC_RUN_ID": "abc"}, pid=10, parent_pid=9)
    assert named.key == "torchrun:abc" and named.probe_pid == 9
    assert Holder.from_environ({}, pid=10).key != Holder.from_environ({}, pid=11).key


def _race(run_dir: str, i: int, barrier, results) -> None:  # a racing taker (in a forked process)
    barrier.wait()
    try:
        Lease.take(run_dir, remote(f"job:{i}", f"job {i}"), timeout_s=3600)
        results.put(("won", i))
    except LeaseHeld:
        results.put(("refused", i))
    except BaseException as e:
        results.put((repr(e), i))


@pytest.mark.parametrize("start", ["empty", "stale"])
def test_of_racing_takers_exactly_one_wins(tmp_path: Path, start: str) -> None:
    ctx = multiprocessing.get_context("fork")
    takers = 5
    for round_ in range(4):
        run_dir = tmp_path / f"round{round_}"
        if start == "stale":
            Lease.take(run_dir, remote("job:dead"), timeout_s=60)
            age_heartbeat(run_dir, 3600)
        barrier, results = ctx.Barrier(takers), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(run_dir), i, barrier, results)) for i in range(takers)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(60)
        assert sorted(o for o, _ in outcomes) == ["refused"] * (takers - 1) + ["won"], outcomes
        (winner,) = [i for o, i in outcomes if o == "won"]
        assert json.loads((run_dir / LEASE_NAME).read_text())["key"] == f"job:{winner}"
        assert [p.name for p in run_dir.iterdir()] == [LEASE_NAME]  # nothing left aside


def test_a_lease_that_changed_after_it_was_judged_is_not_replaced(tmp_path: Path) -> None:
    """The compare-and-swap under a stale takeover: a heartbeat between judging and moving wins."""
    holder = Lease.take(tmp_path, remote("a"), timeout_s=60)
    judged = json.loads((tmp_path / LEASE_NAME).read_text())
    time.sleep(0.01)
    holder.heartbeat(force=True)  # the holder was alive after all
    taker = lease_mod._record(remote("b"), "t", 60, time.time(), time.time())
    assert lease_mod._replace(tmp_path / LEASE_NAME, judged, taker) is False
    assert json.loads((tmp_path / LEASE_NAME).read_text())["token"] == holder.token
    assert [p.name for p in tmp_path.iterdir()] == [LEASE_NAME]


def test_heartbeat_is_rate_limited_and_refreshes_the_file(tmp_path: Path) -> None:
    lease = Lease.take(tmp_path, remote("a"), timeout_s=600)
    before = json.loads((tmp_path / LEASE_NAME).read_text())["heartbeat"]
    lease.heartbeat()  # within timeout/10 of the take: nothing written
    assert json.loads((tmp_path / LEASE_NAME).read_text())["heartbeat"] == before
    time.sleep(0.05)
    lease.heartbeat(force=True)
    record = json.loads((tmp_path / LEASE_NAME).read_text())
    assert record["heartbeat"] > before and record["started"] == lease.started


def test_absurd_timeout_and_unreadable_lease(tmp_path: Path) -> None:
    with pytest.raises(lease_mod.UserError, match="must be positive"):
        Lease.take(tmp_path, remote("a"), timeout_s=0)
    (tmp_path / LEASE_NAME).write_text("not json at all")  # a hand-edited or truncated lease
    assert lease_mod.stale_reason({}) == "unreadable lease"
    Lease.take(tmp_path, remote("a"), timeout_s=60).release()
    assert not (tmp_path / LEASE_NAME).exists()


def test_without_hard_links_exclusive_create_still_admits_one(tmp_path: Path, monkeypatch) -> None:
    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")  # EPERM: what some FUSE/SMB mounts say

    monkeypatch.setattr(os, "link", no_links)
    first = Lease.take(tmp_path, remote("a"), timeout_s=60)
    with pytest.raises(LeaseHeld):
        Lease.take(tmp_path, remote("b"), timeout_s=60)
    first.release()
    assert [p.name for p in tmp_path.iterdir()] == []


# ------------------------------------------------------------------------------- the entry points


def test_check_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    argv = [PYTHON, *flags("-m pipeline.faults.lease check {}", tmp_path)]
    assert subprocess.run(argv, cwd=REPO, env=small_env(), capture_output=True, timeout=60).returncode == 0
    _foreign_lease(tmp_path)
    proc = subprocess.run(argv, cwd=REPO, env=small_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {tmp_path} is being written by Slurm job 7 on cluster far")


def test_a_full_disk_neither_stops_training_at_a_heartbeat_nor_leaves_files(
    tmp_path: Path, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = Lease.take(tmp_path, remote("a"), timeout_s=600)

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with caplog.at_level(logging.WARNING, logger="alexnet"):
        lease.heartbeat(force=True)  # warned, not raised: the next beat retries
    assert "could not refresh the writer lease" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [LEASE_NAME]  # no half-written temporary file
    monkeypatch.undo()
    lease.release()
    assert list(tmp_path.iterdir()) == []
