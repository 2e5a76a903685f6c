"""Per-sample result rows of ``certify area``, their CSV / JSON files, a run folder's file names.

The format shared by the run layer (:mod:`certify.run`, which writes run folders) and
:mod:`certify.report` (which only reads them): a neutral module that imports neither.

One row per sample per bound method. Files are written atomically (temporary file, then rename),
so an interrupted run never leaves a half-written file. Floats are written with Python's shortest
round-trip representation, so reading a file back gives exactly the values that were written.

CSV columns (``per_sample.csv``)::

    index          position of the sample in the dataset split
    label          true class
    prediction     the model's class on the clean input
    method         bound method, e.g. crown
    certified_eps  largest eps at which the method proved robustness (0 if misclassified)
    attack_eps     smallest eps at which an attack found a re-checked adversarial example;
                   inf where none was found (or no attack was run)
    evaluations    bound evaluations the search spent on this sample
    seconds        search time attributed to this sample
    search_upper   upper end of the final search bracket: an eps where the proof failed,
                   or eps_max, or the attack eps

With ``certify area --exact`` two more columns (:data:`EXACT_COLUMNS`; absent otherwise, and
read as "not computed" when absent)::

    exact_eps      the exact minimal adversarial eps from the MILP (certify.exact); empty
                   where unknown, inf where above eps_max, 0 if misclassified
    exact_status   optimal, above_max, or "unknown: <reason>" (e.g. a time limit)

In JSON, a non-finite ``attack_eps`` is written as ``null``; ``exact_eps`` is ``null`` where
unknown and where above eps_max (``exact_status`` tells which).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from certify._io import atomic_write_json, atomic_write_text
from certify.errors import ReportError

# The files of a run folder (see certify.run.folder.RunFolder, which writes them).
CONFIG_FILE = "config.json"
SAMPLES_FILE = "per_sample.csv"
RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"
SORTED_FIGURE = "sorted_eps.png"
ACCURACY_FIGURE = "certified_accuracy.png"
SHARDS_DIR = "shards"


@dataclass(frozen=True)
class SampleRow:
    """One sample's result for one method (a line of ``per_sample.csv``)."""

    index: int
    label: int
    prediction: int
    method: str
    certified_eps: float
    attack_eps: float
    evaluations: int
    seconds: float
    search_upper: float
    exact_eps: float | None = None
    exact_status: str = ""

    @property
    def correct(self) -> bool:
        """Whether the clean input is classified correctly."""
        return self.prediction == self.label

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Optional columns, written only when some row has an exact eps (``certify area --exact``).
EXACT_COLUMNS: tuple[str, ...] = ("exact_eps", "exact_status")
SAMPLE_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(SampleRow)
                                        if f.name not in EXACT_COLUMNS)
_TYPES = {f.name: f.type for f in fields(SampleRow)}


def _parse(name: str, text: Any) -> Any:
    kind = _TYPES[name]
    if kind == "int":
        return int(text)
    if kind == "float":
        return math.inf if text is None else float(text)
    if kind == "float | None":
        return None if text is None or text == "" else float(text)
    return str(text)


def _parse_exact(d: dict[str, Any]) -> dict[str, Any]:
    """The exact columns of a CSV/JSON mapping (defaults where absent)."""
    status = d.get("exact_status")
    status = "" if status is None else str(status)
    value = _parse("exact_eps", d.get("exact_eps"))
    if value is None and status == "above_max":  # JSON writes inf as null
        value = math.inf
    return {"exact_eps": value, "exact_status": status}


def row_from_dict(d: dict[str, Any], *, source: str = "row") -> SampleRow:
    """A :class:`SampleRow` from a CSV/JSON mapping; extra keys are ignored.

    Raises:
        ReportError: a missing column or a value of the wrong type.
    """
    missing = [c for c in SAMPLE_COLUMNS if c not in d]
    if missing:
        raise ReportError(f"{source}: missing column(s) {', '.join(missing)}; expected "
                          f"{', '.join(SAMPLE_COLUMNS)}. Was it written by `certify area`?")
    try:
        return SampleRow(**{c: _parse(c, d[c]) for c in SAMPLE_COLUMNS}, **_parse_exact(d))
    except (TypeError, ValueError) as e:
        raise ReportError(f"{source}: malformed value ({e}); re-create the file with "
                          "`certify area`.") from None


def csv_columns(*, exact: bool) -> tuple[str, ...]:
    """The columns of ``per_sample.csv``: with the exact columns or without."""
    return SAMPLE_COLUMNS + (EXACT_COLUMNS if exact else ())


def rows_to_csv_text(rows: Iterable[SampleRow]) -> str:
    """The CSV text of `rows` with a header line (and the exact columns when any row has one)."""
    rows = list(rows)
    columns = csv_columns(exact=any(r.exact_status for r in rows))
    return csv_lines(rows, columns, header=True)


def csv_lines(rows: Iterable[SampleRow], columns: Sequence[str], *, header: bool) -> str:
    """`rows` as CSV lines of `columns` (each ending in a newline), after a header if asked."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([_format(getattr(row, c)) for c in columns])
    return buf.getvalue()


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest round-trip form; 'inf' and 'nan' read back with float()
    return str(value)


def write_sample_csv(path: str | os.PathLike[str], rows: Iterable[SampleRow]) -> None:
    """Write `rows` to `path` atomically (``per_sample.csv``)."""
    atomic_write_text(path, rows_to_csv_text(rows))


def read_sample_csv(path: str | os.PathLike[str]) -> list[SampleRow]:
    """Read rows written by :func:`write_sample_csv`.

    Raises:
        ReportError: missing file, missing columns or malformed values.
    """
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"result file not found: {path}. Point at a run directory written by "
                          "`certify area`.")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return [row_from_dict(d, source=f"{path}:{i + 2}") for i, d in enumerate(reader)]


def json_safe(value: Any) -> Any:
    """Recursively replace non-finite floats by ``None`` (strict JSON has no inf/nan)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def rows_to_json(rows: Iterable[SampleRow]) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts (non-finite floats become ``null``)."""
    return [json_safe(r.as_dict()) for r in rows]


def rows_from_json(items: Sequence[dict[str, Any]], *, source: str = "JSON") -> list[SampleRow]:
    """Inverse of :func:`rows_to_json` (``null`` floats read back as ``inf``)."""
    if not isinstance(items, (list, tuple)):
        raise ReportError(f"{source}: expected a list of sample rows, got {type(items).__name__}")
    return [row_from_dict(d, source=f"{source}[{i}]") for i, d in enumerate(items)]


def write_sample_json(path: str | os.PathLike[str], rows: Iterable[SampleRow]) -> None:
    """Write `rows` as a JSON list to `path` atomically."""
    atomic_write_json(path, rows_to_json(rows))


def read_sample_json(path: str | os.PathLike[str]) -> list[SampleRow]:
    """Read rows written by :func:`write_sample_json`."""
    return rows_from_json(read_json(path), source=str(path))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Load a JSON file; a missing or corrupt file is a one-line :class:`ReportError`."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"file not found: {path}. Point at a run directory written by "
                          "`certify area`.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); "
                          "re-create it by running the command again.") from None
