"""Result records, CSV/JSON files, aggregates, figures and markdown summaries of runs.

``certify.report.plots`` is the only module importing matplotlib; import it explicitly.
"""

from certify.records import (
    EXACT_COLUMNS,
    SAMPLE_COLUMNS,
    SampleRow,
    read_sample_csv,
    read_sample_json,
    rows_from_json,
    rows_to_json,
    write_sample_csv,
    write_sample_json,
)
from certify.report.summary import (
    MethodSummary,
    default_eps_grid,
    summarize,
    summary_markdown,
    summary_table,
    write_summary_md,
)

__all__ = [
    "EXACT_COLUMNS",
    "SAMPLE_COLUMNS",
    "MethodSummary",
    "SampleRow",
    "default_eps_grid",
    "read_sample_csv",
    "read_sample_json",
    "rows_from_json",
    "rows_to_json",
    "summarize",
    "summary_markdown",
    "summary_table",
    "write_sample_csv",
    "write_sample_json",
    "write_summary_md",
]
