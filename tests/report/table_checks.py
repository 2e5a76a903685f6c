"""Reading generated markdown tables back, to hold every one to certified <= PGD accuracy."""

from __future__ import annotations

import re


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every pipe table in `text`, as rows of ``{header: cell}``."""
    tables: list[list[dict[str, str]]] = []
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if len(block) >= 2:
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in block]
            header = cells[0]
            tables.append([dict(zip(header, row, strict=True)) for row in cells[2:]])
        block = []
    return tables


def _percent(cell: str) -> float:
    match = re.fullmatch(r"(-?[0-9.]+)%", cell)
    assert match, f"not a percentage: {cell!r}"
    return float(match.group(1))


def assert_certified_at_most_pgd(text: str) -> int:
    """In every table with both columns, certified accuracy <= PGD accuracy, row by row.

    Returns:
        The number of rows checked (so a caller can insist that some were).
    """
    checked = 0
    for table in markdown_tables(text):
        for row in table:
            pgd = [k for k in row if k.startswith("PGD accuracy")]
            cert = [k for k in row if k.startswith("certified accuracy")]
            if not (pgd and cert):
                continue
            assert _percent(row[cert[0]]) <= _percent(row[pgd[0]]), row
            checked += 1
    return checked
