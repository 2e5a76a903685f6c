"""Result rows: exact CSV and JSON round trips, clear errors for bad files."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certify.errors import ReportError
from certify.report.results import (
    SAMPLE_COLUMNS,
    SampleRow,
    read_json,
    read_sample_csv,
    read_sample_json,
    rows_to_csv_text,
    write_sample_csv,
    write_sample_json,
)

eps = st.floats(min_value=0.0, max_value=10.0, allow_nan=False, allow_infinity=False)
rows_strategy = st.lists(st.builds(
    SampleRow,
    index=st.integers(0, 10**6),
    label=st.integers(0, 9),
    prediction=st.integers(0, 9),
    method=st.sampled_from(["crown", "ibp", "alpha-crown", "lp"]),
    certified_eps=eps,
    attack_eps=st.one_of(eps, st.just(math.inf)),
    evaluations=st.integers(0, 100),
    seconds=st.floats(0, 1e4, allow_nan=False),
    search_upper=eps,
), max_size=30)


@settings(max_examples=40, deadline=None)
@given(rows=rows_strategy)
def test_csv_round_trip_is_exact(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("csv") / "per_sample.csv"
    write_sample_csv(path, rows)
    assert read_sample_csv(path) == rows


@settings(max_examples=40, deadline=None)
@given(rows=rows_strategy)
def test_json_round_trip_is_exact_and_strict_json(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("json") / "rows.json"
    write_sample_json(path, rows)
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    assert read_sample_json(path) == rows


def test_csv_header_and_inf():
    row = SampleRow(3, 1, 1, "crown", 0.0123, math.inf, 4, 0.01, 0.0124)
    text = rows_to_csv_text([row])
    assert text.splitlines()[0] == ",".join(SAMPLE_COLUMNS)
    assert text.splitlines()[1] == "3,1,1,crown,0.0123,inf,4,0.01,0.0124"
    assert row.correct and not SampleRow(0, 1, 2, "ibp", 0, 0, 0, 0, 0).correct


def test_missing_file_and_bad_columns(tmp_path):
    with pytest.raises(ReportError, match="not found"):
        read_sample_csv(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("index,label\n1,2\n")
    with pytest.raises(ReportError, match="missing column"):
        read_sample_csv(bad)
    bad.write_text(",".join(SAMPLE_COLUMNS) + "\n1,2,2,crown,zero,inf,1,0.1,0.2\n")
    with pytest.raises(ReportError, match="malformed value"):
        read_sample_csv(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        read_json(broken)


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "per_sample.csv"
    good = [SampleRow(0, 1, 1, "crown", 0.1, 0.2, 3, 0.1, 0.11)]
    write_sample_csv(path, good)

    class Boom(Exception):
        pass

    def exploding_rows():
        yield good[0]
        raise Boom

    with pytest.raises(Boom):
        write_sample_csv(path, exploding_rows())
    assert read_sample_csv(path) == good
    assert [p.name for p in tmp_path.iterdir()] == ["per_sample.csv"]
