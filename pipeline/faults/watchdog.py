"""Progress watchdog: names the rank a hung job waits for, dumps every live rank's stacks, ends the attempt.

A rank stuck in a storage read, a wedged driver or a stopped process does not crash: the other ranks
wait in a collective until the process group's timeout, and nothing names the culprit. Here:

- the trainer marks its phases (``pipeline.phases``: data, forward, backward, gradient-sync, step,
  control, validation, validation-sync, checkpoint, checkpoint-sync ...); the watchdog subscribes to
  them, which costs each mark one attribute assignment;
- a thread on every rank publishes the rank's last mark and a heartbeat to
  ``RUN_DIR/progress/rank-N.json`` every ``beat_s`` (the run directory is shared by all ranks; the
  rendezvous store is not used: under env:// it lives in rank 0, which may be the stuck one),
  and a changed state within a fifth of that;
- when its own rank has made no progress for the phase's allowance, the thread reads every rank's
  record. Only if no rank has made progress within its allowance is it a hang. The culprit is the
  rank whose heartbeat stopped (the process cannot run Python: stopped, or stuck in the kernel with
  the interpreter lock held), else the rank that is behind in the sequence of marks (by the rule
  stated in ``pipeline.phases``, the one that entered fewer is the one the others wait for). The
  lowest healthy rank logs one line naming it; every rank that can run Python writes its stacks
  (``faulthandler``, all threads) to ``RUN_DIR/hangs/<time>/rank-N.txt`` and exits with ``HANG_EXIT``
  at once, without waiting for the collective, so that torchrun's ``--max-restarts`` (or the Slurm
  script's requeue) restarts the job from its newest checkpoint;
- when no rank's process is stopped, the nodes first check that they reach each other
  (``pipeline.faults.reach``): the line names the rank pairs that cannot talk, ``hangs/<time>/hang.json``
  (the verdict, for scripts) names the unreachable nodes, and each node's lowest rank asks its
  launcher to end instead of restarting (``on_cut``): a restart would wait for a node it cannot reach.

Records of an earlier attempt (a restart reuses the run directory) carry another ``attempt`` token
and are ignored. Timestamps are wall-clock times: across nodes they assume NTP-synchronised clocks
(an offset of seconds against allowances of minutes is harmless).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from basics import procfs
from basics.files import atomic_output, write_json_atomic
from pipeline.faults import reach
from pipeline.phases import Allowance, Mark, PhaseMarks
from pipeline.run_dir import RunDir

log = logging.getLogger("alexnet")

HANG_EXIT = 75  # EX_TEMPFAIL: "try again", what the launcher's restart does
VERDICT = "hang.json"  # in each hang folder, by the reporting rank


@dataclass(frozen=True)
class Record:
    rank: int
    host: str
    pid: int
    attempt: str
    seq: int
    step: int
    phase: str
    progress_at: float
    beat_at: float
    node: str = ""  # the scheduler's node name (pipeline.faults.reach.node_name)
    addr: str = ""  # HOST:PORT of the rank's reachability listener ("" without one)

    @classmethod
    def read(cls, path: Path) -> Record | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # not there yet, or a half-visible write on a weak file system: next beat


@dataclass(frozen=True)
class Verdict:
    culprits: list[Record]  # empty: every rank waits and none is behind (a collective hangs everywhere)
    silent: set[int]  # ranks whose heartbeat stopped: they cannot write their stacks
    records: dict[int, Record]
    stuck_s: float

    def folder_name(self) -> str:
        """The same on every rank: from records every rank reads alike."""
        anchor = self.culprits or list(self.records.values())
        at = min(r.progress_at for r in anchor)
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(at))


def judge(
    records: dict[int, Record], world_size: int, now: float, allowance: Allowance, stale_s: float
) -> Verdict | None:
    """A verdict when no rank has made progress within its allowance, else None."""
    silent = {r for r, rec in records.items() if now - rec.beat_at > stale_s}
    for rank in range(world_size):
        rec = records.get(rank)
        if rec is None:
            return None  # not yet started in this attempt: the rendezvous/collective timeouts own that case
        # A process that cannot run Python is not writing a slow checkpoint, and the ranks waiting for it
        # in the checkpoint's collective are not either: with a silent rank the step allowance applies.
        limit = allowance.step_s if silent else allowance.for_phase(rec.phase)
        if now - rec.progress_at < limit:
            return None
    if silent:
        culprits = [records[r] for r in sorted(silent)]
    else:
        least = min(rec.seq for rec in records.values())
        behind = [records[r] for r in sorted(records) if records[r].seq == least]
        culprits = behind if len(behind) < len(records) else []
    stuck_s = now - max(rec.progress_at for rec in records.values())
    return Verdict(culprits, silent, records, stuck_s)


class Watchdog:
    """The monitor thread of one rank (see the module docstring)."""

    def __init__(
        self,
        run_dir: str | Path,
        rank: int,
        world_size: int,
        attempt: str,
        marks: PhaseMarks,
        allowance: Allowance,
        exit_process: Callable[[int], Any] = os._exit,
        on_cut: Callable[[str], Any] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.rank, self.world_size, self.attempt = rank, world_size, attempt
        self.marks, self.allowance = marks, allowance
        self._clock = clock  # wall time, as the marks' progress_at (tests pass a fake one with the marks')
        self._mark: Mark  # the rank's latest mark, kept up to date by the subscription (from now on)
        self._unsubscribe = marks.subscribe(self._seen)
        self.progress_dir = RunDir(run_dir).progress
        self.hangs_dir = RunDir(run_dir).hangs
        # A beat often enough that a stopped heartbeat shows well within the allowance, rarely enough to
        # cost nothing on a shared file system (one small file per rank every 10 s at the defaults).
        self.beat_s = min(max(allowance.step_s / 10, 0.2), 10.0)
        # A changed state is published within a fifth of a beat (what the report calls "last seen" is then
        # at most that old); an unchanged one once a beat (the heartbeat).
        self.poll_s = self.beat_s / 5
        self.stale_s = max(3 * self.beat_s, 2.0)
        self._published: tuple[Mark | None, float] = (None, 0.0)
        self.host, self.pid, self.node = socket.gethostname(), os.getpid(), reach.node_name()
        self.listener: reach.Listener | None = None
        self._exit = exit_process
        self._on_cut = on_cut  # called with a reason on each node's lowest rank when nodes cannot talk
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-watchdog", daemon=True)

    def start(self) -> Watchdog:
        try:
            self.listener = self.listener or reach.Listener()
        except OSError as e:  # the hang line then says nothing about the network
            log.warning("progress watchdog: no reachability listener (%s)", e)
        self.progress_dir.mkdir(parents=True, exist_ok=True)
        self._publish()
        self._thread.start()
        return self

    def _seen(self, mark: Mark) -> None:
        """The marks' listener (the training thread): one assignment, read by the watchdog's thread."""
        self._mark = mark

    def close(self) -> None:
        self._unsubscribe()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.beat_s + 5)
        if self.listener is not None:
            self.listener.close()

    # -- the thread

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                mark, at = self._published
                if mark is not self._mark or time.monotonic() - at >= self.beat_s:
                    self._publish()
                verdict = self.check()
            except OSError as e:  # a shared file system hiccup must not end training
                log.warning("progress watchdog: %s", e)
                continue
            if verdict is not None and not self._stop.is_set():
                self.act(verdict)

    def _publish(self) -> None:
        mark = self._mark
        addr = self.listener.addr if self.listener is not None else ""
        record = Record(
            self.rank,
            self.host,
            self.pid,
            self.attempt,
            mark.seq,
            mark.step,
            mark.phase,
            mark.progress_at,
            self._clock(),
            self.node,
            addr,
        )
        # peers poll this every second; it matters only while the run lives, so no fsync
        write_json_atomic(self.progress_dir / f"rank-{self.rank}.json", vars(record), durable=False, indent=None)
        self._published = (mark, time.monotonic())

    def check(self) -> Verdict | None:
        """Cheap while this rank progresses: peers' records are read only when it has not."""
        if self._clock() - self._mark.progress_at < self.allowance.step_s:
            return None
        return judge(self.read_records(), self.world_size, self._clock(), self.allowance, self.stale_s)

    def read_records(self) -> dict[int, Record]:
        records = {}
        for rank in range(self.world_size):
            rec = Record.read(self.progress_dir / f"rank-{rank}.json")
            if rec is not None and rec.attempt == self.attempt:
                records[rank] = rec
        return records

    def act(self, verdict: Verdict) -> None:
        """Stacks to the hang folder, the report line (lowest healthy rank), then exit at once."""
        folder = self.hangs_dir / verdict.folder_name()
        folder.mkdir(parents=True, exist_ok=True)
        stacks = folder / f"rank-{self.rank}.txt"
        with atomic_output(stacks, durable=False) as tmp, tmp.open("w") as f:
            me = verdict.records.get(self.rank)
            if me is not None:
                f.write(f"rank {self.rank} host {self.host} pid {self.pid}: phase {me.phase} step {me.step}\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        healthy = [r for r in range(self.world_size) if r not in verdict.silent and r not in _ranks(verdict.culprits)]
        reporter = min(healthy) if healthy else self.rank
        peers = reach.nodes_of(verdict.records)
        prober = self.node in peers and peers[self.node].rank == self.rank
        # A stopped process explains the hang by itself; otherwise the network may. The reporter needs the
        # conclusion for its line, each node's prober for its launcher; the other ranks exit at once.
        needed = prober or self.rank == reporter
        cut = self.check_network(folder, peers, prober) if needed and not verdict.silent else None
        if self.rank == reporter:
            line = self.report(verdict, folder, cut)
            log.error("%s", line)
            write_verdict(folder / VERDICT, verdict, cut, line)
        if cut is not None and cut.named and prober and self._on_cut is not None:
            self._on_cut(f"{', '.join(p.node for p in cut.named)} and the other nodes cannot reach each other")
        if self.rank != reporter:
            self.await_report(folder)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        sys.stderr.flush()
        self._exit(HANG_EXIT)

    def await_report(self, folder: Path) -> bool:
        """Wait (bounded) until the reporting rank has written its verdict, before this rank exits.

        A launcher ends every rank of the group as soon as one exits: a rank that left first could have the
        reporter killed before its line was written (seen in the chaos campaign: a stopped rank named by no
        line, no hang.json). The reporter reaches the same verdict within a beat or two of this rank, plus a
        network probe; a reporter that never writes (it died too) costs this rank that long, once."""
        deadline = time.monotonic() + reach.PROBE_S + 3 * self.beat_s + 5
        while not (folder / VERDICT).exists():
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.1, self.poll_s))
        return True

    def check_network(self, folder: Path, peers: dict[str, reach.Peer], prober: bool) -> reach.Cut | None:
        """Probe the other nodes (this node's lowest rank), then read every node's findings: they arrive
        within a probe plus the ranks' spread in reaching the verdict (a poll, a beat's staleness)."""
        if len(peers) < 2:
            return None
        if prober:
            targets = {p.rank: p.addr for p in peers.values() if p.node != self.node and p.addr}
            reach.write_findings(folder, peers[self.node], reach.probe(targets))
        deadline = time.monotonic() + reach.PROBE_S + 2 * self.beat_s + 2
        found = reach.read_findings(folder, peers)
        while found.keys() < peers.keys() and time.monotonic() < deadline:
            time.sleep(0.1)
            found = reach.read_findings(folder, peers)
        return reach.conclude(peers, found, min(peers.values(), key=lambda p: p.rank).node)

    def report(self, verdict: Verdict, folder: Path, cut: reach.Cut | None = None) -> str:
        stuck = f"no progress on any rank for {verdict.stuck_s:.0f} s"
        if not verdict.culprits:
            rec = verdict.records[min(verdict.records)]
            who = f"no rank is behind: all wait in phase {rec.phase} at step {rec.step} (a collective hangs)"
        else:
            who = "; ".join(self._describe(rec, verdict) for rec in verdict.culprits)
        if cut is not None and cut.pairs:
            who += f"; {cut.describe()}"
        then = f"exiting with code {HANG_EXIT} so the launcher restarts from the last checkpoint"
        if cut is not None and cut.named:
            nodes = ", ".join(p.node for p in cut.named)
            then = (
                f"exiting with code {HANG_EXIT}; the launchers end instead of restarting (a restart would wait "
                f"for {nodes}); {folder / VERDICT} names {nodes} for a requeue without it"
            )
        return f"hang: {who}; {stuck}; stacks of every rank that can run Python in {folder}/rank-N.txt; {then}"

    def _describe(self, rec: Record, verdict: Verdict) -> str:
        text = (
            f"rank {rec.rank} (host {rec.host}, pid {rec.pid}) last seen in phase {rec.phase} at step {rec.step} "
            f"{self._clock() - rec.progress_at:.0f} s ago"
        )
        if rec.rank in verdict.silent:
            state = procfs.state(rec.pid) if rec.host == self.host else None
            text += (
                f", not running Python for {self._clock() - rec.beat_at:.0f} s"
                + (f" (process state {state})" if state else "")
                + ": stopped or stuck in the kernel, no stack from it"
            )
        return text


def write_verdict(path: Path, verdict: Verdict, cut: reach.Cut | None, line: str) -> None:
    """The verdict for scripts: culprits, the unreachable nodes (``sbatch --exclude``), the pairs, the line."""

    def rank(rec: Record) -> dict[str, Any]:
        return {k: getattr(rec, k) for k in ("rank", "node", "host", "pid", "phase", "step")}

    data = {
        "culprits": [rank(r) for r in verdict.culprits],
        "silent": sorted(verdict.silent),
        "unreachable": cut.as_json() if cut is not None else [],
        "pairs": [
            {"from_rank": a.rank, "from_node": a.node, "to_rank": b.rank, "to_node": b.node, "addr": b.addr, "why": w}
            for a, b, w in (cut.pairs if cut is not None else [])
        ],
        "probed_from": cut.reported if cut is not None else [],
        "line": line,
    }
    write_json_atomic(path, data)


def _ranks(records: list[Record]) -> set[int]:
    return {r.rank for r in records}
