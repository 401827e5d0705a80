"""The code's shape: the public package stands alone, and nothing imports in a circle.

Imports inside functions count as much as those at the top: hiding a cycle in a
function does not remove it.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("outlast", "app", "workers", "tasks")
# Who may import whom, between the top-level packages (the rest is forbidden).
ALLOWED = {
    "outlast": set(),
    "app": {"outlast"},
    "tasks": {"app", "outlast"},
    "workers": {"app", "outlast"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imported(node: ast.AST, module: str) -> Iterator[str]:
    """The project modules an import statement reaches."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            package = module.split(".")
            if not MODULES[module].name == "__init__.py":
                package = package[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            yield candidate if candidate in MODULES else base


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        edges = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(node, module):
                if target in MODULES and target != module:
                    edges.add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _collapse(graph: dict[str, set[str]], depth: int) -> dict[str, set[str]]:
    """The graph between packages ``depth`` levels deep (``app.store``, ``app.engine``…)."""
    collapsed: dict[str, set[str]] = {}
    for source, targets in graph.items():
        a = ".".join(source.split(".")[:depth])
        for target in targets:
            b = ".".join(target.split(".")[:depth])
            collapsed.setdefault(a, set())
            if a != b:
                collapsed[a].add(b)
    return collapsed


def test_no_module_imports_itself_in_a_circle():
    assert cycles(import_graph()) == []


def test_no_layer_of_app_imports_another_in_a_circle():
    assert cycles(_collapse(import_graph(), 2)) == []


def test_top_level_packages_import_only_downwards():
    graph = _collapse(import_graph(), 1)
    wrong = {(a, b) for a, targets in graph.items() for b in targets if b not in ALLOWED[a]}
    assert wrong == set()


def test_the_cycle_check_finds_a_cycle():
    # A check that cannot fail proves nothing: a two-module circle and a longer one.
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_each_layer_says_what_it_is_for():
    for package in sorted(m for m, p in MODULES.items() if p.name == "__init__.py"):
        doc = ast.get_docstring(ast.parse(MODULES[package].read_text())) or ""
        assert doc.strip(), f"{package}/__init__.py needs a docstring saying what the layer is for"


def test_the_public_package_lists_its_api():
    outlast = importlib.import_module("outlast")
    for name in ("Client", "verify_webhook", "agent", "tool", "RetryableError", "AgentError"):
        assert name in outlast.__all__
    for name in outlast.__all__:
        assert getattr(outlast, name) is not None


def test_nothing_a_user_reads_imports_the_server_package():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = path.read_text()
        assert "from app" not in text and "import app" not in text, path
