"""The layout keeps its promises: no import circles, layers imported downwards (at most 2 exceptions),
a thin CLI, and no task-name comparisons outside the task modules (toolkit/tasks/)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "toolkit"
# lowest first: a module may import its own layer and the layers below it
LAYERS = [("toolkit.core",), ("toolkit.data", "toolkit.learn", "toolkit.predict", "toolkit.callbacks"),
          ("toolkit.tasks",), ("toolkit.settings", "toolkit.stages"), ("toolkit.ui",),
          ("toolkit.cli", "toolkit.__main__")]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the toolkit modules it imports anywhere (module level or inside functions)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def layer(name: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    return -1  # the package itself (toolkit/__init__.py: its version only)


def test_no_import_circles():
    graph = imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # a package's __init__ importing its own modules, which import a sibling, is no circle through the package
    cycles = [c for c in cycles if not any(b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert cycles == []


def test_layers_are_imported_downwards():
    upward = sorted((a, b) for a, targets in imports().items() for b in targets
                    if layer(a) >= 0 and layer(b) > layer(a))
    assert len(upward) <= 2, upward


def test_the_cli_is_thin():
    """Each module of toolkit/cli/ (the framework, one module per group of commands) stays short."""
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in (PACKAGE / "cli").glob("*.py")}
    assert sizes and max(sizes.values()) <= 300, sizes


def test_no_task_name_comparisons_outside_the_task_modules():
    pattern = re.compile(r"""(task\s*[!=]=|[!=]=\s*["'](single|pairs|hierarchical)["']|get\(["']task["']\)\s*[!=]=|"""
                         r"""hasattr\([^)]*path_of)""")
    hits = [f"{p.relative_to(REPO)}:{i}" for p in PACKAGE.rglob("*.py") if "tasks" not in p.relative_to(PACKAGE).parts
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert hits == []
