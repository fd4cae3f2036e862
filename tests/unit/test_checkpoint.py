"""Checkpoint promises, tried as an unlucky or hostile user would: every restart resumes from the newest
intact checkpoint, no saved work is lost or replaced by a corrupt copy, and no file read runs code."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from pipeline import checkpoint
from pipeline.checkpoint import (
    BEST,
    LATEST,
    META,
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    NonFiniteState,
    TrainState,
)
from pipeline.checkpoint.integrity import file_sha256
from pipeline.config import RunConfig
from pipeline.data.epoch_plan import SAMPLE_ORDER
from pipeline.model import ModelConfig, build_model
from pipeline.run_dir import RunDir
from pipeline.schedule import LRSchedule
from tests.support.checkpoint import _v1_run

CPU = torch.device("cpu")
LAYOUT = {"world_size": 1, "dp_size": 1, "tp_size": 1}


def _state(run_dir: Path, seed: int = 0) -> TrainState:
    cfg = RunConfig(run_dir=str(run_dir))
    cfg.model = ModelConfig(num_classes=4, widths=(8, 16, 16, 16, 8), fc_width=16)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 227, 227)).square().mean().backward()
    optimizer.step()  # momentum buffers exist
    return TrainState(model, optimizer, LRSchedule(cfg.schedule, 0.01), cfg, dict(LAYOUT), rank=0, tp_rank=0)


def _saver(run_dir: Path, keep_last: int = 3) -> Checkpointer:
    return Checkpointer(run_dir, CheckpointConfig(keep_last=keep_last, every_minutes=0), rank=0)


def _save_at(saver: Checkpointer, state: TrainState, step: int, is_best: bool = False) -> Path:
    state.progress.step = step
    with torch.no_grad():  # each checkpoint holds different weights
        next(state.model.parameters()).add_(0.01)
    return saver.save(state, CPU, is_best=is_best)


def _weights(state: TrainState) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.model.state_dict().items()}


def _distcp(path: Path) -> Path:
    return next(p for p in path.iterdir() if p.suffix == ".distcp")


def _names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in RunDir(run_dir).checkpoints.iterdir() if p.is_dir())


def test_restore_is_exact_weights_momentum_rng_progress(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state.progress.epoch, state.progress.step_in_epoch = 2, 7
    state.best_top1_error = 0.25
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    path = _save_at(_saver(tmp_path), state, 40, is_best=True)
    expect = (random.random(), np.random.rand(), torch.rand(1))
    saved = _weights(state)
    momentum = [state.optimizer.state[p]["momentum_buffer"].clone() for p in state.model.parameters()]

    fresh = _state(tmp_path, seed=1)
    assert checkpoint.verify(path) is None
    assert _saver(tmp_path).restore(fresh, None) == path
    assert all(torch.equal(saved[k], v) for k, v in fresh.model.state_dict().items())
    assert all(
        torch.equal(m, fresh.optimizer.state[p]["momentum_buffer"]) for m, p in zip(momentum, fresh.model.parameters())
    )
    assert (random.random(), np.random.rand(), torch.rand(1)) == expect  # bit-exact RNG, no pickle
    assert vars(fresh.progress) == {"epoch": 2, "step": 40, "step_in_epoch": 7}
    assert fresh.best_top1_error == 0.25
    meta = json.loads((path / META).read_text())
    assert set(meta["files"]) == {p.name for p in path.iterdir() if p.name != META}


def test_resume_of_an_old_checkpoint_starts_a_lineage_and_loses_nothing(tmp_path: Path, caplog) -> None:
    """The landed code pruned every new save right after writing it when resuming from an old step."""
    state, saver = _state(tmp_path), _saver(tmp_path, keep_last=2)
    first = _save_at(saver, state, 10, is_best=True)
    for step in (20, 30, 40):
        _save_at(saver, state, step)
    assert _names(tmp_path) == ["step-00000010", "step-00000030", "step-00000040"]  # best is kept

    # Requeued with --resume best: the new lineage's first save survives and latest names it.
    resumed, saver2 = _state(tmp_path), _saver(tmp_path, keep_last=2)
    assert saver2.restore(resumed, "best") == first
    new = _save_at(saver2, resumed, 20)
    assert new.name == "step-00000020" and new.is_dir()
    assert checkpoint.latest(tmp_path) == new
    # The abandoned lineage (30, 40) stays until the new one has keep_last checkpoints...
    assert {"step-00000030", "step-00000040"} <= set(_names(tmp_path))
    # ...and a restart now resumes the new lineage, not the abandoned one with the higher step.
    assert _saver(tmp_path).restore(_state(tmp_path), None) == new
    with caplog.at_level(logging.INFO, logger="alexnet"):
        third = _save_at(saver2, resumed, 30)
    assert third.name == "step-00000030-1"  # a name is never reused
    assert _names(tmp_path) == ["step-00000010", "step-00000020", "step-00000030-1"]
    assert "pruned checkpoint step-00000040" in caplog.text
    assert all(checkpoint.verify(RunDir(tmp_path).checkpoints / n) is None for n in _names(tmp_path))


def test_resaving_a_step_never_deletes_it_first(tmp_path: Path) -> None:
    state, saver = _state(tmp_path), _saver(tmp_path)
    a = _save_at(saver, state, 5)
    b = saver.save(state, CPU)  # e.g. --max-steps on a --checkpoint.every-steps step
    assert a != b and a.is_dir() and b.is_dir()
    assert checkpoint.latest(tmp_path) == b and checkpoint.verify(b) is None


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip", "delete_file", "meta_garbage", "missing_dir"])
def test_damaged_latest_falls_back_to_the_previous_intact_one(tmp_path: Path, damage: str, caplog) -> None:
    state, saver = _state(tmp_path), _saver(tmp_path)
    good = _save_at(saver, state, 10)
    good_weights = _weights(state)
    bad = _save_at(saver, state, 20)
    blob = _distcp(bad)
    if damage == "truncate":
        os.truncate(blob, blob.stat().st_size // 2)
    elif damage == "empty":
        os.truncate(blob, 0)
    elif damage == "flip":  # same size: only the checksum can tell
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    elif damage == "delete_file":
        blob.unlink()
    elif damage == "meta_garbage":
        (bad / META).write_text("{not json")
    else:
        import shutil

        shutil.rmtree(bad)

    with caplog.at_level(logging.WARNING, logger="alexnet"):
        fresh = _state(tmp_path, seed=3)
        assert _saver(tmp_path).restore(fresh, None) == good
    assert all(torch.equal(good_weights[k], v) for k, v in fresh.model.state_dict().items())
    if damage != "meta_garbage":
        assert f"skipping checkpoint {bad.name}" in caplog.text
    if damage not in ("meta_garbage", "missing_dir"):
        with pytest.raises(CheckpointError) as err:  # asked for by name: one line, no fallback
            _saver(tmp_path).restore(_state(tmp_path), str(bad))
        assert "\n" not in str(err.value) and bad.name in str(err.value)
        with pytest.raises(CheckpointError):
            checkpoint.export_model(bad)


def test_every_checkpoint_damaged_is_a_fresh_start_only_when_none_is_intact(tmp_path: Path) -> None:
    state, saver = _state(tmp_path), _saver(tmp_path)
    only = _save_at(saver, state, 10)
    os.truncate(_distcp(only), 10)
    assert _saver(tmp_path).restore(_state(tmp_path), None) is None
    assert only.is_dir()  # the damaged one is left for the operator, not deleted


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    state, saver = _state(tmp_path), _saver(tmp_path)
    good = _save_at(saver, state, 10)
    with torch.no_grad():
        next(state.model.parameters())[0] = float("nan")
    state.progress.step = 20
    with pytest.raises(NonFiniteState, match="not saved"):
        saver.save(state, CPU)
    assert checkpoint.latest(tmp_path) == good and _names(tmp_path) == [good.name]


def test_retention_never_leaves_only_states_that_diverged(tmp_path: Path) -> None:
    """The newest save has never trained on (its next step is judged later): keep-last 1 used to prune the last
    healthy checkpoint for it, so when that next step diverged only the poisoned state was left, which `latest`
    named and a restart resumed."""
    state, saver = _state(tmp_path), _saver(tmp_path, keep_last=1)
    healthy = _save_at(saver, state, 10)
    saver.mark_health(0, 11)  # step 11 trained on it without diverging
    assert json.loads((healthy / META).read_text())["health"] == checkpoint.GOOD
    poisoned = _save_at(saver, state, 20)
    assert healthy.is_dir()  # kept beside keep-last's one: the newest good checkpoint
    assert saver.fall_back_to_good(first_bad=21, step=21) == healthy  # step 21, trained on step-20's state, diverged
    assert json.loads((poisoned / META).read_text())["health"] == checkpoint.DIVERGED
    assert checkpoint.latest(tmp_path) == healthy and checkpoint.candidates(tmp_path) == [healthy]
    assert _saver(tmp_path).restore(_state(tmp_path), None) == healthy


def test_a_divergence_with_no_good_checkpoint_leaves_nothing_to_resume(tmp_path: Path) -> None:
    state, saver = _state(tmp_path), _saver(tmp_path)
    _save_at(saver, state, 1)
    assert saver.fall_back_to_good(first_bad=2, step=2) is None
    assert _saver(tmp_path).restore(_state(tmp_path), None) is None  # a fresh start, not the diverged state


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_no_file_in_a_checkpoint_is_unpickled(tmp_path: Path) -> None:
    """A crafted tensor blob is refused; DCP's pickled .metadata is never read by our loaders."""
    state, saver = _state(tmp_path), _saver(tmp_path)
    path = _save_at(saver, state, 10)
    marker = tmp_path / "pwned"
    meta = json.loads((path / META).read_text())

    # 1. .metadata replaced by an exploit, checksums fixed up: loading still works and runs nothing.
    (path / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    meta["files"][".metadata"] = {
        "size": (path / ".metadata").stat().st_size,
        "sha256": file_sha256(path / ".metadata"),
    }
    (path / META).write_text(json.dumps(meta))
    assert checkpoint.export_model(path)
    assert _saver(tmp_path).restore(_state(tmp_path), str(path)) == path

    # 2. A tensor blob replaced by an exploit pickle (index and checksums fixed up): refused, one line.
    blob = _distcp(path)
    payload = pickle.dumps(_Exploit(marker))
    blob.write_bytes(payload)
    for where in meta["tensors"].values():
        where.update(offset=0, length=len(payload))
    meta["files"][blob.name] = {"size": len(payload), "sha256": file_sha256(blob)}
    (path / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not load"):
        checkpoint.export_model(path)
    assert not marker.exists()


def test_world_writable_checkpoints_are_refused_unless_allowed(tmp_path: Path) -> None:
    state, saver = _state(tmp_path), _saver(tmp_path)
    path = _save_at(saver, state, 10)
    path.chmod(0o777)
    with pytest.raises(CheckpointError, match="world-writable"):
        _saver(tmp_path).restore(_state(tmp_path), None)
    trusting = Checkpointer(tmp_path, CheckpointConfig(allow_world_writable=True), rank=0)
    assert trusting.restore(_state(tmp_path), None) == path


def test_a_checkpoint_of_another_model_is_a_one_line_error(tmp_path: Path) -> None:
    _save_at(_saver(tmp_path), _state(tmp_path), 10)
    other = _state(tmp_path)
    cfg = other.config
    cfg.model = ModelConfig(num_classes=5, widths=(8, 16, 16, 16, 8), fc_width=16)
    other.model = build_model(cfg.model)
    other.optimizer = torch.optim.SGD(other.model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(CheckpointError, match="num-classes") as err:
        _saver(tmp_path).restore(other, None)
    assert "\n" not in str(err.value)
    assert "4 classes and this run 5" in str(err.value) and "new --run-dir" in str(err.value)


def test_pointers_and_resolve(tmp_path: Path) -> None:
    state, saver = _state(tmp_path), _saver(tmp_path)
    best = _save_at(saver, state, 10, is_best=True)
    last = _save_at(saver, state, 20)
    assert checkpoint.resolve(tmp_path, BEST) == best
    assert checkpoint.resolve(tmp_path, LATEST) == last
    assert checkpoint.resolve(tmp_path, str(best)) == best
    assert checkpoint.resolve(tmp_path, best.name) == best
    (RunDir(tmp_path).checkpoints / LATEST).write_text("../../etc")  # a hostile pointer
    assert checkpoint.latest(tmp_path) == last  # falls back to the newest complete one
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.resolve(tmp_path, str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no best checkpoint"):
        checkpoint.resolve(tmp_path / "empty", BEST)


def test_killed_between_rename_and_pointer_move_resumes_the_newer_one(tmp_path: Path) -> None:
    state, saver = _state(tmp_path), _saver(tmp_path)
    previous = _save_at(saver, state, 10)
    newer = _save_at(saver, state, 20)
    (RunDir(tmp_path).checkpoints / LATEST).write_text(previous.name)  # the pointer never moved
    assert _saver(tmp_path).restore(_state(tmp_path), None) == newer


def test_a_crash_right_after_an_explicit_resume_comes_back_to_it(tmp_path: Path) -> None:
    """--resume of an older checkpoint, killed before the first save: the requeue (no --resume) must not
    return to the abandoned lineage, even to a child of the checkpoint resumed."""
    state, saver = _state(tmp_path), _saver(tmp_path)
    chosen = _save_at(saver, state, 10)
    _save_at(saver, state, 20)  # its child, to be abandoned
    assert _saver(tmp_path).restore(_state(tmp_path), str(chosen)) == chosen
    assert checkpoint.latest(tmp_path) == chosen
    again = _saver(tmp_path)
    resumed = _state(tmp_path)
    assert again.restore(resumed, None) == chosen
    first = _save_at(again, resumed, 15)  # the new lineage's first save, then the pointer is lost
    (RunDir(tmp_path).checkpoints / LATEST).write_text(chosen.name)
    assert _saver(tmp_path).restore(_state(tmp_path), None) == first


def test_one_column_model_round_trips(tmp_path: Path) -> None:
    """The ablation's one full-width column (no split) is stored as a single tower."""
    cfg = RunConfig(run_dir=str(tmp_path))
    cfg.model = ModelConfig(num_classes=4, widths=(8, 16, 16, 16, 8), fc_width=16, towers=1)
    model = build_model(cfg.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = TrainState(model, optimizer, LRSchedule(cfg.schedule, 0.01), cfg, dict(LAYOUT), rank=0, tp_rank=0, towers=1)
    path = _save_at(_saver(tmp_path), state, 3)
    assert sorted(checkpoint.read_towers(path)) == [0]
    exported = checkpoint.export_model(path)
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())


def test_async_save_holds_the_state_of_its_step_not_what_came_after(tmp_path: Path) -> None:
    state = _state(tmp_path)
    saver = Checkpointer(tmp_path, CheckpointConfig(every_minutes=0, async_save=True), rank=0)
    path = _save_at(saver, state, 10)
    saved = _weights(state)
    with torch.no_grad():  # training goes on while the background thread writes
        for p in state.model.parameters():
            p.add_(1.0)
    saver.wait()
    assert checkpoint.verify(path) is None and checkpoint.latest(tmp_path) == path
    exported = checkpoint.export_model(path)
    assert all(torch.equal(saved[k], exported[k]) for k in saved)
    assert not list(RunDir(tmp_path).checkpoints.glob("*.tmp"))


def test_async_save_failure_is_one_line_and_keeps_the_previous(tmp_path: Path, monkeypatch) -> None:
    state = _state(tmp_path)
    saver = Checkpointer(tmp_path, CheckpointConfig(every_minutes=0, async_save=True), rank=0)
    good = _save_at(saver, state, 10)
    saver.wait()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", full_disk)
    _save_at(saver, state, 20)
    saver._pending.thread.join()
    assert saver.failed()  # what the trainer's control step shares with every rank
    with pytest.raises(CheckpointError, match="checkpoint at step 20 failed") as err:
        saver.wait()
    assert "\n" not in str(err.value) and "No space left" in str(err.value)
    assert checkpoint.latest(tmp_path) == good and not list(RunDir(tmp_path).checkpoints.glob("*.tmp"))


def test_a_full_disk_in_a_checkpoint_file_is_named_by_its_os_error(tmp_path: Path, monkeypatch) -> None:
    """The disk fills while DCP writes a file (the chaos campaign's seam): the one line names the OS error, not a
    source line of DCP's traceback that says "Error" first; nothing half-written stays; ``latest`` verifies."""
    from torch.distributed.checkpoint import filesystem

    from tests.support.chaos_rank import full_disk_on

    state, saver = _state(tmp_path), _saver(tmp_path)
    good = _save_at(saver, state, 10)
    monkeypatch.setattr(filesystem.FileSystem, "create_stream", filesystem.FileSystem.create_stream)  # restored after
    full_disk_on(lambda: True)
    with pytest.raises(CheckpointError) as err:
        _save_at(saver, state, 20)
    line = str(err.value)
    assert "\n" not in line and "intact" in line, line
    assert line.startswith("checkpoint at step 20 failed: rank 0: OSError: [Errno 28] No space left on device: "), line
    assert checkpoint.latest(tmp_path) == good and checkpoint.verify(good) is None
    assert not list(RunDir(tmp_path).checkpoints.glob("*.tmp"))


@pytest.mark.parametrize("batch, progress", [(128, (2, 40, 7)), (64, (3, 40, 0))])
def test_a_mid_epoch_checkpoint_goes_on_at_its_next_step_on_another_dp_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, batch: int, progress: tuple[int, int, int]
) -> None:
    """Saved at dp 1 seven steps into epoch 2, resumed at dp 4: the same global step (the epoch's order does not
    depend on the dp size); with another global batch the order cannot go on, so the next epoch, saying why."""
    state = _state(tmp_path)
    state.progress.epoch, state.progress.step_in_epoch = 2, 7
    _save_at(_saver(tmp_path), state, 40)
    fresh = _state(tmp_path, seed=1)
    fresh.layout = {"world_size": 4, "dp_size": 4, "tp_size": 1}
    fresh.config.optim.batch_size = batch
    with caplog.at_level(logging.INFO, logger="alexnet"):
        _saver(tmp_path).restore(fresh, None)
    assert (fresh.progress.epoch, fresh.progress.step, fresh.progress.step_in_epoch) == progress
    if progress[2]:
        assert "epoch 2 goes on at step 7, sample 896" in caplog.text, caplog.text
    else:
        assert "the global batch changed (128 -> 64): resuming at the start of epoch 3" in caplog.text, caplog.text


# ---------------------------------------------------------------------------------------------- format v1


def _v1_state(run: Path) -> TrainState:
    """A tp=1 trainer's state built from the kept run's own config.json, read as ``--config`` reads it."""
    from pipeline import config
    from pipeline.faults.divergence import DivergenceGuard

    cfg, _ = config.parse(["--config", str(run / "config.json"), "--run-dir", str(run)])
    model = build_model(cfg.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    guard = DivergenceGuard(cfg.faults.divergence, CPU, rank=0, world_size=1, dp_size=1)
    schedule = LRSchedule(cfg.schedule, cfg.optim.lr)
    return TrainState(model, optimizer, schedule, cfg, dict(LAYOUT), rank=0, tp_rank=0, divergence=guard)


def test_checkpoint_written_by_v1_verifies_and_evaluates(tmp_path: Path) -> None:
    from pipeline.tools.evaluate import load_member

    run = _v1_run(tmp_path)
    path = checkpoint.latest(run)
    assert path is not None and path.name == "step-00000002" and checkpoint.verify(path) is None
    assert checkpoint.candidates(run) == [path] and checkpoint.resolve(run, LATEST) == path
    member = load_member(run, LATEST)  # evaluate's way in: the config kept in meta.json
    assert member.step == 2 and member.cfg.model.widths == (16, 32, 48, 48, 32)
    logits = member.build(CPU)(torch.randn(2, 3, 227, 227))
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()


def test_checkpoint_written_by_v1_resumes_and_saves_the_same_bytes(tmp_path: Path) -> None:
    run = _v1_run(tmp_path)
    kept = checkpoint.latest(run)
    state = _v1_state(run)
    saver = Checkpointer(run, state.config.checkpoint, rank=0)
    assert saver.restore(state, None) == kept
    # Two steps into epoch 0 in the order drawn per dp rank, which this version does not draw: the next epoch.
    assert vars(state.progress) == {"epoch": 1, "step": 2, "step_in_epoch": 0}
    assert state.rng_restored == {"torch", "python", "python_gauss", "numpy", "numpy_gauss"}
    assert state.divergence.seen == 2 and state.divergence.rollbacks == []
    exported = checkpoint.export_model(kept)
    assert all(torch.equal(exported[k], v) for k, v in state.model.state_dict().items())
    # Saved again untouched, the state is the same bytes under the same names: the format did not move.
    again = saver.save(state, CPU)
    old, new = checkpoint.read_meta(kept), checkpoint.read_meta(again)
    assert again.name == "step-00000002-1" and checkpoint.verify(again) is None
    assert sorted(new) == sorted([*old, "sample_order"]) and new["tensors"] == old["tensors"]
    assert new["sample_order"] == SAMPLE_ORDER
    assert {k: new[k] for k in ("layout", "schedule", "divergence", "format", "lineage")} == {
        k: old[k] for k in ("layout", "schedule", "divergence", "format", "lineage")
    }
    assert new["progress"] == {**old["progress"], "epoch": 1, "step_in_epoch": 0}
    assert new["files"]["__0_0.distcp"] == old["files"]["__0_0.distcp"]
    saver.mark_health(0, 3)  # the step after both was taken: both good
    assert [m["health"] for _, m in checkpoint.readable(run)] == [checkpoint.GOOD, checkpoint.GOOD]
