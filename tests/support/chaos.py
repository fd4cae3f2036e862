"""A seeded chaos campaign: one training run on four emulated nodes, a random sequence of faults, then proof
that nothing was lost (no pytest here; ``make chaos`` and tests/integration/test_chaos.py run it).

    python -m tests.support.chaos --seed 7 --faults kill-rank,stop-rank,link-cut,preempt --out /tmp/chaos

The nodes are a :class:`~tests.support.netns.NodeGroup` (network namespaces on one bridge, 10.231.9.0/24),
one torchrun per node (``--nnodes 4 --nproc-per-node 1 --max-restarts``), dp 4 x tp 1, the narrow model on
the demo data, each rank :mod:`tests.support.chaos_rank` (the harness plus the campaign's hooks). The seed
draws which faults strike, in which order, at which training step (``--faults``: the kinds to draw from;
each drawn once, more with ``--count``); the campaign waits for that step (a state, never a duration),
injects, and goes on. A job that ends unfinished (a preemption) is started again, as a requeue would (the
same torchrun run id, Slurm's requeue count one higher); a job that a repeating crash stopped is started as a
new job (a new run id) once the bug is "fixed", as its user would.

Then it checks, and says so in one line each (``chaos: ok ...`` / ``chaos: FAILED ...``):
  * the run finished (every rank returned from the trainer, not preempted, at the last step);
  * every epoch trained on every sample exactly once (``samples/rank-N.jsonl``, the final trajectory's);
  * the final weights equal an uninterrupted run's on the same layout, when no fault that changes the
    trajectory struck (a rollback does: then only completion and accounting are checked);
  * every fault was named in the logs by the line its kind expects (:attr:`Fault.expect`).

The catalogue (:data:`CATALOGUE`): a fault is a small class, ``inject(campaign)`` acts and returns the
regular expression of the line that must name it, a line the training code writes (never the campaign).
The default campaign draws from every kind (:data:`DEFAULT_KINDS`).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tests.support import NARROW, PYTHON, REPO, flags, processes
from tests.support.netns import Node, NodeGroup
from tests.support.processes import children, cmdline, descendants, small_env

RANK_SCRIPT = str(REPO / "tests" / "support" / "chaos_rank.py")
NODES = 4
SUBNET = "10.231.9"  # the group's private /24 (tests/support/netns.py's pair uses 10.231.7)
LOCK = "/tmp/alexnet-chaos.lock"  # one campaign at a time on a machine (they would share its cores)
RDZV_PORT = 29531  # inside the namespaces only
EPOCHS, BATCH = 3, 16  # the global batch (4 a rank); demo data: 94 training samples, 6 steps an epoch, 18 in all
HANG_S = 20  # --faults.hang.timeout: a stopped rank or a cut link is named this long after it happened
# Not bit-exact: after a restart DDP rebuilds its gradient buckets, and a bucket's layout decides which rank
# starts each element's sum in gloo's ring all-reduce; a few ulps (measured 6e-9) after 18 steps.
WEIGHTS_TOLERANCE = 1e-6
SLOW_S = 0.6  # a slow rank's extra seconds a batch
RUN_ARGS = [
    *NARROW,
    *flags("--tp 1 --model.dropout 0 --lr 0.01 --train.ten-crop false --data.workers 1"),
    *flags("--batch-size {} --epochs {}", BATCH, EPOCHS),
    *flags("--checkpoint.every-minutes 0 --checkpoint.every-steps 2 --faults.hang.timeout {}", HANG_S),
    *flags("--train.control-every 1 --faults.stragglers.window 3"),  # a fault is seen at the next step
]


# --------------------------------------------------------------------------------------------
# The fault catalogue


@dataclass
class Fault:
    """One kind of fault. ``changes_trajectory``: the run then legitimately trains other weights than an
    uninterrupted one (a rollback), so only completion and accounting are compared."""

    changes_trajectory: ClassVar[bool] = False
    room: ClassVar[int] = 4  # the steps past the one it is injected at that the run may train while it acts
    kind: str = ""
    step: int = 0  # the global training step at which the campaign injects it (drawn from the seed)
    target: int = 0  # which rank or node (drawn from the seed)
    expect: str = ""  # the regular expression of the line naming it (set by inject)

    def inject(self, c: Campaign) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind} at step {self.step} on rank/node {self.target}"


class KillRank(Fault):
    """SIGKILL of one training process: its torchrun restarts the group, which resumes from ``latest``."""

    def inject(self, c: Campaign) -> str:
        pid = c.rank_pid(self.target)
        os.kill(pid, signal.SIGKILL)
        c.release()
        c.wait_restart()
        return rf"exitcode: -9\) local_rank: 0 \(pid: {pid}\)"


class KillLauncher(Fault):
    """SIGKILL of a node's torchrun and of what it started (the node is lost). Another node's launcher: the
    campaign starts the node's torchrun again (a replacement node), which joins the survivors' next
    rendezvous. The first node's: it hosted the rendezvous store, so the survivors' torchruns fail too (one
    `RendezvousConnectionError` each) and the campaign starts the whole job again (a requeue)."""

    def inject(self, c: Campaign) -> str:
        launcher = c.launchers[self.target]
        for pid in [launcher.pid, *descendants(launcher.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait()
        c.release()
        if self.target == 0:
            c.wait_for(c.job_over, 300, "the other launchers' end without their store")
            c.start_job()
            c.wait_trained()
            return r"RendezvousConnectionError: The connection to the C10d store has failed"
        c.start_node(self.target)
        c.wait_trained()
        # On main only gloo's error in the survivors' tracebacks names the lost node (by its address); the node
        # ledger of issue 37 is to name it in a line of its own.
        addr = re.escape(c.group.nodes[self.target].addr)
        return rf"(Connection closed by peer|Connection reset by peer|Read error) \[{addr}\]"


class StopRank(Fault):
    """SIGSTOP of one training process: the others' watchdog names it (state T) after --faults.hang.timeout
    and ends the group, which torchrun restarts (SIGKILL reaches a stopped process)."""

    def inject(self, c: Campaign) -> str:
        pid = c.rank_pid(self.target)
        os.kill(pid, signal.SIGSTOP)
        c.release()
        c.wait_restart()
        # "process state T (stopped)", or "not running Python ...: stopped or stuck in the kernel"
        return rf"rank {self.target} \(host node-\w, pid {pid}\) last seen in phase [\w-]+ at step \d+.*stopped"


class LinkCut(Fault):
    """A node's veth down (both directions) past --faults.hang.timeout: the watchdog names the node it cannot
    reach and ends torchrun on every node (a new rendezvous would wait for the cut node); the campaign mends
    the link and starts the job again, as a requeue that excludes the node would get a working one."""

    def inject(self, c: Campaign) -> str:
        node = c.group.nodes[self.target]
        c.group.set_link(node, False)
        c.release()
        try:
            c.wait_for(lambda: c.log_matches(r"cannot reach rank"), HANG_S * 6, "the watchdog's line")
            c.wait_for(c.job_over, 300, "the job's end after the cut")
        finally:
            c.group.set_link(node, True)
        c.start_job()
        c.wait_trained()
        # the others name the cut node; when it is node-a (the watchdog's reporter, rank 0) it names itself
        return (
            rf"cannot reach rank {self.target} \(host {node.hostname}, {re.escape(node.addr)}:\d+\)"
            rf"|{node.hostname} and the other nodes cannot reach each other"
        )


class Preempt(Fault):
    """SIGUSR1 to every rank (a scheduler's warning): they checkpoint at the next step and exit 0; the campaign
    starts the job again (a requeue), which resumes exactly."""

    def inject(self, c: Campaign) -> str:
        c.requeue(lambda: None, signal.SIGUSR1)
        return r"run the same command to continue"


class DamagedLatest(Fault):
    """Between two jobs (after a preemption) the newest checkpoint's largest file has bytes flipped: the resume
    skips it, naming it, and continues from the one before (replaying the steps between)."""

    def inject(self, c: Campaign) -> str:
        damaged: list[str] = []
        c.requeue(lambda: damaged.append(c.damage_latest()), signal.SIGUSR1)
        return rf"skipping checkpoint {re.escape(damaged[0])}: "


class SlowRank(Fault):
    """One rank's batches arrive late for a while: the straggler detector names it (nothing else changes)."""

    room = 6  # --faults.stragglers.window control steps in a row, and the step that says so

    def inject(self, c: Campaign) -> str:
        flag = c.control / f"slow-rank-{self.target}"
        flag.touch()
        c.release()
        pattern = rf"straggler: rank {self.target} "
        try:
            c.wait_for(lambda: c.log_matches(pattern), 240, "the straggler line")
        finally:
            flag.unlink(missing_ok=True)
        return pattern


def _diverge(c: Campaign, flag: str, pattern: str, what: str) -> str:
    """A NaN at a step just ahead (:meth:`Campaign.step_ahead`) through the control file ``flag``-STEP; the run
    goes on (no restart) and names it by ``pattern`` (with the step filled in)."""
    step = c.step_ahead()
    (c.control / f"{flag}-{step}").touch()
    c.release()
    pattern = pattern.format(step=step)
    c.wait_for(lambda: c.log_matches(pattern), 240, what)
    return pattern


class NonFinite(Fault):
    """Rank 0's loss is NaN at a step just ahead in that step's first computation only: a device that erred once.
    The divergence guard applies no update and re-runs the step in place; the re-run is finite, so its update is
    applied (the trajectory of an uninterrupted run) and rank 0's node is named suspect in one line and in the
    node ledger."""

    def inject(self, c: Campaign) -> str:
        suspect = r"divergence at step {step} did not repeat when re-run in place: node \S+ \(rank\(s\) 0\) suspect"
        return _diverge(c, "nan-once-step", suspect, "the re-run's line")


class BadBatch(Fault):
    """Rank 0's batch of a step just ahead is NaN, in every computation of it: the batch is at fault. The guard
    applies no update, the re-run in place diverges again, and the batch is skipped (its keys in
    RUN_DIR/bad_batches.jsonl) while training goes on: one batch not trained on, another trajectory."""

    changes_trajectory = True

    def inject(self, c: Campaign) -> str:
        skipped = r"divergence at step {step} repeated when re-run in place: the batch is at fault; skipped"
        return _diverge(c, "poison-step", skipped, "the skipped batch's line")


class RepeatingCrash(Fault):
    """Every rank raises at a step just ahead, every time (a bug). pipeline/faults/crashes.py stops the job after
    the second time: the third attempt's ranks end their torchruns, rank 0 says so in one line, and the check
    that slurm/train.sh runs after the job exits 3 with the same line. The campaign checks both, "fixes the
    bug" (removes the flag) and starts a new job, which resumes from ``latest`` and trains what an
    uninterrupted run trains."""

    def inject(self, c: Campaign) -> str:
        from pipeline.faults.crashes import EXIT_REPEATED, Repeat

        step = c.step_ahead()
        flag = c.control / f"crash-step-{step}"
        flag.touch()
        c.release()
        c.wait_for(c.job_over, 600, "the job's end after the crash repeated")
        check = subprocess.run(
            [PYTHON, *flags("-m pipeline.faults.crashes check {}", c.run_dir)],
            env=small_env({"TORCHELASTIC_RUN_ID": c.job_id}),  # the job, as torchrun names it to its ranks
            capture_output=True,
            text=True,
            timeout=120,
        )
        # crashes.py's line for this crash: the step its ranks had done, the error chaos_rank.py raises
        line = "error: " + Repeat(step - 1, f"RuntimeError: chaos: a bug that raises at step {step}").line()
        if check.returncode != EXIT_REPEATED or check.stderr.strip() != line:
            raise CampaignError(
                f"{self.describe()}: the job's check exited {check.returncode} ({check.stderr.strip()!r}), "
                f"not {EXIT_REPEATED} with {line!r}"
            )
        flag.unlink()  # the user fixed the bug
        c.start_job(new=True)
        c.wait_trained()
        return re.escape(line)


class FullDisk(Fault):
    """Rank 0's next checkpoint file fails at its first write with ENOSPC (tests/support/chaos_rank.py), once.
    The checkpointer names it in one line, removes the unfinished save and stops every rank (exit 2), keeping
    ``latest``; the campaign checks that ``latest`` still verifies; torchrun's restart resumes from it."""

    def inject(self, c: Campaign) -> str:
        from pipeline.checkpoint import latest, verify

        (c.control / "disk-full").touch()
        c.release()
        pattern = (
            r"error: checkpoint at step \d+ failed: rank 0: OSError: \[Errno 28\] No space left on device: "
            r"\S+; the previous checkpoint \S+ is intact"
        )
        c.wait_for(lambda: c.log_matches(pattern), 600, "the checkpointer's line")
        kept = latest(c.run_dir)
        reason = verify(kept) if kept is not None else "missing"
        if reason:
            raise CampaignError(f"{self.describe()}: `latest` ({kept}) after the full disk: {reason}")
        c.wait_restart()
        return pattern


CATALOGUE: dict[str, type[Fault]] = {
    "kill-rank": KillRank,
    "kill-launcher": KillLauncher,
    "stop-rank": StopRank,
    "link-cut": LinkCut,
    "preempt": Preempt,
    "damaged-latest": DamagedLatest,
    "slow-rank": SlowRank,
    "non-finite": NonFinite,
    "bad-batch": BadBatch,
    "repeating-crash": RepeatingCrash,
    "full-disk": FullDisk,
}
DEFAULT_KINDS = tuple(CATALOGUE)
"""The kinds the default campaign draws from: the whole catalogue (the training code survives each)."""


def draw(seed: int, kinds: Sequence[str], count: int, steps: int) -> list[Fault]:
    """The campaign's faults for ``seed``: ``count`` kinds (each of ``kinds`` once before any repeats), in a
    random order, at distinct random steps in [2, steps - 3], on random ranks. Same seed, same list."""
    unknown = sorted(set(kinds) - set(CATALOGUE))
    if unknown:
        raise SystemExit(f"error: unknown fault kind(s) {', '.join(unknown)}; known: {', '.join(CATALOGUE)}")
    if not 1 <= count <= steps - 4:
        raise SystemExit(f"error: --count {count}: between 1 and {steps - 4} faults fit a run of {steps} steps")
    rng = random.Random(seed)
    chosen = [kinds[i % len(kinds)] for i in range(count)]
    rng.shuffle(chosen)
    at = sorted(rng.sample(range(2, steps - 2), count))
    return [CATALOGUE[k](kind=k, step=s, target=rng.randrange(NODES)) for k, s in zip(chosen, at)]


# --------------------------------------------------------------------------------------------
# The campaign


@dataclass
class Campaign:
    out: Path
    data: Path
    seed: int
    group: NodeGroup
    faults: list[Fault] = field(default_factory=list)
    launchers: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    mark: dict[int, int] = field(default_factory=dict)  # each node's log size when the current fault struck
    jobs: int = 0  # jobs started, requeues included
    released: int | None = None  # where the hold goes once the fault being injected has acted (None: away)
    job_id: str = ""  # the job's torchrun run id (its rendezvous id): kept by a requeue
    requeues: int = 0  # this job's requeues (Slurm's SLURM_RESTART_COUNT)

    @property
    def run_dir(self) -> Path:
        return self.out / "run"

    @property
    def control(self) -> Path:
        return self.out / "control"

    @property
    def record(self) -> Path:
        return self.run_dir / "samples"

    def log(self, k: int) -> Path:
        return self.out / f"{self.group.nodes[k].hostname}.log"

    def logs_text(self) -> str:
        return "".join(self.log(k).read_text(errors="replace") for k in range(NODES) if self.log(k).exists())

    def log_sizes(self) -> dict[int, int]:
        return {k: self.log(k).stat().st_size if self.log(k).exists() else 0 for k in range(NODES)}

    def log_matches(self, pattern: str) -> bool:
        """Whether a node's log has a line matching ``pattern`` written since the current fault was injected."""
        for k, start in self.mark.items():
            with self.log(k).open("rb") as f:
                f.seek(start)
                if re.search(pattern, f.read().decode(errors="replace")):
                    return True
        return False

    # --- the job ---------------------------------------------------------------------------------

    def start_node(self, k: int) -> None:
        node: Node = self.group.nodes[k]
        argv = [
            PYTHON,
            *flags("-m torch.distributed.run --nnodes {} --nproc-per-node 1 --max-restarts 12", NODES),
            "--rdzv-backend=c10d",
            "--monitor-interval=0.5",
            f"--rdzv-id={self.job_id}",
            f"--rdzv-endpoint={self.group.nodes[0].hostname}:{RDZV_PORT}",
            "--rdzv-conf=join_timeout=180,read_timeout=120,last_call_timeout=2",
            RANK_SCRIPT,
            *flags("--data {} --run-dir {} --seed {}", self.data, self.run_dir, self.seed),
            *RUN_ARGS,
        ]
        env = small_env(
            {
                "HARNESS_OUT": str(self.out / "outcome"),
                "CHAOS_CONTROL": str(self.control),
                "CHAOS_RECORD": str(self.record),
                "CHAOS_SLOW_S": str(SLOW_S),
                "GLOO_SOCKET_IFNAME": node.ifname,
                # as Slurm's requeue count: the crash journal tells a requeue's attempts from its job's first ones
                "SLURM_RESTART_COUNT": str(self.requeues),
                # as slurm/train.sh: a restarted group must not read the dead group's addresses from a shared store
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            }
        )
        with self.log(k).open("ab") as log:
            self.launchers[k] = self.group.popen(node, argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def start_job(self, new: bool = False) -> None:
        """Start every node's torchrun: the job again (a requeue), or with ``new`` (or at first) a new job."""
        if new or not self.job_id:
            self.job_id, self.requeues = f"chaos-{self.seed}-{self.out.name}-{self.jobs + 1}", 0
        else:
            self.requeues += 1
        self.jobs += 1
        for f in (self.out / "outcome").glob("outcome-rank*.json"):
            f.unlink()
        for k in reversed(range(NODES)):  # the clients first: they wait for node-a's store
            self.start_node(k)

    def rank_pid(self, rank: int) -> int:
        """The training process of ``rank`` (node ``rank``: one rank a node), waiting for it to run."""
        return self.wait_for(lambda: self.find_rank(rank), 120, f"rank {rank}'s process")

    def find_rank(self, rank: int) -> int | None:
        launcher = self.launchers[rank]
        for pid in descendants(launcher.pid):
            if RANK_SCRIPT in cmdline(pid) and not children(pid):
                return pid
        for pid in descendants(launcher.pid):
            if RANK_SCRIPT in cmdline(pid):
                return pid
        return None

    def progress(self) -> int:
        """Batches handed to the loop so far, all ranks and attempts (grows while the run trains)."""
        return sum(1 for f in self.record.glob("rank-*.jsonl") for _ in f.open()) if self.record.exists() else 0

    def latest_step(self) -> int:
        """The highest step any rank recorded in its newest line."""
        steps = []
        for f in self.record.glob("rank-*.jsonl"):
            lines = f.read_text().splitlines()
            if lines:
                steps.append(json.loads(lines[-1])["step"])
        return max(steps, default=0)

    def hold(self, step: int | None) -> None:
        """No rank is handed a batch past global step ``step`` (None: no hold) until it moves: a fault acts while
        the run is held at its step, and the run cannot race past a fault not yet injected or end before it
        (the ranks' ``gate``, tests/support/chaos_rank.py). Each hold lasts the campaign's reaction and a
        fault's act (a signal, a file), well within --faults.hang.timeout."""
        from basics.files import write_bytes_atomic

        if step is None:
            (self.control / "gate").unlink(missing_ok=True)
        else:
            write_bytes_atomic(self.control / "gate", str(step).encode(), durable=False)

    def release(self) -> None:
        """A fault has acted: the run trains on, up to the next fault's step or its ``room`` past this one."""
        self.hold(self.released)

    def step_ahead(self) -> int:
        """A global step whose batch no rank has been handed yet (the drawn step may be past: an earlier fault's
        injection waited for its line while the run trained on)."""
        return self.latest_step() + 2

    def wait_restart(self) -> None:
        """Until the restarted group trains again: every rank is a new process (the fault may strike a step or
        two after it was injected) and has handed the loop two batches since."""
        old = {self.find_rank(k) for k in range(NODES)} - {None}
        self.wait_for(
            lambda: self.job_over() or all(self.find_rank(k) not in old | {None} for k in range(NODES)),
            400,
            "the restarted group's processes",
        )
        self.wait_trained()

    def wait_trained(self) -> None:
        """Until every rank has handed the loop two batches more (after a job's start: its group trains)."""
        before = {f.name: len(f.read_text().splitlines()) for f in self.record.glob("rank-*.jsonl")}

        def trained() -> bool:
            now = {f.name: len(f.read_text().splitlines()) for f in self.record.glob("rank-*.jsonl")}
            return all(now.get(n, 0) > before.get(n, 0) + 1 for n in before) or self.job_over()

        self.wait_for(trained, 400, "the restarted group's training")

    def job_over(self) -> bool:
        return all(p.poll() is not None for p in self.launchers.values())

    def requeue(self, between: object, sig: int) -> None:
        """Signal every rank, wait for the job to end, run ``between`` (no job running), start it again."""
        for k in range(NODES):
            os.kill(self.rank_pid(k), sig)
        self.release()
        self.wait_for(self.job_over, 300, "the preempted job's end")
        between()  # type: ignore[operator]
        self.start_job()
        self.wait_trained()

    def damage_latest(self) -> str:
        from pipeline.checkpoint import latest

        path = latest(self.run_dir)
        assert path is not None, "no checkpoint to damage"
        victim = max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        blob = bytearray(victim.read_bytes())
        at = random.Random(self.seed).randrange(len(blob) // 2, len(blob))
        blob[at : at + 8] = bytes(b ^ 0xFF for b in blob[at : at + 8])
        victim.write_bytes(bytes(blob))
        return path.name

    @staticmethod
    def wait_for(predicate, timeout: float, what: str):
        """tests.support.processes.wait_for, its time-out a CampaignError (the campaign reports it, not raises)."""
        try:
            return processes.wait_for(predicate, timeout, what, poll=0.2)
        except AssertionError as e:
            raise CampaignError(str(e)) from None

    # --- one whole campaign ----------------------------------------------------------------------

    def run(self, timeout: float) -> list[str]:
        """Train to the end with the faults injected; returns each fault's expected line (regex)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.control.mkdir(exist_ok=True)
        (self.out / "outcome").mkdir(exist_ok=True)
        import pipeline.checkpoint
        import pipeline.faults.crashes  # noqa: F401  (now: torch's import takes seconds, which an injection must not)

        deadline = time.monotonic() + timeout
        expected = []
        self.hold(self.faults[0].step if self.faults else None)
        self.start_job()
        for i, fault in enumerate(self.faults):
            self.hold(fault.step)
            self.wait_for(
                lambda f=fault: self.latest_step() >= f.step or self.job_over(),
                max(1.0, deadline - time.monotonic()),
                f"step {fault.step}",
            )
            if self.job_over():
                raise CampaignError(f"the job ended before {fault.describe()}:\n{self.logs_text()[-3000:]}")
            self.mark = self.log_sizes()
            print(f"chaos: injecting {fault.describe()}", flush=True)
            later = self.faults[i + 1 :]
            self.released = max(later[0].step, self.latest_step() + fault.room) if later else None
            expected.append(fault.inject(self))  # acts while the run is held, then releases it
            self.release()
        while True:
            self.wait_for(self.job_over, max(1.0, deadline - time.monotonic()), "the job's end")
            if not self.finished() and all(p.returncode == 0 for p in self.launchers.values()) and self.jobs < 20:
                self.start_job()  # preempted again (a fault's signal met a save): the requeue continues it
                continue
            return expected

    def finished(self) -> bool:
        outcomes = [self.out / "outcome" / f"outcome-rank{r}.json" for r in range(NODES)]
        if not all(p.exists() for p in outcomes):
            return False
        return all(not json.loads(p.read_text())["preempted"] for p in outcomes)


class CampaignError(AssertionError):
    """The campaign could not go on (a state never came) or found something lost."""


# --------------------------------------------------------------------------------------------
# The checks


def consumed(record: Path) -> dict[int, list[tuple[int, int, list[str]]]]:
    """Per rank, the (epoch, step, keys) the final trajectory trained on, in order: a line whose (epoch, step) is
    not past the line before is a resume from an earlier checkpoint, and replaces what came after that point."""
    out = {}
    for f in sorted(record.glob("rank-*.jsonl")):
        kept: list[tuple[int, int, list[str]]] = []
        for line in f.read_text().splitlines():
            entry = json.loads(line)
            pos = (entry["epoch"], entry["step"])
            while kept and kept[-1][:2] >= pos:
                kept.pop()
            kept.append((*pos, entry["keys"]))
        out[int(f.stem.split("-")[1])] = kept
    return out


def accounting(record: Path, all_keys: Sequence[str], steps: dict[int, set[int]]) -> list[str]:
    """What was lost or seen twice: [] when every epoch trained on every sample exactly once. ``steps``: each
    epoch's steps as an uninterrupted run records them (whatever the record's step numbering)."""
    problems = []
    ranks = consumed(record)
    if sorted(ranks) != list(range(NODES)):
        return [f"records of ranks {sorted(ranks)}, not 0..{NODES - 1}"]
    for rank, taken in ranks.items():
        missing = sorted(s for e, want in steps.items() for s in want - {s for e2, s, _ in taken if e2 == e})
        if missing:
            problems.append(f"rank {rank} never trained on the batches of steps {missing}")
    for epoch in sorted(steps):
        seen: dict[str, int] = {}
        for taken in ranks.values():
            for key in (key for e, _, keys in taken if e == epoch for key in keys):
                seen[key] = seen.get(key, 0) + 1
        lost = sorted(set(all_keys) - set(seen))
        twice = sorted(k for k, n in seen.items() if n > 1)
        if lost or twice:
            problems.append(f"epoch {epoch}: {len(lost)} samples never seen {lost[:5]}, {len(twice)} seen twice")
    return problems


def epoch_steps(record: Path) -> dict[int, set[int]]:
    """Each epoch's steps in an uninterrupted run's record (rank 0's)."""
    out: dict[int, set[int]] = {}
    for epoch, step, _ in consumed(record)[0]:
        out.setdefault(epoch, set()).add(step)
    return out


def train_keys(data: Path) -> list[str]:
    """Every training sample's key (the whole epoch of one rank of one)."""
    from pipeline.data.config import DataConfig
    from pipeline.data.dataset import open_dataset
    from pipeline.data.index_cache import index_rows

    split, _ = open_dataset(DataConfig(data=str(data)), "train")
    return sorted(row[0] for index in split.indexes for row in index_rows(index))


def weights_difference(a: Path, b: Path) -> float:
    from pipeline.checkpoint import export_model, latest

    wa, wb = export_model(latest(a)), export_model(latest(b))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@dataclass
class Report:
    seed: int
    faults: list[str]
    seconds: float
    reference_seconds: float
    jobs: int
    problems: list[str]
    weights_max_abs_diff: float | None
    namespaces: str  # the nodes' namespaces, alexnet-<tag>-*: gone when the campaign returns

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        head = "chaos: ok" if self.ok else "chaos: FAILED"
        weights = "not compared" if self.weights_max_abs_diff is None else f"max |diff| {self.weights_max_abs_diff:g}"
        return (
            f"{head}: seed {self.seed}, {len(self.faults)} faults ({', '.join(self.faults)}), {self.jobs} job(s), "
            f"{self.seconds:.0f} s (uninterrupted {self.reference_seconds:.0f} s), weights vs uninterrupted {weights}"
            + "".join(f"\n  - {p}" for p in self.problems)
        )


def campaign(seed: int, kinds: Sequence[str], count: int, data: Path, out: Path, timeout: float = 1800) -> Report:
    """The reference run, then the campaign, then the checks (the namespaces are gone afterwards, also on failure)."""
    from pipeline.data.epoch_plan import steps_per_epoch

    steps = steps_per_epoch(len(train_keys(data)), NODES, BATCH // NODES)
    faults = draw(seed, kinds, count, EPOCHS * steps)
    with NodeGroup(NODES, tag=f"c{os.getpid() % 10**7}", subnet=SUBNET) as group:
        t0 = time.monotonic()
        reference = Campaign(out=out / "uninterrupted", data=data, seed=seed, group=group)
        reference.run(timeout)
        reference_s = time.monotonic() - t0
        t0 = time.monotonic()
        chaos = Campaign(out=out / "campaign", data=data, seed=seed, group=group, faults=faults)
        problems = []
        try:
            expected = chaos.run(timeout)
        except CampaignError as e:
            return Report(
                seed,
                [f.describe() for f in faults],
                time.monotonic() - t0,
                reference_s,
                chaos.jobs,
                [str(e)],
                None,
                group.tag,
            )
        seconds = time.monotonic() - t0
    if not reference.finished():
        problems.append("the uninterrupted run did not finish")
    if not chaos.finished():
        problems.append(f"the run did not finish (launchers exited {[p.returncode for p in chaos.launchers.values()]})")
    epochs = epoch_steps(reference.record)
    if sorted(epochs) != list(range(EPOCHS)) or accounting(reference.record, train_keys(data), epochs):
        problems.append(f"the uninterrupted run's own record is incomplete: epochs {sorted(epochs)}")
    problems += accounting(chaos.record, train_keys(data), epochs)
    text = chaos.logs_text()
    for fault, pattern in zip(faults, expected):
        if not re.search(pattern, text):
            problems.append(f"{fault.describe()}: no line matches {pattern!r}")
    diff = None
    if not any(f.changes_trajectory for f in faults) and chaos.finished():
        diff = weights_difference(reference.run_dir, chaos.run_dir)
        if diff > WEIGHTS_TOLERANCE:
            problems.append(f"the final weights differ from the uninterrupted run's by up to {diff:g}")
    return Report(seed, [f.describe() for f in faults], seconds, reference_s, chaos.jobs, problems, diff, group.tag)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.support.chaos", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--faults", default=",".join(DEFAULT_KINDS), help=f"kinds to draw from (default: {','.join(DEFAULT_KINDS)})"
    )
    p.add_argument("--count", type=int, default=0, help="faults to inject (default: one of each kind)")
    p.add_argument("--data", type=Path, help="a demo dataset's shards (default: built under --out)")
    p.add_argument("--out", type=Path, default=Path("chaos-out"))
    p.add_argument(
        "--wait", action="store_true", help="wait for a campaign already running here to end (default: refuse)"
    )
    args = p.parse_args(argv)
    # `kill PID` ends the campaign like Ctrl-C: the namespaces and every process in them are removed
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also where started with SIGINT ignored (`cmd &`)
    if os.geteuid() != 0:
        print("error: the chaos campaign makes network namespaces: run it as root", file=sys.stderr)
        return 2
    kinds = [k for k in args.faults.split(",") if k]
    data = args.data
    if data is None:
        from tests.support.datasets import build_demo

        data = args.out / "data" / "shards"
        if not (data / "manifest.json").exists():
            build_demo(args.out / "data")
    with open(LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if args.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            print(f"error: another chaos campaign is running on this machine ({LOCK} is locked)", file=sys.stderr)
            return 2
        for earlier in ("campaign", "uninterrupted"):  # this tool's own output of an earlier campaign
            shutil.rmtree(args.out / earlier, ignore_errors=True)
        report = campaign(args.seed, kinds, args.count or len(kinds), data, args.out)
    print(report.line())
    (args.out / "report.json").write_text(json.dumps(vars(report) | {"ok": report.ok}, indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
