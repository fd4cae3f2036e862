"""What tests/unit/test_documented_commands.py and tests/integration/test_documented_commands.py share."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support import PYTHON, REPO, flags
from tests.support.processes import run_captured

OURS = ("preprocess", "pipeline", "launch", "tests")


# The word after a module is a subcommand candidate unless it starts a path ("runs/a32", "out.json").
INVOCATION = re.compile(r"(?<![\w.-])-m\s+([a-z_][\w.]*)(?:[ \t]+([a-z][a-z0-9-]*)(?![\w-]|/|\.\w))?")


MAKE = re.compile(r"(?:^[ \t]*|`|\$ )make\s+([a-z][\w-]*)", re.M)  # indented in a code block too


SCRIPT = re.compile(r"(?:\b(?:sbatch|bash)\b[^\n`]*?|(?<![\w/.-])\./)((?:slurm|\.ci)/[\w.-]+)")


def _here(tmp: Path) -> dict[str, list[list[str]]]:
    """The cheap invocations, run in this file: key -> the commands (arguments after ``python -m``), in order."""
    small, big, natural, demo = tmp / "small", tmp / "big", tmp / "natural", tmp / "demo"
    return {
        "python -m pipeline.bench.model": [
            flags(
                "pipeline.bench.model --device cpu --batch-size 2 --steps 1 --warmup 0 --no-compile --json {}",
                tmp / "m.json",
            )
        ],
        "python -m preprocess bench": [
            flags("preprocess bench --images 6 --workers 0 --repeat 1 --json {}", tmp / "p.json")
        ],
        "python -m preprocess finalize": [
            flags("preprocess make-demo {} --classes 2 --train-per-class 3 --val-per-class 1", demo / "src"),
            flags(
                "preprocess shard --src {} --out {} --split train --no-finalize --no-progress",
                demo / "src" / "train",
                demo / "shards",
            ),
            flags("preprocess finalize --out {} --split train --workers 1", demo / "shards"),
        ],
        "python -m tests.support.datasets": [flags("tests.support.datasets {} --images 24 --shard-size 12", natural)],
        "python -m pipeline.bench.data": [
            [
                *flags("pipeline.bench.data --data {} --batch-size 4 --workers 1 --steps 2 --rounds 1", natural),
                *flags("--loaders dali --means channel --no-baseline --json {}", tmp / "d.json"),
            ]
        ],
        "python -m pipeline.bench.divergence": [
            flags("pipeline.bench.divergence --narrow --batch-size 2 --steps 2 --rounds 1 --device cpu")
        ],
        "python -m pipeline.bench.profiling": [
            flags("pipeline.bench.profiling --steps 2 --warmup 1 --rounds 1 --window-steps 2 --json {}", tmp / "f.json")
        ],
        "python -m pipeline.bench.scale": [
            flags("preprocess replicate --src {} --out {} --samples 400", small, big),
            flags("pipeline.bench.scale --small {} --big {} --rounds 1 --no-hashing --no-trainer", small, big),
        ],
    }


def _sources() -> dict[str, str]:
    """(where -> text) of everything that shows commands to a user, line continuations joined."""
    paths = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "Makefile"]
    paths += [*sorted((REPO / "slurm").glob("*.sh")), REPO / ".ci" / "run"]
    return {str(p.relative_to(REPO)): re.sub(r"\\\n\s*", " ", p.read_text()) for p in paths}


def _modules(texts: dict[str, str]) -> dict[str, set[str]]:
    """Our documented modules -> the words that follow them (subcommand candidates)."""
    found: dict[str, set[str]] = {}
    for text in texts.values():
        for m in INVOCATION.finditer(text):
            module = m.group(1)
            if module.split(".")[0] in OURS:
                found.setdefault(module, set()).update([m.group(2)] if m.group(2) else [])
    return found


HELP_RUNNER = """
import contextlib, io, json, runpy, sys
results = {}
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    sys.argv = [argv[0], *argv[1:]]
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code = f"{type(e).__name__}: {e}"
    results[" ".join(argv)] = [code, out.getvalue()]
print(json.dumps(results))
"""


def _helps(argvs: list[list[str]]) -> dict[str, tuple[object, str]]:
    """``python -m M [SUB] --help`` for each, run as __main__ in one fresh interpreter (imports shared)."""
    proc = run_captured([PYTHON, "-c", HELP_RUNNER, json.dumps(argvs)], 300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _documented() -> tuple[set[str], dict[str, str]]:
    """Every documented invocation key, and the --help text of every documented module (whose own docstring
    may show further commands: they are documented too)."""
    texts = _sources()
    keys: set[str] = set()
    helps: dict[str, str] = {}
    pending = _modules(texts)
    while pending:
        modules = sorted(set(pending) - set(helps))
        # One interpreter per round: each module's help and, for each word documented after it, `M WORD --help`
        # (only those that turn out to be subcommands are judged).
        results = _helps([argv for m in modules for argv in [[m, "--help"], *([m, w, "--help"] for w in pending[m])]])
        new: dict[str, set[str]] = {}
        for m in modules:
            code, text = results[f"{m} --help"]
            assert code in (0, None), f"python -m {m} --help exits {code}:\n{text[-3000:]}"
            helps[m] = text
            # Subcommands: the help's {a,b,c}; a documented word among them is a documented subcommand.
            choices = {c for group in re.findall(r"\{([\w,-]+)\}", text) for c in group.split(",")}
            choices |= {w for w in pending[m] if f"{m} {w} " in text}  # a usage line without argparse
            unknown = sorted(pending[m] - choices)
            assert not unknown, f"documented `python -m {m} {unknown[0]}`: not a subcommand of {m} ({sorted(choices)})"
            subs = pending[m] & choices
            if subs:
                for s in sorted(subs):
                    code, sub_text = results[f"{m} {s} --help"]
                    assert code in (0, None), f"python -m {m} {s} --help exits {code}:\n{sub_text[-3000:]}"
                    keys.add(f"python -m {m} {s}")
            else:
                keys.add(f"python -m {m}")
            for module, words in _modules({m: text}).items():
                if module not in helps:
                    new.setdefault(module, set()).update(words)
        pending = new
    for where, text in texts.items():
        if where != "Makefile":
            keys.update(f"make {t}" for t in MAKE.findall(text))
        keys.update(f"bash {s}" for s in SCRIPT.findall(text))
    return keys, helps


@pytest.fixture(scope="module")
def documented() -> tuple[set[str], dict[str, str]]:
    return _documented()
