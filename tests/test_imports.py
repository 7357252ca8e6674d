"""The core's import graph has no cycle (function-level and type-checking imports included).

Each layer imports only layers below it: a cycle is a design error (an adapt component that
looks up the plugin registry, a hookspec that names the pipeline), even when Python happens
to tolerate it through a function-level import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ev3core

ROOT = Path(ev3core.__file__).parent
PACKAGE = "ev3core"


def _module_name(path: Path) -> str:
    parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The ev3core module `name` refers to (a submodule, or the package that holds it)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from . import x` imports the submodule x when there is one
            targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
        for t in targets:
            if t == PACKAGE or not t.startswith(PACKAGE + "."):
                continue  # the root package only re-exports
            hit = _resolve(t, modules)
            if hit is not None and hit != module and hit != PACKAGE:
                out.add(hit)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == grey:
                return stack[stack.index(nxt) :] + [nxt]
            if colour[nxt] == white:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = black
        return None

    for node in sorted(graph):
        if colour[node] == white:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_every_kind_of_import():
    graph = _graph()
    # relative, nested-package and `from package import module` imports are all resolved
    assert "ev3core._engine.engine" in graph["ev3core._host.run"]
    assert "ev3core.hookspecs" in graph["ev3core._plugins.manager"]
    assert len(graph) >= 25


def test_a_cycle_is_found():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_ev3core():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
