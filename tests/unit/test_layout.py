"""The layout shows the architecture: imports run one way (launch -> pipeline -> preprocess -> basics), the training
core imports no tool and no benchmark, no module imports itself back through others, and the README's
layout table names every package that exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.support import REPO

PACKAGES = ("basics", "preprocess", "pipeline", "launch")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, at the top or inside functions."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycle() -> None:
    graph = _imports(_modules())
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", " -> ".join([*path[path.index(target) :], target])
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_imports_run_one_way_and_the_core_needs_no_tool() -> None:
    graph = _imports(_modules())
    for module, targets in graph.items():
        if module.startswith("basics"):
            assert not {t for t in targets if not t.startswith("basics")}, (module, targets)
        if module.startswith("preprocess"):
            assert not {t for t in targets if not t.startswith(("preprocess", "basics"))}, (module, targets)
        if module.startswith("pipeline"):
            assert not {t for t in targets if t.startswith("launch")}, (module, targets)
        core = module.startswith("pipeline") and not module.startswith(("pipeline.tools", "pipeline.bench"))
        if core:
            assert not {t for t in targets if t.startswith(("pipeline.tools", "pipeline.bench"))}, (module, targets)


def test_readme_layout_table_matches_the_tree() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    cited = set(re.findall(r"^\| `([\w/.]+)`", table, re.M))
    for path in cited:
        assert (REPO / path).exists(), f"README's layout table names {path}, which does not exist"
    packages = {f"{p.parent.relative_to(REPO)}/" for package in PACKAGES for p in (REPO / package).rglob("__init__.py")}
    assert packages <= cited, f"packages missing from README's layout table: {sorted(packages - cited)}"


def test_preprocess_imports_no_torch() -> None:
    """README: preprocessing never imports torch (a CPU-only preprocessing host needs none). The one exception
    is the benchmark's optional variant that times torch's resize kernel, imported inside it when run."""
    for name, path in _modules().items():
        if not name.startswith("preprocess"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for imported in names:
                if imported.split(".")[0] == "torch":
                    assert (name, node.lineno) in _TORCH_ALLOWED, (
                        f"{path.relative_to(REPO)}:{node.lineno} imports torch"
                    )


def _torch_resize_variant_lines() -> set[tuple[str, int]]:
    tree = ast.parse((REPO / "preprocess" / "bench.py").read_text())
    (variant,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_variant_torch_resize"]
    return {("preprocess.bench", n.lineno) for n in ast.walk(variant) if isinstance(n, (ast.Import, ast.ImportFrom))}


_TORCH_ALLOWED = _torch_resize_variant_lines()
