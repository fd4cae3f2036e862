"""Every command README.md, docs/, the Makefile, slurm/*.sh and the ``--help`` texts show still runs.

test_docs.py checks that documented arguments parse; this file checks that the commands run: every
documented ``python -m MODULE [SUBCOMMAND]`` exists and its ``--help`` exits 0 (the module run as
``__main__``, as ``python -m`` does), every word documented after a module is one of its subcommands,
every documented ``make TARGET`` and script exists, and every documented invocation is run somewhere in
the suite: the cheap ones here on tiny data and the CPU (``test_cheap_documented_commands_run``), the
others by the test named in ``COVERED``, whose source must show it running the command. A newly
documented command with neither fails ``test_every_documented_command_is_run_by_the_suite`` (the
``pipeline.bench.model`` crash went unseen because no test ran it; a fast test now runs it on a
narrow model).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from pipeline.model import ModelConfig, build_model
from tests.support import NARROW_FC_WIDTH, NARROW_WIDTHS, PYTHON, REPO, flags
from tests.support.datasets import make_dataset
from tests.support.processes import small_env

OURS = ("preprocess", "pipeline", "launch", "tests")
# The word after a module is a subcommand candidate unless it starts a path ("runs/a32", "out.json").
INVOCATION = re.compile(r"(?<![\w.-])-m\s+([a-z_][\w.]*)(?:[ \t]+([a-z][a-z0-9-]*)(?![\w-]|/|\.\w))?")
MAKE = re.compile(r"(?:^[ \t]*|`|\$ )make\s+([a-z][\w-]*)", re.M)  # indented in a code block too
SCRIPT = re.compile(r"(?:\b(?:sbatch|bash)\b[^\n`]*?|(?<![\w/.-])\./)((?:slurm|\.ci)/[\w.-]+)")

# Invocations run by other tests (documented key -> the test that runs it, in process through its ``main``
# or as a subprocess). What is missing here and from HERE fails the completeness test.
COVERED = {
    "python -m preprocess shard": "tests/test_shards.py::test_index_matches_dali_wds2idx",
    "python -m preprocess make-demo": "tests/test_slurm.py::test_preprocess_array_job",
    "python -m preprocess replicate": (
        "tests/test_data_scale.py::test_replicate_links_shards_up_to_the_count_and_the_loaders_read_it"
    ),
    "python -m launch.train": "tests/test_faults.py::test_truncated_shard_is_a_one_line_error",
    "python -m launch.submit": "tests/test_submit.py::test_dry_run_prints_the_sbatch_script_and_submits_nothing",
    "python -m launch.preflight": "tests/test_preflight.py::test_preflight_prints_one_table_of_every_rank",
    "python -m launch.lr_drop": "tests/test_train.py::test_manual_lr_drop_reaches_every_rank_and_survives_tp_change",
    "python -m pipeline.faults.lease check": "tests/test_lease.py::test_check_cli_exits_2_with_one_line",
    "python -m pipeline.model": "tests/test_model.py::test_layer_table_cli",
    "python -m pipeline.bench.train": "tests/test_bench_train.py::test_tower_split_and_checkpoint_stall",
    "python -m pipeline.tools.evaluate": "tests/test_evaluate.py::test_under_torchrun_equals_one_process",
    "python -m pipeline.tools.analysis filters": "tests/test_analysis.py::test_figures_of_a_trained_run",
    "python -m pipeline.tools.analysis neighbours": "tests/test_analysis.py::test_figures_of_a_trained_run",
    "python -m pipeline.tools.report": "tests/test_ablate_report.py::test_run_report",
    "python -m pipeline.tools.ablate": (
        "tests/test_ablate_report.py::test_runner_trains_one_switch_per_run_and_tabulates"
    ),
    "bash slurm/train.sh": "tests/test_slurm_train.py::test_one_node_job_completes",
    "bash slurm/preprocess.sh": "tests/test_slurm.py::test_preprocess_array_job",
    "make test": "tests/test_documented_commands.py::test_every_documented_make_target_exists",  # the suite itself
    "make demo": "tests/test_documented_commands.py::test_every_documented_make_target_exists",  # its steps: above
    "make bench": "tests/test_documented_commands.py::test_cheap_documented_commands_run",  # preprocess bench
    "make test-fast": "tests/test_tiers.py::test_make_test_fast_selects_the_fast_tier",
    "make gpu-check": "tests/test_gpu_path.py::test_gpu_check_refuses_in_one_line_without_cuda",  # its CPU answer
    "python -m pipeline.bench.gpu_check": "tests/test_gpu_path.py::test_gpu_check_refuses_in_one_line_without_cuda",
    "python -m launch.profile": "tests/test_profile.py::test_profile_requested_while_training",
    "python -m pipeline.tools.profile": "tests/test_profile.py::test_profile_requested_while_training",
}


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


HERE = ("python -m pipeline.bench.model", "python -m preprocess bench", "python -m preprocess finalize",
        "python -m tests.support.datasets",
        "python -m pipeline.bench.data", "python -m pipeline.bench.divergence", "python -m pipeline.bench.profiling",
        "python -m pipeline.bench.scale")  # fmt: skip


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
    proc = subprocess.run(
        [PYTHON, "-c", HELP_RUNNER, json.dumps(argvs)],
        cwd=REPO,
        env=small_env(),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
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


def _reach(path: str, name: str) -> tuple[list[str], set[str]]:
    """What a test runs, as far as its source shows: the string constants (in source order) and the modules
    whose ``main`` it calls, of the test, the fixtures it takes and the functions it calls, followed into the
    same file, conftest.py and tests/support/ (a test that only imports a module's functions runs no command)."""
    trees: dict[Path, ast.Module] = {}

    def parsed(file: Path) -> ast.Module:
        if file not in trees:
            trees[file] = ast.parse(file.read_text())
        return trees[file]

    def imports(file: Path) -> dict[str, str]:
        """Local name -> the dotted name it is bound to (a module, or MODULE.ATTR)."""
        bound: dict[str, str] = {}
        for node in parsed(file).body:
            if isinstance(node, ast.ImportFrom) and node.module:
                bound.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
            elif isinstance(node, ast.Import):
                bound.update({a.asname or a.name: a.name for a in node.names})
        return bound

    def defined(file: Path, local: str) -> ast.FunctionDef | None:
        return next((n for n in parsed(file).body if isinstance(n, ast.FunctionDef) and n.name == local), None)

    strings: list[tuple[int, int, str]] = []
    mains: set[str] = set()
    seen: set[tuple[Path, str]] = set()
    todo = [(REPO / path, name)]
    while todo:
        file, local = todo.pop()
        function = defined(file, local)
        if (file, local) in seen or function is None:
            continue
        seen.add((file, local))
        bound, found = imports(file), []
        for arg in function.args.args:  # fixtures: this file's, then conftest's
            todo += [(file, arg.arg), (REPO / "tests" / "conftest.py", arg.arg)]
        # The signature and body only: a decorator's parameters (pytest.mark.parametrize) run nothing.
        for node in (n for part in (function.args, *function.body) for n in ast.walk(part)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.append((node.lineno, node.col_offset, node.value))
            elif isinstance(node, ast.Name):
                target = bound.get(node.id, "")
                if target.startswith("tests.support."):
                    module, _, attr = target.rpartition(".")
                    where = REPO / Path(*module.split("."))
                    todo.append((where / "__init__.py" if where.is_dir() else where.with_suffix(".py"), attr))
                else:
                    todo.append((file, node.id))
                if target.endswith(".main"):  # main imported by name, under any alias
                    mains.add(target.removesuffix(".main"))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "main":
                if isinstance(node.func.value, ast.Name) and node.func.value.id in bound:
                    mains.add(bound[node.func.value.id])
        strings += sorted(found)
    return [text for _, _, text in strings], {m.removesuffix(".__main__") for m in mains}


def _runs(key: str, strings: list[str], mains: set[str]) -> bool:
    """Whether a test whose reach is (strings, mains) runs the documented invocation ``key``: the module's
    ``main`` called or ``-m MODULE`` among its strings, a subcommand as a string of its own (or a string's
    first word), a script by its path."""
    words, text = key.split(), " ".join(strings)
    if words[0] == "bash":  # the script by its path (REPO / "slurm" / "train.sh" leaves "slurm train.sh")
        folder, script = words[1].split("/")
        return re.search(rf"(?<![\w.-]){re.escape(folder)}[/ ]{re.escape(script)}\b", text) is not None
    module, sub = words[2], words[3:]
    ran = module in mains or re.search(rf"(?<![\w-])-m {re.escape(module)}(?![\w.])", text) is not None
    told = [re.escape(f"-m {module} {s}") for s in sub]  # "-m M SUB ..." in one string
    return ran and all(
        any(t.split()[:1] == [s] for t in strings) or re.search(rf"{t}\b", text) for s, t in zip(sub, told)
    )


@pytest.fixture(scope="module")
def documented() -> tuple[set[str], dict[str, str]]:
    return _documented()


def test_every_documented_module_exists_and_its_help_runs(documented: tuple[set[str], dict[str, str]]) -> None:
    keys, helps = documented
    # The scan itself works: the README's main commands are among what it found.
    assert {"launch.train", "preprocess", "pipeline.tools.evaluate", "pipeline.bench.model"} <= helps.keys(), helps
    assert {"python -m preprocess shard", "make demo", "bash slurm/train.sh"} <= keys, sorted(keys)
    for module, text in helps.items():
        assert "usage:" in text, f"python -m {module} --help printed no usage:\n{text[:2000]}"


def test_every_documented_command_is_run_by_the_suite(documented: tuple[set[str], dict[str, str]]) -> None:
    keys, _ = documented
    missing = sorted(keys - COVERED.keys() - set(HERE))
    assert not missing, f"documented but run by no test (run it in _here, or name its test in COVERED): {missing}"
    stale = sorted((COVERED.keys() | set(HERE)) - keys)
    assert not stale, f"no longer documented, drop from COVERED/HERE: {stale}"
    assert set(HERE) == set(_here(Path("/nonexistent")))
    for key in sorted(k for k in keys if k.startswith("bash ")):
        assert (REPO / key.split()[1]).is_file(), f"documented `{key}`: no such script"
    for key, test in COVERED.items():
        path, name = test.split("::")
        tree = ast.parse((REPO / path).read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert name in names, f"COVERED[{key!r}] names {test}, which does not exist"
        # A make target's recipe is documented commands (the Makefile is a source above): each is checked.
        if not key.startswith("make "):
            assert _runs(key, *_reach(path, name)), f"COVERED[{key!r}] names {test}, whose source never runs it"


def test_every_documented_make_target_exists(documented: tuple[set[str], dict[str, str]]) -> None:
    """Each documented target is a rule of the Makefile (``make -n`` resolves it without running anything);
    ``.ci/run`` is ``make test``. The targets' own commands are documented invocations, checked above."""
    keys, _ = documented
    assert (REPO / ".ci" / "run").read_text().strip().endswith("make test")
    targets = sorted(k.split()[1] for k in keys if k.startswith("make "))
    proc = subprocess.run(
        ["make", "-n", *targets], cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr
    for target in targets:
        assert re.search(rf"^{re.escape(target)}:", (REPO / "Makefile").read_text(), re.M), target


@pytest.mark.slow
def test_cheap_documented_commands_run(tmp_path: Path) -> None:
    """The documented commands no other test runs, on tiny data and the CPU: each exits 0."""
    make_dataset(tmp_path / "small", {"train": [100, 100], "val": [6]}, quality=60)  # bench.scale: 3 batches of 64

    def run(key: str, commands: list[list[str]]) -> list[str]:
        for args in commands:  # in order: a later one may read what an earlier one wrote
            proc = subprocess.run(
                [PYTHON, "-m", *args],
                cwd=REPO,
                env=small_env(),
                capture_output=True,
                text=True,
                timeout=400,
                stdin=subprocess.DEVNULL,
            )
            if proc.returncode != 0:
                return [f"{key}: python -m {' '.join(args)} exits {proc.returncode}:\n{proc.stderr[-2000:]}"]
        return []

    here = _here(tmp_path)
    # bench.data reads what tests.support.datasets writes: one chain; the others side by side.
    data_chain = here.pop("python -m tests.support.datasets") + here.pop("python -m pipeline.bench.data")
    chains = {"python -m tests.support.datasets, pipeline.bench.data": data_chain, **here}
    with ThreadPoolExecutor(len(chains)) as pool:
        failures = [f for found in pool.map(run, chains, chains.values()) for f in found]
    assert not failures, "\n\n".join(failures)
    assert len(json.loads((tmp_path / "m.json").read_text())["results"]) == 5  # every variant without compile


def test_bench_model_runs_every_variant_on_a_narrow_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pipeline.bench.model``'s own code path (its ``ModelConfig``, ``build_model``, labels and loss) in this
    process, on the narrow widths and one image: the paper widths make it a slow test's job
    (``test_cheap_documented_commands_run``), and the crash this file was written for (``ModelConfig()``'s
    0 classes, a ``ValueError`` at run time) went unseen because only a slow test ran it."""
    import torchvision

    from pipeline.bench import model as bench

    def narrow(**fields: object) -> ModelConfig:  # the bench's own fields, narrower layers
        return ModelConfig(**fields, widths=NARROW_WIDTHS, fc_width=NARROW_FC_WIDTH)  # type: ignore[arg-type]

    monkeypatch.setattr(bench, "ModelConfig", narrow)
    # torchvision's baseline has fixed widths: the narrow paper model stands in, with the classes it is asked for.
    monkeypatch.setattr(torchvision.models, "alexnet", lambda num_classes: build_model(narrow(num_classes=num_classes)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # main sets it
    out = tmp_path / "m.json"
    assert bench.main(flags("--device cpu --batch-size 1 --steps 1 --warmup 0 --no-compile --json {}", out)) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results][:2] == ["torchvision alexnet (baseline)", "paper AlexNet fp32"]
    assert len(results) == 5 and all(r["step_ms"] > 0 for r in results), results
