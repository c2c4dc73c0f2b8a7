"""The package's layers (docs/architecture.md), read from the code's own imports.

Every import of a moekit module, at the top of a file or inside a function, counts. A module may
import its own layer or one below it, never one above; no two modules import each other, however
far round. A module missing from LAYERS fails too, so a new file is placed on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moekit"

# From the top down: a module may import only modules of its own row or of rows below it.
LAYERS = [
    ("entry", ["moekit.__main__", "moekit.cli"]),
    ("commands", ["moekit.commands"]),
    ("jobs", ["moekit.jobs"]),
    ("training", ["moekit.training"]),
    ("options", ["moekit.options"]),
    ("report", ["moekit.report"]),
    ("runtime", ["moekit.runtime"]),
    ("surgery", ["moekit.surgery"]),
    ("data and metrics", ["moekit.data", "moekit.metrics"]),
    ("arch", ["moekit.arch"]),
    ("checkpoint", ["moekit.checkpoint"]),
    ("base", ["moekit.errors", "moekit"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer of tests/test_layers.py (and docs/architecture.md)"
    return best[0]


def imports_of(path: Path) -> set[str]:
    """The moekit modules `path` imports (a `from moekit.x import y` names moekit.x.y if that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "moekit"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moekit":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_its_own_layer_or_below(module):
    upward = sorted(m for m in GRAPH[module] if m in MODULES and layer_of(m) < layer_of(module))
    assert not upward, f"{module} ({LAYERS[layer_of(module)][0]}) imports a layer above it: {upward}"


def test_no_import_cycles():
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for dep in sorted(GRAPH.get(module, ())):
            if dep in MODULES and dep != "moekit":
                visit(dep, path + [module])
        done.add(module)

    for module in sorted(MODULES):
        visit(module, [])
