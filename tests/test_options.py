"""Absurd options and odd paths: one `error:` line naming the option, exit 2, nothing written. And the
operator's LR-drop requests: validated when taken, reported when they cannot be applied."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
