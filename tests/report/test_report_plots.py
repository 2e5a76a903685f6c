"""Figures: written as PNG, labelled, one colour per run, certified solid / attack dashed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from certify.report.plots import (
    accuracy_curve,
    caption,
    plot_attack_curves,
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
    assert ax.get_ylabel() == "accuracy (%)" and "ε" in ax.get_xlabel()
    lines = ax.get_lines()
    assert [line.get_linestyle() for line in lines] == ["-", "--"]
    ys = lines[0].get_ydata()
    # right of eps 0: the 19 correct samples less the three (i = 0, 7, 14) certified at 0 only
    assert ys[0] == 100 * 16 / 20
    assert ys[-1] == 0.0
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


def step_value(line, x: float) -> float:  # type: ignore[no-untyped-def]
    """The value a ``where="post"`` step line shows at x (right-continuous)."""
    assert line.get_drawstyle() == "steps-post"
    xs, ys = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    return float(ys[np.searchsorted(xs, x, side="right") - 1])


def random_rows(rng: np.random.Generator, n: int, method: str = "crown") -> list[SampleRow]:
    """Sound per-sample data: certified <= attack, with ties, misclassified and unbroken points."""
    out = []
    for i in range(n):
        attack = float(rng.choice([0.01, 0.02, 0.05, 0.1]) * rng.integers(1, 4))
        kind = rng.integers(0, 6)
        cert = {0: attack, 1: 0.0}.get(int(kind), float(attack * rng.uniform(0.1, 1.0)))
        if kind == 2:
            attack = math.inf
        pred = (i + 1) % 10 if kind == 3 else i % 10
        out.append(SampleRow(i, i % 10, pred, method, cert, attack, 4, 0.01, cert))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_certified_curve_never_above_attack_curve_and_ends_at_zero(seed):
    rng = np.random.default_rng(seed)
    runs = {f"model{k}": random_rows(rng, int(rng.integers(5, 40))) for k in range(3)}
    lines = {line.get_label(): line for line in plot_certified_accuracy(runs).get_lines()}
    for label, data in runs.items():
        cert, attack = lines[f"{label}: certified"], lines[f"{label}: attack"]
        points = np.concatenate([cert.get_xdata(), attack.get_xdata()])
        grid = np.unique(np.concatenate([points, (points[:-1] + points[1:]) / 2]))
        n = len(data)
        for x in grid:
            c, a = step_value(cert, x), step_value(attack, x)
            assert c <= a, (label, x, c, a)
            # exactly the definition: percent of correct samples with eps > x
            assert c == pytest.approx(100 * sum(r.correct and r.certified_eps > x
                                                for r in data) / n)
            assert a == pytest.approx(100 * sum(r.correct and r.attack_eps > x
                                                for r in data) / n)
        assert cert.get_ydata()[-1] == 0.0  # every certified eps is finite: the curve ends at 0
        assert cert.get_xdata()[-1] == attack.get_xdata()[-1] == pytest.approx(
            plot_certified_accuracy(runs).get_xlim()[1])


def test_accuracy_curve_is_exact_between_breakpoints():
    values = np.array([0.0, 0.01, 0.01, 0.03, -math.inf])
    xs, pct = accuracy_curve(values, 5)
    assert list(xs) == [0.0, 0.01, 0.03]
    assert list(pct) == [60.0, 20.0, 0.0]  # > 0, > 0.01, > 0.03


def test_many_models_put_the_legend_outside_the_data():
    runs = {f"model {k}": rows(1.0 - k / 10) for k in range(6)}
    for plot in (plot_sorted_eps, plot_certified_accuracy):
        ax = plot(runs)
        ax.figure.canvas.draw()
        legend = ax.get_legend().get_window_extent()
        assert legend.x0 >= ax.get_window_extent().x1  # right of the axes, not over the curves


def test_captions_name_method_n_and_tol_and_every_accuracy_is_in_percent():
    data = rows(1.0)
    assert caption(data, tol=1e-3) == "crown, n=20, tol=0.001"
    assert caption({"a": data, "b": rows(0.5)}) == "crown, n=20 per model"
    ax = plot_certified_accuracy({"m": data}, caption=caption(data, tol=1e-3))
    assert ax.get_title().endswith("crown, n=20, tol=0.001")
    attack = plot_attack_curves({"m": ([0.0, 0.1], [0.9, 0.5])}, caption="pgd, n=20")
    assert max(attack.get_lines()[0].get_ydata()) == 90.0
    assert attack.get_ylabel().endswith("(%)") and ax.get_ylabel().endswith("(%)")
