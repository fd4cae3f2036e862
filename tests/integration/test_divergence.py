"""A diverging run never leaves a poisoned checkpoint and can recover by itself (pipeline.faults.divergence).

End to end on the demo data with a narrow model and a checkpoint every step: the issue's reproduction
(``--lr 300`` with warm-up) stops with one line naming a good checkpoint, from which a lower rate trains to the
end; a finite spike (a batch scaled by the harness) rolls back, skips its batches, records them, and two runs
with the same seed end with the same weights; dp=2 and tp=2 on gloo agree. In-process: the rules themselves.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint
from pipeline.checkpoint import DIVERGED, GOOD, META
from tests.support import HARNESS, NARROW_MODEL, REPO, TORCHRUN, flags
from tests.support.processes import free_port, small_env


def _run(
    out: Path, args: list[str], *, nproc: int = 1, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    if nproc == 1:
        cmd = [sys.executable, HARNESS, *args]
    else:
        cmd = [TORCHRUN, f"--nproc_per_node={nproc}", f"--master-port={free_port()}", HARNESS, *args]
    extra = {"HARNESS_OUT": str(out), **(env or {})}
    return subprocess.run(
        cmd, cwd=REPO, env=small_env(extra), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def _demo(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """The demo recipe (configs/demo.toml: He init, channel mean, warm-up) on the 4-class demo data, narrow,
    batches of 8 (12 steps an epoch), a checkpoint every step."""
    return [
        *flags("--config {} --data {} --run-dir {}", REPO / "configs" / "demo.toml", shards, run_dir),
        *flags("--num-classes 4 --tp 1 --batch-size 8 --epochs 3 --data.workers 1 --train.log-every 1"),
        *NARROW_MODEL,
        *flags("--checkpoint.every-minutes 0 --checkpoint.every-steps 1 --faults.hang.timeout 0"),
        *extra,
    ]


def _meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def _losses(run_dir: Path) -> dict[int, float]:
    from pipeline.tools.report import read_scalars

    return dict(read_scalars(run_dir)["train/loss"])


def _batch_keys(run_dir: Path, step: int) -> list[str]:
    """The global batch of ``step`` (1-based: the step that trains on it), every rank's share, from the run's
    --train.record-samples ledger."""
    from pipeline.data.sample_ledger import read_ledger
    from pipeline.run_dir import RunDir

    return read_ledger(RunDir(run_dir))[step - 1]


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_the_issues_reproduction_stops_at_a_good_checkpoint_that_a_lower_lr_trains_on(
    demo_shards: Path, tmp_path: Path
) -> None:
    """--lr 300 with a warm-up epoch used to leave `latest` at the state whose update broke the run: the same
    command with --lr 0.01 gave NaN at the next step, every time. (With the spike rules off, the loss reaches
    4e11 at step 3, finite, and NaN/inf at step 4: step-2, whose next step was finite, would then count as good
    although its weights already blow up at any rate. The cap is what names step-1.)"""
    run_dir = tmp_path / "run"
    proc = _run(tmp_path / "o1", _demo(demo_shards, run_dir, "--lr", "300", "--schedule.warmup-epochs", "1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _error_line(proc)
    good = checkpoint.latest(run_dir)
    assert good is not None and _meta(good)["health"] == GOOD
    assert f"last good checkpoint {good}" in line and "rank" in line and "grad norm" in line
    # Steps 3 and 4 diverged again when re-run and were skipped (--faults.divergence.max-skips-in-a-row 2); the
    # third in a row is the state's fault: acted on from the first of them.
    assert "at step 5" in line and "after the batches of steps 3..4 diverged again when re-run" in line, line
    assert "the state is at fault" in line and "spike (above the cap)" in line, line
    assert _meta(good)["step"] == 1, line  # step 2 was applied; its state made step 3 diverge
    # Everything saved after the good one is marked, and no automatic resume would pick it.
    good_step = _meta(good)["step"]
    later = [p for p, m in checkpoint.readable(run_dir) if m["seq"] > _meta(good)["seq"]]
    assert later and all(_meta(p)["health"] == DIVERGED for p in later)
    assert checkpoint.candidates(run_dir)[0] == good

    proc = _run(tmp_path / "o2", _demo(demo_shards, run_dir, "--lr", "0.01", "--schedule.warmup-epochs", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "o2" / "outcome-rank0.json").read_text())["progress"]["step"] == 36
    resumed = {s: v for s, v in _losses(run_dir).items() if s > good_step}
    assert len(resumed) == 36 - good_step and all(math.isfinite(v) for v in resumed.values())
    # The resume said what changed, in one line.
    assert "resumed with settings that differ" in proc.stderr and "--optim.lr 300.0 -> 0.01" in proc.stderr


# the z-score rule at the default sigma (configs/demo.toml turns it off), armed from the first step
SPIKE_RULE = flags(
    "--faults.divergence.spike-sigma 6 --faults.divergence.spike-warmup 0 --faults.divergence.spike-window 8"
)


# A batch that diverges again when re-run is acted on at once instead of skipped: the stop and rollback paths.
NO_SKIPS = flags("--faults.divergence.max-skips 0")


def _spiked(demo_shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """Rollback (never a skip), and the z-score rule armed from step 9 (a window of 8) so that the spike below
    counts."""
    return _demo(
        demo_shards,
        run_dir,
        *flags("--faults.divergence.action rollback --faults.divergence.rollback-lr-factor 0.5"),
        *NO_SKIPS,
        *SPIKE_RULE,
        *extra,
    )


# The batch of step 9 x1000: the loss goes from about 1.5 to 12, finite (LRN damps the rest).
SPIKE = {"HARNESS_POISON_AT": "9", "HARNESS_POISON": "scale:1000"}


@pytest.mark.slow
def test_a_finite_spike_rolls_back_skips_its_batches_and_reproduces(demo_shards: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for run_dir in (a, b):  # every checkpoint kept, to read their marks
        proc = _run(
            tmp_path / f"o-{run_dir.name}", _spiked(demo_shards, run_dir, "--checkpoint.keep-last", "99"), env=SPIKE
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rolled back to step-00000007" in proc.stderr and "steps 8..9 skipped" in proc.stderr
    last = checkpoint.latest(a)
    [rollback] = _meta(last)["divergence"]["rollbacks"]
    assert rollback["diverged_step"] == 9 and rollback["skipped_steps"] == [8, 9]
    assert rollback["kind"].startswith("spike") and rollback["lr_scale"] == 0.5
    health = {p.name: m["health"] for p, m in checkpoint.readable(a)}
    assert health["step-00000007"] == GOOD and health["step-00000008"] == DIVERGED  # step 9 trained on step-8
    assert health["step-00000009"] == GOOD  # the state after the rollback: step-7's weights, trained on
    # Two runs with the same seed: the same weights, bit for bit.
    wa, wb = checkpoint.export_model(last), checkpoint.export_model(checkpoint.latest(b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # The run's record: TensorBoard and the run report.
    from pipeline.tools.report import read_scalars, report

    assert read_scalars(a)["train/rollbacks"] == [(9, 1.0)]
    text = report(a, "latest", evaluate_missing=False).read_text()
    assert "## Divergence" in text and "| 9 |" in text and "8..9" in text


@pytest.mark.slow
def test_a_resume_after_a_rollback_skips_the_same_batches(demo_shards: Path, tmp_path: Path) -> None:
    """Stopped two steps after the rollback, then resumed: the same weights as the run that went straight on."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _run(tmp_path / "o1", _spiked(demo_shards, straight), env=SPIKE).returncode == 0
    first = _run(tmp_path / "o2", _spiked(demo_shards, resumed, "--max-steps", "11"), env=SPIKE)
    assert first.returncode == 0 and "rolled back" in first.stderr, first.stderr[-3000:]
    again = _run(tmp_path / "o3", _spiked(demo_shards, resumed), env=SPIKE)
    assert again.returncode == 0 and "rolled back" not in again.stderr, again.stderr[-3000:]
    wa, wb = checkpoint.export_model(checkpoint.latest(straight)), checkpoint.export_model(checkpoint.latest(resumed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_a_nan_batch_is_never_applied(demo_shards: Path, tmp_path: Path) -> None:
    """The batch of step 3 is NaN; the control step comes at 6: steps 4-6 still train on finite weights (had
    the NaN update been applied, every later loss would be NaN). No checkpoint was good: the line says so."""
    run_dir = tmp_path / "run"
    nan = {"HARNESS_POISON_AT": "3", "HARNESS_POISON": "nan"}
    args = _demo(
        demo_shards, run_dir, *NO_SKIPS, *flags("--epochs 1 --checkpoint.every-steps 0 --train.control-every 6")
    )
    proc = _run(tmp_path / "o", args, env=nan)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "non-finite (NaN/inf) at step 3 on rank(s) 0 (loss nan" in line and "no good checkpoint exists" in line
    losses = _losses(run_dir)  # TensorBoard keeps finite values only
    assert sorted(losses) == [1, 2, 4, 5, 6] and checkpoint.latest(run_dir) is None


@pytest.mark.slow
def test_the_demo_recipe_never_trips_the_spike_rules(demo_shards: Path, tmp_path: Path) -> None:
    """Three epochs of the demo recipe with the z-score rule armed from the 9th step (the default waits 200):
    nothing counts as a spike, early steps included."""
    run_dir = tmp_path / "run"
    proc = _run(tmp_path / "o", _demo(demo_shards, run_dir, *SPIKE_RULE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "diverged" not in proc.stderr and len(_losses(run_dir)) == 36


@pytest.mark.multiprocess
@pytest.mark.parametrize("tp", [1, 2])
def test_every_rank_agrees_under_dp2_and_tp2(demo_shards: Path, tmp_path: Path, tp: int) -> None:
    """A NaN batch on rank 1 alone: every rank skips the update and stops with the same line naming rank 1
    (under tp=2 the towers exchange activations, so both see it); a spike on rank 1 alone, that repeats when re-run:
    under dp=2 both ranks skip its batch and record both halves' keys, under tp=2 (no skips) both roll back."""
    run_dir = tmp_path / "run"
    nan_on_1 = {"HARNESS_POISON_AT": "5", "HARNESS_POISON": "nan", "HARNESS_POISON_RANK": "1"}
    args = _demo(demo_shards, run_dir, "--tp", str(tp), "--epochs", "1", *NO_SKIPS)
    proc = _run(tmp_path / "o1", args, nproc=2, env=nan_on_1, timeout=240)
    # torchrun exits 1 when a worker fails; each worker that ended by itself exited 2 (the one-line error), the
    # others were ended by torchrun (SIGTERM, -15) once the first had.
    ends = [int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)]
    assert proc.returncode == 1 and 2 in ends and set(ends) <= {2, -15}, (ends, proc.stderr[-3000:])
    lines = {ln.split("error: ", 1)[1] for ln in proc.stderr.splitlines() if "error: training diverged" in ln}
    assert len(lines) == 1, proc.stderr[-3000:]  # one verdict, the same on every rank
    [line] = lines
    # tp=1: rank 1 alone read the NaN batch; tp=2: rank 1's NaN reaches its tower partner through the exchange.
    assert f"non-finite (NaN/inf) at step 5 on rank(s) {'1' if tp == 1 else '0,1'} (loss nan" in line, line
    assert "step-00000003" in line  # step 4 trained on step-3's state; step 5 was the NaN, so step-4 is not good

    # A finite spike in rank 1's batch alone: only the all-reduced loss shows it to rank 0 as well.
    spike_on_1 = {**SPIKE, "HARNESS_POISON_RANK": "1"}
    run2 = tmp_path / "run2"
    extra = flags("--tp {} --epochs 1 --train.record-samples true", tp) + (
        ["--faults.divergence.max-skips", "1"] if tp == 1 else []
    )
    proc = _run(tmp_path / "o2", _spiked(demo_shards, run2, *extra), nproc=2, env=spike_on_1, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = [json.loads((tmp_path / "o2" / f"outcome-rank{r}.json").read_text()) for r in (0, 1)]
    assert outcomes[0] == outcomes[1] and outcomes[0]["progress"]["step"] == 12
    divergence = _meta(checkpoint.latest(run2))["divergence"]
    if tp == 2:
        [record] = divergence["rollbacks"]
        assert record["skipped_steps"] == [8, 9] and record["kind"] == "spike (z-score)"
        return
    assert divergence["rollbacks"] == [] and divergence["skipped"] == [
        {"step": 9, "epoch": 0, "batch": 8, "batch_size": 8}
    ]
    [record] = [json.loads(line) for line in (run2 / "bad_batches.jsonl").read_text().splitlines()]
    assert sorted(record["keys"]) == sorted(_batch_keys(run2, 9)), record  # rank 0's half and rank 1's


# ------------------------------------------------------------------------------------------ the rules


@pytest.mark.slow
def test_a_new_lr_on_resume_means_what_it_says_unless_the_scale_is_kept(demo_shards: Path, tmp_path: Path) -> None:
    """A rollback at step 9 stored the scale 0.5; a resume with a new --optim.lr trains at that rate (the line
    says the stored scale was dropped, and why), and with --faults.divergence.keep-lr-scale at half of it."""
    from pipeline.tools.report import read_scalars

    first = tmp_path / "first"
    proc = _run(tmp_path / "o1", _spiked(demo_shards, first, "--max-steps", "11"), env=SPIKE)
    assert proc.returncode == 0 and "rolled back" in proc.stderr, proc.stderr[-3000:]
    assert _meta(checkpoint.latest(first))["divergence"]["lr_scale"] == 0.5
    lines, lr = {}, {}
    for keep in ("false", "true"):
        run_dir = tmp_path / f"keep-{keep}"
        shutil.copytree(first, run_dir)
        extra = flags("--max-steps 12 --optim.lr 0.02 --faults.divergence.keep-lr-scale {}", keep)
        proc = _run(tmp_path / f"o-{keep}", _spiked(demo_shards, run_dir, *extra), env=SPIKE)
        assert proc.returncode == 0, proc.stderr[-3000:]
        [lines[keep]] = [ln for ln in proc.stderr.splitlines() if "training at learning rate" in ln]
        lr[keep] = dict(read_scalars(run_dir)["train/lr"])[12]
    assert "--optim.lr 0.02" in lines["false"], lines
    assert "stored scale 0.5 dropped: --optim.lr changed 0.01 -> 0.02" in lines["false"], lines
    assert "stored scale 0.5, kept for the new --optim.lr" in lines["true"], lines
    assert lr["true"] == pytest.approx(0.5 * lr["false"]) and lr["false"] == pytest.approx(0.02), lr
    assert _meta(checkpoint.latest(tmp_path / "keep-false"))["divergence"]["lr_scale"] == 1.0


# ------------------------------------------------------------------------------------------ re-run in place


def _weights_equal(a: Path, b: Path) -> bool:
    wa, wb = checkpoint.export_model(checkpoint.latest(a)), checkpoint.export_model(checkpoint.latest(b))
    return all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_a_batch_that_spikes_again_when_re_run_is_skipped_and_stays_skipped(demo_shards: Path, tmp_path: Path) -> None:
    """The batch of step 9 is x1000 every time: the re-run in place spikes too, so the batch is at fault. It is
    skipped (no update, no stop, no rollback), its 8 sample keys go to RUN_DIR/bad_batches.jsonl, and the run
    trains on. A restart from a checkpoint before it (here with the batch no longer spiking, so only the record
    can skip it) skips it again without a re-run and ends with the weights of the run that went straight on,
    bit for bit, dropout included (the skipped step draws its masks once, as the re-run left them)."""
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    common = ("--epochs", "1", "--train.record-samples", "true", "--checkpoint.keep-last", "99", *SPIKE_RULE)
    proc = _run(tmp_path / "o1", _demo(demo_shards, straight, *common), env=SPIKE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = "divergence at step 9 repeated when re-run in place: the batch is at fault; skipped (8 sample keys"
    assert line in proc.stderr and "rolled back" not in proc.stderr, proc.stderr[-3000:]
    [record] = [json.loads(ln) for ln in (straight / "bad_batches.jsonl").read_text().splitlines()]
    assert record["step"] == 9 and record["epoch"] == 0 and record["batch"] == 8 and record["skipped"] is True
    assert sorted(record["keys"]) == sorted(_batch_keys(straight, 9)) and len(set(record["keys"])) == 8, record
    assert _meta(checkpoint.latest(straight))["divergence"]["skipped"] == [
        {"step": 9, "epoch": 0, "batch": 8, "batch_size": 8}
    ]
    assert not (tmp_path / ".alexnet-nodes.jsonl").exists()  # a batch at fault names no node
    from pipeline.tools.report import read_scalars, report

    assert read_scalars(straight)["train/batches_skipped"] == [(9, 1.0)]
    text = report(straight, "latest", evaluate_missing=False).read_text()
    assert "Skipped 1 batch(es) that diverged again when re-run in place: step 9 (epoch 0, batch 8)" in text

    first = _run(tmp_path / "o2", _demo(demo_shards, restarted, *common, "--max-steps", "11"), env=SPIKE)
    assert first.returncode == 0 and "the batch is at fault; skipped" in first.stderr, first.stderr[-3000:]
    before = restarted / "checkpoints" / "step-00000007"
    again = _run(tmp_path / "o3", _demo(demo_shards, restarted, *common, "--resume", str(before)))  # no spike now
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step 9: batch 8 of epoch 0 skipped, as before" in again.stderr, again.stderr[-3000:]
    assert "re-run in place" not in again.stderr
    assert len((restarted / "bad_batches.jsonl").read_text().splitlines()) == 1  # recorded once
    assert _weights_equal(straight, restarted)


@pytest.mark.multiprocess
def test_a_spike_that_does_not_repeat_names_the_node(demo_shards: Path, tmp_path: Path) -> None:
    """Rank 1's images of step 9 are x1000 in its first computation only (a device that erred once), under dp 2:
    the re-run is finite, its update is applied, nothing rolls back, and rank 1 alone is named suspect (by its
    own loss: DDP's all-reduce gave its bad gradients to rank 0 too), in the log and the ledger."""
    run_dir, ledger = tmp_path / "run", tmp_path / "ledger.jsonl"
    env = {**SPIKE, "HARNESS_POISON_ONCE": "1", "HARNESS_POISON_RANK": "1", "ALEXNET_NODE_LEDGER": str(ledger)}
    args = _spiked(demo_shards, run_dir, "--max-steps", "10")
    proc = _run(tmp_path / "o", args, nproc=2, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    node = socket.gethostname()
    line = f"divergence at step 9 did not repeat when re-run in place: node {node} (rank(s) 1) suspect"
    assert line in proc.stderr and "rolled back" not in proc.stderr, proc.stderr[-3000:]
    assert not (run_dir / "bad_batches.jsonl").exists()
    [entry] = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert entry["node"] == node and entry["source"] == "divergence-rerun", entry
    assert sorted(_losses(run_dir)) == list(range(1, 11))  # step 9's loss is the re-run's, finite
