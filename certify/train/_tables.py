"""Small result tables (the thesis's Tables 8.7 and 8.10): markdown for people, CSV for tools."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Column:
    """A table column: the row key, its header, and how to show a value in markdown."""

    key: str
    header: str
    fmt: Callable[[Any], str] = str


def percent(v: Any) -> str:
    return "" if v is None else f"{100 * float(v):.2f}%"


def count(v: Any) -> str:
    return "" if v is None else f"{int(v):,}"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """Rows as a markdown table with aligned columns."""
    cells = [[c.header for c in columns]]
    cells += [[c.fmt(r.get(c.key)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) + " |"
             for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """Rows as CSV with raw values (numbers stay numbers; ``None`` is empty)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([c.key for c in columns])
    for r in rows:
        writer.writerow(["" if r.get(c.key) is None else r.get(c.key) for c in columns])
    return buf.getvalue()


def write_table(csv_path: str | os.PathLike[str], md_path: str | os.PathLike[str],
                rows: Sequence[Mapping[str, Any]], columns: Sequence[Column],
                note: str = "") -> None:
    """Write the CSV and the markdown table atomically."""
    from certify._io import atomic_write_text

    atomic_write_text(csv_path, csv_text(rows, columns))
    md = markdown_table(rows, columns) + "\n"
    atomic_write_text(md_path, md + (f"\n{note}\n" if note else ""))
