"""The run layer's place in the package: report/ only reads rows, and no import cycles.

Imports are read from the source (module level and inside functions alike), so an import hidden
in a function body counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "certify"
COMPUTING = ("certify.radius", "certify.attacks", "certify.exact", "certify.bounds",
             "certify.engines", "certify.run")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every certify module `path` imports, anywhere in the file."""
    out: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(
        ".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m == "certify" or m.startswith("certify.")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_report_imports_nothing_that_computes() -> None:
    for path in sorted((PACKAGE / "report").glob("*.py")):
        bad = sorted(m for m in imports(path) if m.startswith(COMPUTING))
        assert not bad, f"{path.name} imports {bad}; report/ only reads rows and draws"


def test_radius_does_not_import_report() -> None:
    assert not {m for m in imports(PACKAGE / "radius.py") if m.startswith("certify.report")}


def cycle_through(start: str, edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports through `start`, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in edges.get(node, ()):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_import_cycle_through_the_run_layer_or_report() -> None:
    edges = graph()
    mine = [m for m in edges if m.startswith(("certify.run", "certify.report"))
            or m in ("certify.records", "certify.distributed", "certify.radius")]
    for name in mine:
        cycle = cycle_through(name, edges)
        assert cycle is None, " -> ".join(cycle or [])
