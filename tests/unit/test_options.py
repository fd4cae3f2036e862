"""Absurd options and odd paths: one `error:` line naming the option, exit 2, nothing written. And the
operator's LR-drop requests: validated when taken, reported when they cannot be applied."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest

from basics.errors import UserError
from launch import train as launch_train
from pipeline.schedule import ManualRequests, request_manual_drop
from preprocess import format as fmt
from tests.support import REPO, flags


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    fmt.write_manifest(root, fmt.Manifest(classes=[{"index": i, "wnid": f"n{i:08d}", "name": ""} for i in range(4)]))
    return root


BAD_OPTIONS = [
    (["--train.val-every", "0"], "--train.val-every"),
    (["--train.log-every", "0"], "--train.log-every"),
    (["--train.control-every", "0"], "--train.control-every"),
    (["--epochs", "0"], "--train.epochs"),
    (["--max-steps", "-1"], "--train.max-steps"),
    (["--lr", "nan"], "--optim.lr"),
    (["--lr", "inf"], "--optim.lr"),
    (["--lr", "-0.01"], "--optim.lr"),
    (["--optim.momentum", "-0.5"], "--optim.momentum"),
    (["--optim.momentum", "1"], "--optim.momentum"),
    (["--model.dropout", "2"], "--model.dropout"),
    (["--checkpoint.keep-last", "0"], "--checkpoint.keep-last"),
    (["--schedule.patience", "0"], "--schedule.patience"),
    (["--num-classes", "1"], "--model.num-classes"),
    (["--num-classes", "3"], "--num-classes 3"),  # fewer than the dataset's 4 classes
    (["--model.widths", "16,32,48,48"], "--model.widths"),
    (["--batch-size", "0"], "--optim.batch-size"),
    (["--tp", "3"], "--train.tp"),
    (flags("--model.towers 1 --tp 2"), "--model.towers 1"),
]


@pytest.mark.parametrize("argv,named", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_and_writes_nothing(
    argv: list[str], named: str, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert launch_train.main([*flags("--data {} --run-dir {}", dataset, run_dir), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert not run_dir.exists()


def test_config_file_types_are_checked(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"kept": true}')
    for text, named in [
        ('[train]\nepochs = "ten"\n', "--train.epochs"),
        ("[optim]\nlr = true\n", "--optim.lr"),
        ("[model]\nwidths = [16, 32, 48, 48, 3.5]\n", "--model.widths"),
        ("[train]\nno_such_option = 1\n", "no_such_option"),
        ("[train\n", "not valid TOML"),
    ]:
        cfg = tmp_path / "bad.toml"
        cfg.write_text(text)
        assert launch_train.main(flags("--config {} --data {} --run-dir {}", cfg, dataset, run_dir)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], (text, err)
    assert (run_dir / "config.json").read_text() == '{"kept": true}'  # a failed start overwrites nothing
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]


def test_paths_that_are_not_directories(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv, named in [
        (flags("--data {} --run-dir {}", a_file, tmp_path / "r"), "--data"),
        (flags("--data {} --run-dir {}", tmp_path / "missing", tmp_path / "r"), "--data"),
        (flags("--data {} --run-dir {}", dataset, a_file), "--run-dir"),
        (flags("--data {} --run-dir {}", dataset, a_file / "sub"), "--run-dir"),
    ]:
        assert launch_train.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], (argv, err)
    assert not (tmp_path / "r").exists()


def test_num_classes_defaults_to_the_dataset(dataset: Path) -> None:
    from pipeline import config

    cfg, _ = config.parse(["--data", str(dataset)])
    assert cfg.model.num_classes == 0
    config.resolve_num_classes(cfg, 4)
    assert cfg.model.num_classes == 4


def test_lr_drop_requests_are_reported_not_swallowed(tmp_path: Path) -> None:
    requests = ManualRequests(tmp_path)
    (tmp_path / "lr_drop.request.odd").mkdir()  # a directory where a request would be: ignored, no crash
    first = request_manual_drop(tmp_path, "val flat since epoch 40")
    second = request_manual_drop(tmp_path, "me too")
    pending = requests.pending()
    assert pending == [first, second]
    note = requests.settle(pending, step=7, applied=True, max_drops=3)
    assert "2 LR-drop requests" in note and "val flat since epoch 40" in note and "me too" in note
    assert (tmp_path / "lr_drop.applied-step7").is_file() and (tmp_path / "lr_drop.merged-step7-1").is_file()
    assert requests.pending() == []

    late = request_manual_drop(tmp_path, "one more")
    note = requests.settle(requests.pending(), step=9, applied=False, max_drops=3)
    assert "rejected" in note and "3 drops are used up" in note and "one more" in note
    assert not late.exists() and (tmp_path / "lr_drop.rejected-step9").is_file()


def test_lr_drop_cli_odd_paths(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    unwritable = tmp_path / "ro"
    unwritable.mkdir()
    (unwritable / "config.json").write_text("{}")
    unwritable.chmod(0o500)
    try:
        for target in (tmp_path / "missing", a_file, tmp_path, unwritable):
            proc = subprocess.run(
                [sys.executable, *flags("-m launch.lr_drop {}", target)],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )
            lines = proc.stderr.strip().splitlines()
            if target == unwritable and proc.returncode == 0:  # root ignores permissions
                continue
            assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (target, proc.stderr)
    finally:
        unwritable.chmod(0o700)


# ------------------------------------------------------------------------ where options are checked


def test_every_check_names_a_field_and_every_section_is_checked() -> None:
    """A rule's names and its message's {placeholders} are fields of its section (a rename cannot drop a check);
    every section checks itself (``Section``); every default passes."""
    import dataclasses
    import re

    from pipeline import config, options

    for cls in options.sections(config.RunConfig):
        assert issubclass(cls, options.Section), f"{cls.__name__} is never checked"
        assert cls in options._PLACES, f"{cls.__name__}: its errors would not name the flag"
        for rule in cls.RULES if issubclass(cls, options.Section) else ():
            for name in rule.names:
                section = cls
                for part in name.split("."):
                    fields = {f.name: f for f in dataclasses.fields(section)}
                    assert part in fields, f"{cls.__name__}: a rule names {name!r}, which is no field"
                    section = typing.get_type_hints(section)[part]
            assert set(re.findall(r"\{([\w.]+)\}", rule.message)) <= set(rule.names), rule.message
        options.check_section(cls())
    checked = [leaf.path for leaf in options.leaves(config.RunConfig) if leaf.check]
    assert len(checked) >= 45 and "faults.hang.timeout" in checked and "checkpoint.keep_last" in checked


def test_a_rule_naming_no_field_fails_at_once() -> None:
    from dataclasses import dataclass

    from pipeline import options

    @dataclass
    class Renamed(options.Section):
        timeout: float = 1.0
        RULES = (options.Rule(("hang_timeout",), lambda t: t > 0, "{hang_timeout} must be > 0"),)

    with pytest.raises(AttributeError, match="hang_timeout"):
        Renamed()


def test_help_shows_each_options_doc_default_range_and_old_name() -> None:
    from pipeline import config

    text = " ".join(config.build_parser().format_help().split())
    assert "--train.log-every INT steps between console/TensorBoard scalars" in text
    assert "(default: 20; at least 1)" in text
    assert "(default: 120.0; a finite number >= 0 (0 = no watchdog); was --train.hang-timeout)" in text
    assert "--train.hang-timeout" not in text.replace("was --train.hang-timeout", "")  # the old spelling is hidden


def test_old_flag_spellings_and_config_keys_land_in_their_new_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline import config

    cfg, _ = config.parse(flags("--train.hang-timeout 7 --train.on-divergence rollback --train.straggler-window 2"))
    assert (cfg.faults.hang.timeout, cfg.faults.divergence.action, cfg.faults.stragglers.window) == (7, "rollback", 2)
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes[0] == "note: --train.hang-timeout is now --faults.hang.timeout; the old name still works", notes
    assert len(notes) == 3
    old = tmp_path / "old.toml"
    old.write_text("[train]\nepochs = 2\nspike-factor = 0\nlease_minutes = 5\n\n[faults.hang]\ntimeout = 9\n")
    cfg, _ = config.parse(["--config", str(old)])
    assert (cfg.train.epochs, cfg.faults.divergence.spike_factor, cfg.faults.lease.minutes) == (2, 0, 5)
    assert cfg.faults.hang.timeout == 9
    with pytest.raises(UserError, match="--faults.divergence.spike-window must be at least 2"):
        config.parse(flags("--train.spike-window 1"))


# The config.json and meta.json "config" of a run written before the fault settings left [train].
OLD_TRAIN = {
    "epochs": 3, "max_steps": 0, "seed": 0, "tp": 1, "amp": "none", "log_every": 1, "control_every": 10,
    "val_every": 1, "ten_crop": False, "histogram_every": 1000, "device": "auto", "lease_minutes": 30.0,
    "grad_compression": "none", "hang_timeout": 0.0, "slow_phase_timeout": 480.0, "collective_timeout_min": 10.0,
    "straggler_threshold": 1.5, "straggler_window": 5, "on_divergence": "rollback", "rollback_lr_factor": 0.5,
    "max_rollbacks": 3, "spike_sigma": 6.0, "spike_window": 8, "spike_warmup": 0, "spike_factor": 10.0,
}  # fmt: skip


def test_a_saved_config_of_the_old_layout_loads_compares_and_reports() -> None:
    from pipeline import config
    from pipeline.tools import report

    saved = {**config.RunConfig().to_dict(), "train": dict(OLD_TRAIN)}
    del saved["faults"]
    new = config.upgrade(saved)
    added_since = {"record_samples"}  # train options newer than the old layout: their defaults apply
    assert set(new["train"]) | added_since == set(config.TrainConfig().__dataclass_fields__)
    assert saved["train"] == OLD_TRAIN
    assert new["faults"]["divergence"] == {
        "action": "rollback", "rollback_lr_factor": 0.5, "max_rollbacks": 3, "spike_sigma": 6.0, "spike_window": 8,
        "spike_warmup": 0, "spike_factor": 10.0,
    }  # fmt: skip
    cfg = config.from_dict(saved, source="meta.json")  # evaluate's way, and --config RUN/config.json
    assert cfg.faults.hang.timeout == 0 and cfg.faults.divergence.spike_window == 8 and cfg.train.epochs == 3
    # A resume from such a checkpoint lists what changed under today's names, and nothing else.
    now = config.from_dict({"train": {**OLD_TRAIN, "epochs": 4, "hang_timeout": 120.0}}).to_dict()
    # Options the old layout never had (issue 37's) show as `?`, as any option one side lacks does.
    assert config.changes(saved, now) == [
        "--faults.divergence.keep-lr-scale ? -> False",
        "--faults.divergence.max-skips ? -> 10",
        "--faults.divergence.max-skips-in-a-row ? -> 2",
        "--faults.divergence.rerun ? -> True",
        "--faults.hang.timeout 0.0 -> 120.0",
        "--train.epochs 3 -> 4",
        "--train.record-samples ? -> False",
    ]
    assert "No rollback (--faults.divergence.action rollback)." in report.divergence_section({}, saved)
    assert ("faults.divergence.spike_window", 8, 128) in report.config_diff(saved)


def test_ablate_config_names_a_file_of_configs_or_the_defaults(tmp_path: Path) -> None:
    from pipeline.tools import ablate

    assert ablate.base_config("paper") == REPO / "configs" / "paper.toml"
    assert ablate.base_config("demo") == REPO / "configs" / "demo.toml"
    assert ablate.base_config("defaults") is None
    mine = tmp_path / "mine.toml"
    mine.write_text("")
    assert ablate.base_config(str(mine)) == mine
    with pytest.raises(UserError, match="--config papr: no such file; give a config file, one of demo, paper"):
        ablate.base_config("papr")
