"""The one-way house: every import statement (function-level ones included) read with ``ast``.

    mve_cli  ->  cluster, serve_app  ->  mve

``mve`` (pure PyTorch) imports none of the others and never Ray; ``cluster`` and
``serve_app`` import ``mve`` and never each other; nothing imports ``mve_cli``; and the module
graph has no cycles.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mve", "cluster", "serve_app", "mve_cli")
FORBIDDEN = {  # package -> top-level names it must never import
    "mve": {"cluster", "serve_app", "mve_cli", "ray"},
    "cluster": {"serve_app", "mve_cli"},
    "serve_app": {"cluster", "mve_cli"},
    "mve_cli": set(),
}


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in the file, wherever it is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from pkg import submodule` is an edge to the submodule
                sub = f"{base}.{alias.name}"
                yield (sub if sub in known else base), node.lineno


def layer_violations(root: Path) -> list[str]:
    known = _modules(root)
    found = []
    for module, path in known.items():
        pkg = module.split(".")[0]
        for target, line in _imports(module, path, known):
            if target.split(".")[0] in FORBIDDEN[pkg]:
                found.append(f"{path.relative_to(root)}:{line}: {pkg} imports {target}")
    return found


def import_cycles(root: Path) -> list[list[str]]:
    """Strongly connected components (Tarjan) of more than one module."""
    known = _modules(root)
    graph = {m: sorted({t for t, _ in _imports(m, p, known) if t in known and t != m})
             for m, p in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_every_import_points_down():
    assert len(_modules(ROOT)) > 50  # the walk really found the packages
    assert layer_violations(ROOT) == []


def test_no_import_cycles():
    assert import_cycles(ROOT) == []


@pytest.fixture
def tree_with_upward_import(tmp_path: Path) -> Path:
    """A copy of the packages where a function in mve/ imports cluster."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "mve" / "metrics.py"
    target.write_text(target.read_text() + "\n\ndef _sneaky():\n    import cluster.train\n"
                      "    return cluster.train\n")
    return tmp_path


def test_the_check_reports_an_upward_import_inside_a_function(tree_with_upward_import):
    found = layer_violations(tree_with_upward_import)
    assert len(found) == 1 and found[0].startswith("mve/metrics.py:")
    assert "mve imports cluster.train" in found[0]


def test_the_check_reports_a_cycle(tmp_path: Path):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "mve" / "atomic.py").write_text(
        (tmp_path / "mve" / "atomic.py").read_text() + "\n\ndef _loop():\n"
        "    from mve.report import run_info\n    return run_info\n")
    assert any({"mve.atomic", "mve.report"} <= set(c) for c in import_cycles(tmp_path))
