"""Aggregates: area, certified accuracy, ratios, and the markdown/text summaries."""

from __future__ import annotations

import math
import statistics

import pytest

from certify.report.results import SampleRow
from certify.report.summary import (
    default_eps_grid,
    summarize,
    summarize_method,
    summary_markdown,
    summary_table,
    write_summary_md,
)


def row(i, label, pred, cert, attack, method="crown", evals=4, seconds=0.5):
    return SampleRow(i, label, pred, method, cert, attack, evals, seconds, cert + 1e-4)


ROWS = [
    row(0, 1, 1, 0.010, 0.020),
    row(1, 2, 2, 0.030, 0.040),
    row(2, 3, 5, 0.0, 0.0, evals=0),          # misclassified
    row(3, 4, 4, 0.002, math.inf),            # no adversarial example found
    row(4, 0, 0, 0.000, 0.008),               # correct but nothing certified
]


def test_definitions_on_a_hand_sized_run():
    s = summarize_method(ROWS, [0.0, 0.005, 0.02, 0.05])
    assert s.n == 5
    assert s.clean_accuracy == pytest.approx(4 / 5)
    assert s.certification_area == pytest.approx((0.010 + 0.030 + 0 + 0.002 + 0) / 5)
    assert s.median_certified_eps == pytest.approx(0.002)
    # certified: correct and certified >= eps
    assert s.certified_accuracy == ((0.0, 4 / 5), (0.005, 2 / 5), (0.02, 1 / 5), (0.05, 0.0))
    # attack: correct and attack > eps (inf counts as never broken)
    assert s.attack_accuracy == ((0.0, 4 / 5), (0.005, 4 / 5), (0.02, 2 / 5), (0.05, 1 / 5))
    ratios = [0.010 / 0.020, 0.030 / 0.040, 0.0 / 0.008]
    assert s.mean_ratio == pytest.approx(statistics.fmean(ratios))
    assert s.median_ratio == pytest.approx(statistics.median(ratios))
    assert s.n_ratio == 3
    assert s.mean_attack_eps == pytest.approx((0.020 + 0.040 + 0.008) / 3)
    assert s.evaluations_per_sample == pytest.approx(4.0)  # over the correct samples
    assert s.seconds == pytest.approx(2.5) and s.samples_per_second == pytest.approx(2.0)


def test_misclassified_count_zero_even_if_a_row_says_otherwise():
    rows = [row(0, 1, 2, 0.5, 0.6), row(1, 1, 1, 0.1, 0.2)]
    s = summarize_method(rows, [0.0])
    assert s.certification_area == pytest.approx(0.05)


def test_without_attack_no_attack_accuracy_and_nan_ratios():
    rows = [row(0, 1, 1, 0.01, math.inf), row(1, 1, 1, 0.02, math.inf)]
    s = summarize_method(rows, [0.0, 0.01])
    assert s.attack_accuracy is None
    assert math.isnan(s.mean_ratio) and s.n_ratio == 0
    d = s.as_dict()
    assert d["mean_ratio"] is None and d["attack_accuracy"] is None


def test_summarize_groups_by_method_with_one_shared_grid():
    rows = ROWS + [row(r.index, r.label, r.prediction, r.certified_eps / 2, r.attack_eps,
                       method="ibp") for r in ROWS]
    out = summarize(rows)
    assert list(out) == ["crown", "ibp"]
    assert [e for e, _ in out["crown"].certified_accuracy] == \
        [e for e, _ in out["ibp"].certified_accuracy]
    assert out["ibp"].certification_area == pytest.approx(out["crown"].certification_area / 2)
    with pytest.raises(ValueError, match="several methods"):
        summarize_method(rows, [0.0])


def test_default_grid_is_round_and_covers_the_attack_eps():
    grid = default_eps_grid(ROWS)
    assert grid[0] == 0.0 and len(grid) == 6
    assert grid[-1] == pytest.approx(0.05)  # the largest attack eps 0.04, rounded up
    assert default_eps_grid([row(0, 1, 1, 0.0, math.inf)]) == (0.0,)


def test_table_and_markdown(tmp_path):
    out = summarize(ROWS)
    table = summary_table(out)
    assert table.splitlines()[0].split()[:3] == ["method", "n", "clean"]
    assert "crown" in table.splitlines()[1]
    md = summary_markdown(title="certify area: m.pt on digits/test", summaries=out,
                          settings={"model": "m.pt", "tol": 1e-4},
                          figures={"Sorted ε": "sorted_eps.png"})
    assert md.startswith("# certify area: m.pt on digits/test\n")
    assert "![Sorted ε](sorted_eps.png)" in md
    assert "| crown | 5 | 0.8000 |" in md
    write_summary_md(tmp_path / "summary.md", title="t", summaries=out, settings={}, figures={})
    assert (tmp_path / "summary.md").read_text().startswith("# t\n")
