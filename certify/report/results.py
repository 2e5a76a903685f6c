"""Per-sample result rows and their files: re-exported from :mod:`certify.records`.

The row format lives in the neutral module :mod:`certify.records`, shared by the run layer
(which writes rows) and ``report/`` (which reads them).
"""

from certify.records import (
    EXACT_COLUMNS,
    SAMPLE_COLUMNS,
    SampleRow,
    json_safe,
    read_json,
    read_sample_csv,
    read_sample_json,
    row_from_dict,
    rows_from_json,
    rows_to_csv_text,
    rows_to_json,
    write_sample_csv,
    write_sample_json,
)

__all__ = [
    "EXACT_COLUMNS",
    "SAMPLE_COLUMNS",
    "SampleRow",
    "json_safe",
    "read_json",
    "read_sample_csv",
    "read_sample_json",
    "row_from_dict",
    "rows_from_json",
    "rows_to_csv_text",
    "rows_to_json",
    "write_sample_csv",
    "write_sample_json",
]
