"""The package's shape: no import cycle, ``report/`` only reads rows, methods by capability.

The import graph is read from the source (every ``import``/``from`` statement, at any depth),
so a function-local import counts for the layering rule of ``report/``; cycles are checked on
the imports that run when a module is imported (module level, outside ``TYPE_CHECKING``).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import certify

ROOT = Path(certify.__file__).parent
MODULES = sorted(m.name for m in pkgutil.walk_packages([str(ROOT)], prefix="certify."))


def _module_path(name: str) -> Path:
    rel = Path(*name.split(".")[1:])
    package = ROOT / rel / "__init__.py"
    return package if package.exists() else ROOT / rel.with_suffix(".py")


def _resolve(name: str, module: str, node: ast.ImportFrom) -> list[str]:
    """The certify modules an import statement of `module` names."""
    if node.level:
        base = module.split(".")
        is_package = _module_path(module).name == "__init__.py"
        base = base[:len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES else target)
    return out


def _imports(module: str, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(_module_path(module).read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt], depth: int) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue  # never runs
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                found.update(_resolve(node.module or "", module, node))
            if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                    ast.Lambda)):
                continue
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child], depth + 1)
                elif isinstance(getattr(child, "body", None), list):
                    visit(child.body, depth + 1)

    visit(tree.body, 0)
    return {m for m in found if m == "certify" or m.startswith("certify.")}


def _graph(*, top_level_only: bool) -> dict[str, set[str]]:
    return {m: {t for t in _imports(m, top_level_only=top_level_only) if t != m}
            for m in MODULES}


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_module_level_imports_have_no_cycle() -> None:
    graph = _graph(top_level_only=True)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t.startswith(m + "."):  # a package importing its own submodules
                continue
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                if not all(a.startswith(b + ".") or b.startswith(a + ".")
                           for a, b in zip(cycle, cycle[1:], strict=False)):
                    pytest.fail("import cycle: " + " -> ".join(cycle))
            elif t in graph and state.get(t) is None:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if state.get(m) is None:
            visit(m)


def test_report_only_reads_rows() -> None:
    forbidden = ("certify.radius", "certify.attacks", "certify.exact", "certify.bounds",
                 "certify.engines")
    graph = _graph(top_level_only=False)
    bad = {m: sorted(t for t in targets if t.startswith(forbidden))
           for m, targets in graph.items() if m.startswith("certify.report")}
    assert not {m: t for m, t in bad.items() if t}, bad


def test_the_checker_sees_local_imports() -> None:
    """The layering test would catch a function-local import (it is not vacuous)."""
    found = _imports("certify.bounds.api", top_level_only=False)
    assert "certify.attacks" in found and "certify.bounds.rounding" in found
    assert "certify.attacks" not in _imports("certify.bounds.api", top_level_only=True)


# a comparison of a method name to a string literal: == / != / in (...) / match-case
_NAMES = r"(ibp|crown|crown-ibp|wong-kolter|alpha-crown|lp|milp|lirpa-[a-z-]+)"
_COMPARE = re.compile(
    rf"""(==|!=)\s*["']{_NAMES}["']|["']{_NAMES}["']\s*(==|!=)"""
    rf"""|\bin\s*[(\[{{]\s*["']{_NAMES}["']|case\s+["']{_NAMES}["']""")


def _registry_files() -> set[Path]:
    """The registry: base.py, the package that loads it, the modules that register methods."""
    return {p for p in (ROOT / "bounds").glob("*.py")
            if p.name in ("base.py", "__init__.py") or "register_method(" in p.read_text()}


def test_no_method_name_is_compared_to_a_literal_outside_the_registry() -> None:
    registry = _registry_files()
    hits = []
    for path in sorted(ROOT.rglob("*.py")):
        if path in registry:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _COMPARE.search(line):
                hits.append(f"{path.relative_to(ROOT.parent)}:{number}: {line.strip()}")
    assert not hits, "compare capabilities, not names:\n" + "\n".join(hits)


def test_the_name_pattern_catches_comparisons() -> None:
    for line in ('if method == "milp":', 'x = m in ("lp", "alpha-crown")',
                 "if 'crown' != name:", 'case "lirpa-crown":'):
        assert _COMPARE.search(line), line
    for line in ('get_method("crown")', 'methods=("ibp", "crown")', '"crown-ibp": 1'):
        assert not _COMPARE.search(line), line
