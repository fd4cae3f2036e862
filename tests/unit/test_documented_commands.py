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
from pathlib import Path

import pytest
import torch

from pipeline.model import ModelConfig, build_model
from tests.support import NARROW_FC_WIDTH, NARROW_WIDTHS, REPO, flags
from tests.support.documented_commands import (
    _here,
)

# Invocations run by other tests (documented key -> the test that runs it, in process through its ``main``
# or as a subprocess). What is missing here and from HERE fails the completeness test.
COVERED = {
    "python -m preprocess shard": "tests/unit/test_shards.py::test_index_matches_dali_wds2idx",
    "python -m preprocess make-demo": "tests/integration/test_slurm.py::test_preprocess_array_job",
    "python -m preprocess replicate": (
        "tests/unit/test_data_scale.py::test_replicate_links_shards_up_to_the_count_and_the_loaders_read_it"
    ),
    "python -m launch.train": "tests/unit/test_faults.py::test_truncated_shard_is_a_one_line_error",
    "python -m launch.submit": "tests/unit/test_submit.py::test_dry_run_prints_the_sbatch_script_and_submits_nothing",
    "python -m launch.preflight": "tests/integration/test_preflight.py::test_preflight_prints_one_table_of_every_rank",
    "python -m launch.lr_drop": (
        "tests/integration/test_train.py::test_manual_lr_drop_reaches_every_rank_and_survives_tp_change"
    ),
    "python -m pipeline.faults.lease check": "tests/unit/test_lease.py::test_check_cli_exits_2_with_one_line",
    "python -m pipeline.faults.crashes check": (
        "tests/unit/test_crashes.py::test_an_attempt_between_that_did_not_crash_resets_it"
    ),
    "python -m pipeline.faults.nodes exclude": (
        "tests/unit/test_nodes.py::test_hangs_feed_the_ledger_beside_the_run_directories"
    ),
    "python -m pipeline.faults.nodes record-hangs": (
        "tests/unit/test_nodes.py::test_hangs_feed_the_ledger_beside_the_run_directories"
    ),
    "python -m pipeline.model": "tests/unit/test_model.py::test_layer_table_cli",
    "python -m pipeline.bench.train": "tests/integration/test_bench_train.py::test_tower_split_and_checkpoint_stall",
    "python -m pipeline.tools.evaluate": "tests/integration/test_evaluate.py::test_under_torchrun_equals_one_process",
    "python -m pipeline.tools.analysis filters": "tests/integration/test_analysis.py::test_figures_of_a_trained_run",
    "python -m pipeline.tools.analysis neighbours": "tests/integration/test_analysis.py::test_figures_of_a_trained_run",
    "python -m pipeline.tools.report": "tests/integration/test_ablate_report.py::test_run_report",
    "python -m pipeline.tools.goodput": (
        "tests/integration/test_goodput.py::test_a_clean_run_keeps_close_to_all_its_steps"
    ),
    "python -m pipeline.tools.ablate": (
        "tests/integration/test_ablate_report.py::test_runner_trains_one_switch_per_run_and_tabulates"
    ),
    "bash slurm/train.sh": "tests/integration/test_slurm_train.py::test_one_node_job_completes",
    "bash slurm/preprocess.sh": "tests/integration/test_slurm.py::test_preprocess_array_job",
    "make test": "tests/unit/test_documented_commands.py::test_every_documented_make_target_exists",  # the suite itself
    "make demo": "tests/unit/test_documented_commands.py::test_every_documented_make_target_exists",  # its steps: above
    # preprocess bench
    "make bench": "tests/integration/test_documented_commands.py::test_cheap_documented_commands_run",
    "make test-fast": "tests/unit/test_tiers.py::test_make_test_fast_selects_the_fast_tier",
    "make gpu-check": "tests/unit/test_gpu_path.py::test_gpu_check_refuses_in_one_line_without_cuda",  # its CPU answer
    "python -m pipeline.bench.gpu_check": (
        "tests/unit/test_gpu_path.py::test_gpu_check_refuses_in_one_line_without_cuda"
    ),
    "python -m launch.profile": "tests/integration/test_profile.py::test_profile_requested_while_training",
    "python -m pipeline.tools.profile": "tests/integration/test_profile.py::test_profile_requested_while_training",
    "python -m tests.support.chaos": "tests/integration/test_chaos.py::test_a_seeded_campaign_loses_nothing",
    "make chaos": "tests/integration/test_chaos.py::test_a_seeded_campaign_loses_nothing",  # its one command: above
}


HERE = ("python -m pipeline.bench.model", "python -m preprocess bench", "python -m preprocess finalize",
        "python -m tests.support.datasets",
        "python -m pipeline.bench.data", "python -m pipeline.bench.divergence", "python -m pipeline.bench.profiling",
        "python -m pipeline.bench.scale")  # fmt: skip


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
