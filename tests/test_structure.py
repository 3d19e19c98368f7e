"""The codebase's shape, checked: no import cycles, short functions, a torch-free client.

These are the properties that keep the next change cheap (issue: "a codebase the next engineer
can carry on"); they are checked from the source with ``ast``, so they hold on every machine.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("train", "client")
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """First-party modules ``name`` imports at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    modules = _modules()
    # a package's __init__ importing its own submodules is how packages expose names, not a cycle
    graph = {
        name: {m for m in _imports(name, path, modules) if not name.startswith(m + ".")}
        for name, path in modules.items()
    }
    assert _cycles(graph) == []


def test_no_long_functions():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: split them into named steps"


@pytest.mark.parametrize(
    "module",
    [
        "client.cli",
        "client.server",
        "client.pack",
        "client.jobs",
        "train.spec",
        "train.dataset_rules",
        "train.http",
    ],
)
def test_client_side_modules_never_import_torch(module):
    """The submit client runs on laptops without torch (DESIGN.md): importing it must not load it."""
    # (numpy is not checked: the replicate client imports it when it happens to be installed)
    code = (
        f"import sys, {module}; heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "print(','.join(heavy)); raise SystemExit(1 if heavy else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"importing {module} loaded {run.stdout.strip() or run.stderr[-400:]}"
