"""The settings of what goes wrong while a run runs: ``[faults.lease]``, ``[faults.hang]``, ``[faults.stragglers]``
and ``[faults.divergence]`` of a config file, ``--faults.<section>.<option>`` on the command line.

They were ``--train.*`` options before (``--train.hang-timeout`` ...); ``pipeline.config.RENAMED`` maps the old
names, which still work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.options import Check, Rule, Section, at_least, finite, one_of, option


@dataclass
class LeaseConfig(Section):
    minutes: float = option(30.0, finite(0, above=True))
    """minutes without a heartbeat (refreshed at control steps, at most once a minute) after which this
    run's lease on RUN_DIR (writer.lease) is stale and another job may take the run directory over;
    keep it above the longest validation"""


@dataclass
class HangConfig(Section):
    timeout: float = option(120.0, finite(0, note=" (0 = no watchdog)"))
    """seconds without progress on every rank after which the progress watchdog names the rank the others
    wait for, writes every rank's stacks to RUN_DIR/hangs/ and ends the attempt with exit code 75 so the
    launcher restarts it from the last checkpoint (0 = no watchdog)"""
    slow_phase_timeout: float = option(480.0, finite(0))
    """the same allowance for the phases whose single steps may take long: start-up and resume, an epoch's
    input pipeline set-up, a checkpoint's disk writes (its collectives get --faults.hang.timeout; a rank
    whose process stopped running is judged by --faults.hang.timeout whatever its phase)"""
    collective_timeout_min: float = option(10.0, finite(0, above=True))
    """minutes a collective may wait before the process group fails it (the watchdog acts first)"""

    RULES = (
        Rule(
            ("timeout", "slow_phase_timeout"),
            lambda hang, slow: not hang or hang <= slow,
            "{timeout} must be 0 (off) or at most {slow_phase_timeout}",
        ),
        Rule(
            ("timeout", "slow_phase_timeout", "collective_timeout_min"),
            lambda hang, slow, collective: not hang or slow < 60 * collective,
            "{slow_phase_timeout} (seconds) must be below {collective_timeout_min} (minutes) while {timeout} is "
            "on, or the collective fails first and names no rank",
        ),
    )


@dataclass
class StragglerConfig(Section):
    threshold: float = option(1.5, finite(1, above=True))
    """a rank whose own work per step (step time less its waits for other ranks) exceeds this multiple of
    the other ranks' median at --faults.stragglers.window control steps in a row is named in one log line"""
    window: int = option(5, at_least(1))
    """consecutive control steps a rank must be slow before it is named a straggler"""


@dataclass
class DivergenceConfig(Section):
    action: str = option("stop", one_of("stop", "rollback"))
    """what a divergence does (a non-finite loss or gradient norm on any rank, or a loss spike; its update is
    never applied): stop (one line naming the good checkpoint, exit 2) or rollback (return to the newest good
    checkpoint, skip the batches since, train on)"""
    rollback_lr_factor: float = option(1.0, Check(lambda x: 0 < x <= 1, "in (0, 1]"))
    """rollback: multiply the learning rate by this at each rollback (1 = unchanged)"""
    rerun: bool = True
    """re-run a divergent step once in place (same weights, batch and dropout masks) before acting on it: diverged
    again, the batch is at fault: it is skipped (its update not applied, its sample keys in
    RUN_DIR/bad_batches.jsonl, skipped again by a resume that meets it) and the run goes on, within
    --faults.divergence.max-skips; not again, the node is suspect (named in one line and in the node ledger)
    and the re-run's update is applied. Costs one host sync per step"""
    max_skips: int = option(10, at_least(0))
    """rerun: batches a run may skip for diverging again when re-run; the next one is acted on as
    --faults.divergence.action says (0: never skip)"""
    max_skips_in_a_row: int = option(2, at_least(1))
    """rerun: consecutive steps that may be skipped; a divergence right after that many is the state's fault, not
    the batches' (every batch diverges from it): acted on as --faults.divergence.action says"""
    keep_lr_scale: bool = False
    """on resume with another --optim.lr: keep multiplying it by the rollbacks' stored scale (off: the new
    --lr is the rate the run trains at; the scale stays in force while --optim.lr is unchanged)"""
    max_rollbacks: int = option(3, at_least(1))
    """rollback: stop as --faults.divergence.action stop does once a run has rolled back this many times"""
    spike_sigma: float = option(6.0, finite(0, note=" (0 = off)"))
    """a loss more than this many standard deviations above the mean of the last --faults.divergence.spike-window
    steps is a spike (OLMo's rule); 0 = off"""
    spike_window: int = option(128, at_least(2))
    """steps in the spike rule's rolling window; the rule arms once it is full"""
    spike_warmup: int = option(200, at_least(0))
    """steps before the spike rule arms (the first steps' loss moves fast)"""
    spike_factor: float = option(
        10.0, Check(lambda x: x == 0 or (math.isfinite(x) and x > 1), "0 (off) or a finite number > 1")
    )
    """a loss above this multiple of the largest loss seen so far is a spike at any step (Megatron's check);
    0 = off"""


@dataclass
class FaultsConfig(Section):
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    hang: HangConfig = field(default_factory=HangConfig)
    stragglers: StragglerConfig = field(default_factory=StragglerConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
