"""The package's modules import each other without cycles, counting imports inside functions too.

A function-local import that closes a cycle hides a dependency knot: if two modules need each other, the
shared piece belongs in a third. Imports inside functions stay fine for laziness (optional dependencies,
start-up time) as long as they do not close a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_ft"


def _module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (the packages whose ``__init__`` that
    runs included), leaving out a module's own enclosing packages (``a.b.c`` importing ``a.b`` is how
    packages are built)."""
    files = _module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lightning_ft"):
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name.startswith("lightning_ft"))
        reached = {t for target in targets for t in (target, *_ancestors(target))}
        own = set(_ancestors(name)) | {name}
        graph[name] = {t for t in reached if t in files and t not in own}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first repeated last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_find_cycle_sees_a_cycle_closed_inside_a_function():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "lightning_ft.module" in graph["lightning_ft.loading"]  # the graph sees real imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def reachable(graph: dict[str, set[str]], module: str) -> set[str]:
    """Every package module that importing ``module`` can import, directly or not."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.mark.parametrize("module, forbidden", [
    ("lightning_ft.generation", ("lightning_ft.module", "lightning_ft.callbacks", "lightning_ft.loading",
                                 "lightning_ft.export", "lightning_ft.losses", "lightning_ft.adapters")),
    ("lightning_ft.adapters", ("lightning_ft.module", "lightning_ft.callbacks", "lightning_ft.generation",
                               "lightning_ft.data")),
    ("lightning_ft.atomic", ("lightning_ft.",)),
])
def test_inference_and_shared_pieces_import_nothing_from_training(module, forbidden):
    imported = reachable(import_graph(), module)
    assert sorted(name for name in imported if name.startswith(forbidden)) == []
