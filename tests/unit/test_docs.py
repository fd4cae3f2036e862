"""Every config file validates, and every command the README, the sbatch scripts and the module docstrings
show parses with today's flags and names files that exist: a cited option or config can never go missing."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from pipeline import config
from tests.support import REPO

CONFIGS = sorted((REPO / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_loads_and_validates(path: Path) -> None:
    cfg, _ = config.parse(["--config", str(path)])
    assert config.validate(cfg) is cfg


def test_paper_config_is_the_paper() -> None:
    cfg, _ = config.parse(["--config", str(REPO / "configs" / "paper.toml")])
    assert cfg.to_dict() == {
        **config.RunConfig().to_dict(),
        "model": {**config.RunConfig().to_dict()["model"], "num_classes": 1000},
    }


def _documents() -> list[tuple[str, str]]:
    """(where, text) of everything that shows commands to a user."""
    docs = [("README.md", (REPO / "README.md").read_text())]
    for path in sorted((REPO / "slurm").glob("*.sh")):
        header = [
            line[1:]
            for line in path.read_text().splitlines()
            if line.startswith("#") and not line.startswith("#!") and not line.startswith("#SBATCH")
        ]
        docs.append((str(path.relative_to(REPO)), "\n".join(header)))
    for path in sorted(
        [*(REPO / "launch").glob("*.py"), *(REPO / "pipeline").rglob("*.py"), *(REPO / "preprocess").glob("*.py")]
    ):
        text = path.read_text()
        match = re.match(r'\s*(?:#.*\n)*\s*"""(.*?)"""', text, re.S)
        if match:
            docs.append((str(path.relative_to(REPO)), match.group(1)))
    return docs


COMMAND = re.compile(r"(?:python -m [\w.]+|torchrun\b|sbatch\b)[^`\n;]*")


def _commands() -> list[tuple[str, list[str]]]:
    found = []
    for where, text in _documents():
        text = re.sub(r"\\\\?\n\s*", " ", text)  # line continuations
        for match in COMMAND.finditer(text):
            line = re.split(r"\s#|\s{2,}#", match.group(0))[0].strip().rstrip(",;:)")
            if line.endswith(".") and not line.endswith("..."):
                line = line[:-1]
            try:
                words = shlex.split(line)
            except ValueError:
                continue
            found.append((where, words))
    return found


def _clean(words: list[str]) -> list[str]:
    """Usage notation to concrete arguments: [optional] kept, a|b takes a, `...` dropped."""
    out = []
    for w in words:
        w = w.strip("[]")
        if w == "..." and out and out[-1].startswith("-"):
            w = "VALUE"  # `--data ...`: an elided value
        if not w or w in ("...", "|") or w.endswith("..."):
            continue
        out.append(w.split("|")[0] if "|" in w and not w.startswith("-") else w)
    return out


def _check_paths(where: str, words: list[str]) -> None:
    for w in words:
        if re.match(r"^(configs|slurm)/[\w./-]+$", w):
            assert (REPO / w).exists(), f"{where}: cites {w}, which does not exist"


def _parse_train(where: str, args: list[str]) -> None:
    try:
        config.parse(args)
    except SystemExit as e:
        assert e.code == 0, f"{where}: launch.train {' '.join(args)} does not parse"


def _parse_module(where: str, module: str, args: list[str]) -> None:
    assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
    if module == "launch.train":
        return _parse_train(where, args)
    if module == "launch.submit" and "--" in args:
        cut = args.index("--")
        _parse_train(where, args[cut + 1 :])
        args = args[:cut]
    parser_of = getattr(
        importlib.import_module(module if module != "preprocess" else "preprocess.__main__"), "build_parser", None
    )
    if parser_of is None or not any(a.startswith("-") for a in args):
        return  # a mention in prose (`python -m preprocess shard`), not a command to run
    parser = parser_of()
    try:
        parser.parse_args(_fill_placeholders(parser, args))
    except SystemExit as e:
        assert e.code == 0, f"{where}: python -m {module} {' '.join(args)} does not parse"


def _fill_placeholders(parser, args: list[str]) -> list[str]:
    """A placeholder (SPLIT) for an option with choices becomes its first choice."""
    actions = [a for a in parser._actions]
    for sub in (a for a in actions if a.choices and isinstance(a.choices, dict)):
        if args and args[0] in sub.choices:
            actions += sub.choices[args[0]]._actions
    out = list(args)
    for i in range(1, len(out)):
        action = next((a for a in actions if out[i - 1] in a.option_strings), None)
        if action is not None and action.choices and re.fullmatch(r"[A-Z][A-Z0-9_]+", out[i]):
            out[i] = list(action.choices)[0]
    return out


def test_every_documented_command_parses() -> None:
    commands = _commands()
    assert len(commands) > 20, commands  # the scan itself works
    checked = set()
    for where, words in commands:
        words = _clean(words)
        _check_paths(where, words)
        if words[0] == "python" and words[1] == "-m":
            _parse_module(where, words[2], words[3:])
            checked.add(words[2])
        elif words[0] == "torchrun" and "-m" in words:
            i = words.index("-m")
            _parse_module(where, words[i + 1], words[i + 2 :])
        elif words[0] == "sbatch":
            script = next((w for w in words if w.startswith("slurm/")), None)
            if script == "slurm/train.sh":
                _parse_train(where, words[words.index(script) + 1 :])
            elif script == "slurm/preprocess.sh":
                _parse_module(where, "preprocess", ["shard", *words[words.index(script) + 1 :]])
    assert {"launch.train", "launch.submit", "preprocess", "pipeline.tools.evaluate"} <= checked, checked
