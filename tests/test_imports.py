"""The package's import graph: no cycles, and the model layer depends on nothing above it.

Every `import` and `from ... import` counts, at module level or inside a function: a lazy
import hides a cycle from Python, not from the design. A package's `__init__` importing its
own submodules counts too, so a submodule must not import names back from its package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "rlhf"

# what rlhf.models (the model layer) must never import: everything built on it
ABOVE_MODELS = (
    "rlhf.tasks", "rlhf.data", "rlhf.stages", "rlhf.training", "rlhf.orchestrator",
    "rlhf.evaluation", "rlhf.feedback", "rlhf.cli",
)


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _known(name: str, modules) -> str | None:
    """The longest prefix of `name` that is one of `modules` (None: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None


def imports_of(name: str, path: Path, modules) -> set[str]:
    """The package's modules that module `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub; `from pkg import name`, pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in (_known(t, modules) for t in targets) if t is not None and t != name)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _under(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_graph_sees_lazy_relative_and_submodule_imports(tmp_path):
    pkg = tmp_path / "rlhf"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from rlhf.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from .b import X\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\nfrom . import X\n")
    graph = import_graph(pkg)
    assert graph["rlhf.a"] == {"rlhf.sub.b"}
    assert graph["rlhf.sub"] == {"rlhf.sub.b"}
    assert graph["rlhf.sub.b"] == {"rlhf.a", "rlhf.sub"}
    assert find_cycle(graph) in (["rlhf.a", "rlhf.sub.b", "rlhf.a"], ["rlhf.sub", "rlhf.sub.b", "rlhf.sub"])


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_model_layer_imports_nothing_above_it():
    graph = import_graph()
    assert "rlhf.models" in graph
    wrong = sorted(f"{m} imports {t}" for m, ts in graph.items() if _under(m, ["rlhf.models"]) for t in ts if _under(t, ABOVE_MODELS))
    assert not wrong, "\n".join(wrong)
