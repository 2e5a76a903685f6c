"""Every CSV goes through the ``csv`` module: labels with commas, quotes and newlines survive."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from certify._io import atomic_write_csv, csv_text
from certify.report.area import AreaRun
from certify.report.results import SampleRow
from certify.study.attack_curves import CSV_COLUMNS, ModelCurve, write_attack_curves
from certify.study.compare import CompareRow, Comparison, write_comparison

pytestmark = pytest.mark.filterwarnings("ignore:Glyph .* missing from font")

HOSTILE = ["robust-distilled, re-trained", 'the "teacher"', "two\nlines", "tab\there",
           'all, of "it"\r\nat once', ",", '"', ""]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_text_round_trips_hostile_fields(tmp_path: Path) -> None:
    rows = [(label, 0.1 + k, None, k) for k, label in enumerate(HOSTILE)]
    atomic_write_csv(tmp_path / "t.csv", ("label", "x", "missing", "k"), rows)
    back = read_csv(tmp_path / "t.csv")
    assert [r["label"] for r in back] == HOSTILE
    assert [float(r["x"]) for r in back] == [r[1] for r in rows]
    assert {r["missing"] for r in back} == {""}
    assert csv_text(("a",), [(0.1,)]) == "a\n0.1\n"


def test_attack_curves_csv_keeps_every_label(tmp_path: Path) -> None:
    eps = (0.0, 0.005, 0.01)
    curves = [ModelCurve(label, f"m{k}.pt", eps, (1.0, 0.5 + k / 100, 1 / 3), 100 + k)
              for k, label in enumerate(HOSTILE)]
    write_attack_curves(tmp_path, curves, attack="pgd")
    rows = read_csv(tmp_path / "attack_curves.csv")
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == len(HOSTILE) * len(eps)
    for k, c in enumerate(curves):
        mine = rows[k * len(eps):(k + 1) * len(eps)]
        assert {r["model"] for r in mine} == {c.label}
        assert tuple(float(r["eps"]) for r in mine) == c.eps
        assert tuple(float(r["accuracy"]) for r in mine) == c.accuracy  # exact floats
        assert {(r["attack"], int(r["n"])) for r in mine} == {("pgd", c.n)}


def _run(tmp_path: Path, k: int) -> AreaRun:
    rows = tuple(SampleRow(i, i % 10, i % 10, "crown", 0.01 * (i + k), 0.02 * (i + 1), 3, 0.1,
                           0.03) for i in range(4))
    return AreaRun(tmp_path / f"run{k}", {"methods": ["crown"]}, rows, {}, True)


@pytest.mark.parametrize("labels", [HOSTILE[:4], HOSTILE[4:]])
def test_compare_csv_keeps_every_label(tmp_path: Path, labels: list[str]) -> None:
    rows = tuple(CompareRow(label, f'models/{k}, "x".pt', None if k == 0 else 1234, 0.9, 0.5,
                            0.0123, 0.25, math.nan, 0.01, f"runs/{k}")
                 for k, label in enumerate(labels))
    runs = tuple(_run(tmp_path, k) for k in range(len(labels)))
    write_comparison(tmp_path / "out", Comparison(rows, runs, tmp_path / "out"), method="crown")
    back = read_csv(tmp_path / "out" / "compare.csv")
    assert list(back[0]) == list(CompareRow.__dataclass_fields__)
    assert [r["label"] for r in back] == labels
    assert [r["path"] for r in back] == [r.path for r in rows]
    assert back[0]["parameters"] == "" and [int(r["parameters"]) for r in back[1:]] == \
        [1234] * (len(labels) - 1)
    assert all(math.isnan(float(r["mean_ratio"])) for r in back)
    assert [json.loads((tmp_path / "out" / "compare.json").read_text())["rows"][k]["label"]
            for k in range(len(labels))] == labels
