"""Figures: written as PNG, labelled, one colour per run, certified solid / attack dashed."""

from __future__ import annotations

import math

from certify.report.plots import (
    plot_certified_accuracy,
    plot_sorted_eps,
    runs_from_rows,
    save_figure,
)
from certify.report.results import SampleRow

PNG = b"\x89PNG\r\n\x1a\n"


def rows(scale: float, method: str = "crown") -> list[SampleRow]:
    out = []
    for i in range(20):
        cert = scale * (i % 7) / 100
        attack = math.inf if i == 3 else (i % 7) / 100 * 1.5 + 0.001  # the model's, not scaled
        pred = 9 if i == 5 else i % 10
        out.append(SampleRow(i, i % 10, pred, method, cert, attack, 4, 0.01, cert + 1e-4))
    return out


def test_sorted_eps_figure(tmp_path):
    student = [SampleRow(r.index, r.label, r.prediction, r.method, r.certified_eps,
                         r.attack_eps * 0.8, r.evaluations, r.seconds, r.search_upper)
               for r in rows(0.5)]
    runs = {"teacher (crown)": rows(1.0), "student (crown)": student}
    ax = plot_sorted_eps(runs)
    assert ax.get_xlabel() == "test points (sorted)"
    assert ax.get_ylabel() == "ε (L∞, pixel scale)"
    assert ax.get_title()
    lines = ax.get_lines()
    assert len(lines) == 4
    styles = {line.get_label(): (line.get_color(), line.get_linestyle()) for line in lines}
    assert styles["teacher (crown): certified"][1] == "-"
    assert styles["teacher (crown): attack"][1] == "--"
    assert styles["teacher (crown): certified"][0] == styles["teacher (crown): attack"][0]
    assert styles["teacher (crown): certified"][0] != styles["student (crown): certified"][0]
    by_label = {line.get_label(): line for line in lines}
    cert_y = by_label["teacher (crown): certified"].get_ydata()
    assert list(cert_y) == sorted(cert_y)  # increasing order
    assert cert_y[0] == 0.0  # the misclassified sample counts 0
    attack_y = by_label["teacher (crown): attack"].get_ydata()
    assert len(attack_y) == 19  # the inf attack eps is left off
    assert list(attack_y) == sorted(attack_y) and attack_y[0] == 0.0
    assert ax.get_legend() is not None
    save_figure(ax, tmp_path / "sorted_eps.png")
    data = (tmp_path / "sorted_eps.png").read_bytes()
    assert data.startswith(PNG) and len(data) > 5000


def test_certified_accuracy_figure(tmp_path):
    ax = plot_certified_accuracy({"m (crown)": rows(1.0)})
    assert ax.get_ylabel() == "accuracy" and "ε" in ax.get_xlabel()
    lines = ax.get_lines()
    assert [line.get_linestyle() for line in lines] == ["-", "--"]
    ys = lines[0].get_ydata()
    assert ys[0] == 19 / 20  # clean accuracy at eps 0
    assert all(a >= b for a, b in zip(ys, ys[1:], strict=False))
    save_figure(ax, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").read_bytes().startswith(PNG)


def test_one_model_several_methods_share_one_black_attack_curve():
    runs = runs_from_rows(rows(1.0) + rows(0.5, method="ibp"), "net")
    for plot in (plot_sorted_eps, plot_certified_accuracy):
        lines = plot(runs).get_lines()
        labels = [line.get_label() for line in lines]
        assert labels == ["net (crown): certified", "net (ibp): certified", "net: attack"]
        assert lines[2].get_color() == "black" and lines[2].get_linestyle() == "--"


def test_draws_on_a_given_axes_and_splits_methods():
    from matplotlib.figure import Figure

    ax = Figure().add_subplot(1, 1, 1)
    split = runs_from_rows(rows(1.0) + rows(0.5, method="ibp"), "net")
    assert list(split) == ["net (crown)", "net (ibp)"]
    assert plot_sorted_eps(split, ax) is ax
    assert len(ax.get_lines()) == 3


def test_plots_do_not_touch_pyplot_state():
    import sys

    before = "matplotlib.pyplot" in sys.modules
    plot_sorted_eps({"m": rows(1.0)})
    if not before:
        assert "matplotlib.pyplot" not in sys.modules
