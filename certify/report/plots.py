"""Figures of ``certify area`` runs (the only module that imports matplotlib).

Figures are built on :class:`matplotlib.figure.Figure` objects rendered by the Agg backend, so
nothing here touches pyplot's global state or needs a display; every function also accepts an
existing ``ax`` (a notebook's). A *run* is a label and its per-sample rows of one method:
``{"teacher (crown)": rows, "student (crown)": rows2}``; each run gets one colour, certified eps
solid and attack eps dashed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from certify.records import SampleRow

if TYPE_CHECKING:
    from matplotlib.axes import Axes

DPI = 150
FIGSIZE = (6.4, 4.2)
EPS_LABEL = "ε (L∞, pixel scale)"
ACCURACY_LABEL = "accuracy (%)"
#: More legend entries than this and the legend goes outside the axes, right of the data.
LEGEND_INSIDE_MAX = 4

Runs = Mapping[str, Sequence[SampleRow]]


def _new_axes() -> Axes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig.add_subplot(1, 1, 1)


def _style(ax: Axes, *, xlabel: str, ylabel: str, title: str, caption: str | None = None
           ) -> None:
    """Labels, grid and legend; a legend of many entries is put outside the axes (right)."""
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.set_title(f"{title}\n{caption}" if caption else title, fontsize=12 if not caption else 11)
    ax.tick_params(labelsize=10)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    entries = len(ax.get_legend_handles_labels()[1])
    if entries > LEGEND_INSIDE_MAX:
        fig = ax.figure
        fig.set_size_inches(FIGSIZE[0] + 3.2, max(FIGSIZE[1], 0.9 + 0.22 * entries))
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0)
    else:
        ax.legend(fontsize=9, frameon=False, loc="best")
    ax.figure.tight_layout()


def caption(rows: Runs | Sequence[SampleRow], *, tol: float | None = None) -> str:
    """``"crown, n=120 per model, tol=0.001"``: what a figure of these rows was computed with."""
    runs = [list(rows)] if not isinstance(rows, Mapping) else [list(r) for r in rows.values()]
    methods = sorted({r.method for rs in runs for r in rs})
    sizes = sorted({len({r.index for r in rs}) for rs in runs if rs})
    n = "n=" + "/".join(str(k) for k in sizes) + (" per model" if len(runs) > 1 else "")
    parts = [", ".join(methods) or "no rows", n]
    if tol is not None:
        parts.append(f"tol={tol:g}")
    return ", ".join(parts)


def _colors(n: int) -> list[str]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _certified(rows: Sequence[SampleRow]) -> np.ndarray:
    return np.array([r.certified_eps if r.correct else 0.0 for r in rows], dtype=np.float64)


def _attack_curves(runs: Runs, colors: Sequence[Any]) -> list[tuple[str, Any, np.ndarray]]:
    """``(label, colour, attack eps of correct samples or -inf)`` per distinct attack curve.

    Runs of one model with several bound methods share their attack eps: that curve is drawn
    once, in black, labelled by the runs' common name (``"model (ibp)"``, ``"model (crown)"``
    give ``"model"``).
    """
    return _shared_curves(runs, colors, lambda r: r.attack_eps if r.correct else -math.inf)


def _exact_eps(row: SampleRow) -> float:
    """A row's exact eps for the figure: -inf if misclassified, NaN if unknown or not computed,
    ``inf`` above eps_max."""
    if not row.correct:
        return -math.inf
    if row.exact_status in ("optimal", "above_max") and row.exact_eps is not None:
        return row.exact_eps
    return math.nan


def _exact_curves(runs: Runs, colors: Sequence[Any]) -> list[tuple[str, Any, np.ndarray]]:
    """Like :func:`_attack_curves` for the exact eps (``certify area --exact``)."""
    return _shared_curves(runs, colors, _exact_eps)


def _shared_curves(runs: Runs, colors: Sequence[Any], value: Any
                   ) -> list[tuple[str, Any, np.ndarray]]:
    """Distinct per-run curves of ``value(row)``; identical ones merged (see _attack_curves)."""
    groups: list[tuple[list[str], Any, np.ndarray]] = []
    for (label, rows), color in zip(runs.items(), colors, strict=True):
        values = np.array([value(r) for r in rows], dtype=np.float64)
        if not np.isfinite(values).any():
            continue
        for labels, _, other in groups:
            if other.shape == values.shape and np.array_equal(other, values, equal_nan=True):
                labels.append(label)
                break
        else:
            groups.append(([label], color, values))
    out = []
    for labels, color, values in groups:
        if len(labels) == 1:
            out.append((labels[0], color, values))
        else:
            common = os.path.commonprefix(labels).rstrip(" ([").strip() or "shared"
            out.append((common, "black", values))
    return out


def plot_sorted_eps(runs: Runs, ax: Axes | None = None, *,
                    title: str = "Per-sample certified and attack ε",
                    caption: str | None = None) -> Axes:
    """The thesis's sorted-eps curves: every test point's eps in increasing order.

    Certified eps (misclassified at 0) solid, attack eps dashed, one colour per run. Samples
    without an adversarial example (attack eps ``inf``) are left off the dashed curve. Runs with
    exact eps (``certify area --exact``) also get the exact curve, dotted, between the two;
    samples whose exact eps is unknown or above eps_max are left off it.

    Args:
        runs: Label -> rows of one method.
        ax: Axes to draw on; default a new 6.4x4.2 in figure at 150 dpi.
        title: Axes title.
        caption: A second title line: method, n, tol (see :func:`caption`).
    Returns:
        The axes.
    """
    ax = ax if ax is not None else _new_axes()
    colors = _colors(len(runs))
    for (label, rows), color in zip(runs.items(), colors, strict=True):
        cert = np.sort(_certified(rows))
        ax.plot(np.arange(1, len(cert) + 1), cert, color=color, linewidth=1.8,
                label=f"{label}: certified")
    for label, color, values in _attack_curves(runs, colors):
        # misclassified samples have attack eps 0 (the clean point is adversarial)
        attack = np.sort(np.where(values == -math.inf, 0.0, values))
        finite = attack[np.isfinite(attack)]
        ax.plot(np.arange(1, finite.size + 1), finite, color=color, linewidth=1.4,
                linestyle="--", label=f"{label}: attack")
    for label, color, values in _exact_curves(runs, colors):
        exact = np.sort(np.where(values == -math.inf, 0.0, values)[~np.isnan(values)])
        finite = exact[np.isfinite(exact)]
        ax.plot(np.arange(1, finite.size + 1), finite, color=color, linewidth=1.6,
                linestyle=":", label=f"{label}: exact")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    _style(ax, xlabel="test points (sorted)", ylabel=EPS_LABEL, title=title, caption=caption)
    return ax


def accuracy_curve(values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact step function x -> 100 * #{i : values[i] > x} / n, as drawn.

    `values` holds, per sample, the eps from which it stops counting (its certified or attack
    eps; ``-inf`` for a misclassified sample, ``inf`` for one never broken). The function is
    right-continuous and constant between its breakpoints: on ``[xs[k], xs[k+1])`` it equals
    ``percent[k]``, which is what ``ax.step(xs, percent, where="post")`` draws. ``xs`` starts at 0
    and holds every finite value > 0 once; where all values are finite it ends at 0%.
    Per-sample ``a <= b`` thus gives curve(a) <= curve(b) at every x.

    Returns:
        ``(xs, percent)``, both of shape ``(k,)``.
    """
    finite = values[np.isfinite(values)]
    xs = np.unique(np.concatenate([[0.0], finite[finite > 0]]))
    percent = np.array([100.0 * np.count_nonzero(values > x) / n for x in xs])
    return xs, percent


def _draw_steps(ax: Axes, xs: np.ndarray, ys: np.ndarray, right: float, **style: Any) -> None:
    """Draw a right-continuous step curve (see :func:`accuracy_curve`) out to `right`."""
    ax.step(np.append(xs, right), np.append(ys, ys[-1]), where="post", **style)


def plot_certified_accuracy(runs: Runs, ax: Axes | None = None, *,
                            title: str = "Certified and attack accuracy",
                            caption: str | None = None) -> Axes:
    """Certified accuracy vs eps (solid) and accuracy under attack (dashed), in percent.

    At eps x, certified accuracy is the percentage of samples correctly classified with a
    certified eps > x, attack accuracy the percentage correctly classified with an attack eps
    > x (no adversarial example found at x or below); both curves are exact step functions
    (:func:`accuracy_curve`). Since every sample's certified eps is at most its attack eps, the
    certified curve never runs above the attack curve, and it ends at 0%.

    Args:
        runs: Label -> rows of one method.
        ax: Axes to draw on; default a new figure.
        title: Axes title.
        caption: A second title line: method, n, tol (see :func:`caption`).
    Returns:
        The axes.
    """
    ax = ax if ax is not None else _new_axes()
    colors = _colors(len(runs))
    curves: list[tuple[str, Any, np.ndarray, np.ndarray, dict[str, Any]]] = []
    for (label, rows), color in zip(runs.items(), colors, strict=True):
        if not rows:
            continue
        cert = np.array([r.certified_eps if r.correct else -math.inf for r in rows])
        xs, ys = accuracy_curve(cert, len(rows))
        curves.append((f"{label}: certified", color, xs, ys, {"linewidth": 1.8}))
    for label, color, attack in _attack_curves(runs, colors):
        xs, ys = accuracy_curve(attack, len(attack))
        curves.append((f"{label}: attack", color, xs, ys, {"linewidth": 1.4, "linestyle": "--"}))
    top = max((float(xs.max()) for _, _, xs, _, _ in curves), default=0.0)
    right = top * 1.05 if top > 0 else 1.0
    for label, color, xs, ys, style in curves:
        _draw_steps(ax, xs, ys, right, color=color, label=label, **style)
    ax.set_xlim(0, right)
    ax.set_ylim(0, 102)
    _style(ax, xlabel=EPS_LABEL, ylabel=ACCURACY_LABEL, title=title, caption=caption)
    return ax


def save_figure(ax: Axes, path: str | os.PathLike[str], *, dpi: int = DPI) -> None:
    """Save the figure of `ax` as PNG atomically (temporary file, then rename)."""
    from certify._io import atomic_open

    with atomic_open(path, "wb") as f:
        ax.figure.savefig(f, format="png", dpi=dpi, bbox_inches="tight")


def runs_from_rows(rows: Sequence[SampleRow], name: str) -> dict[str, list[SampleRow]]:
    """Split one run's rows into plot runs, one per method: ``"name (method)"``."""
    out: dict[str, list[SampleRow]] = {}
    for r in rows:
        out.setdefault(f"{name} ({r.method})", []).append(r)
    return out


KINDS = ("sorted-eps", "certified-accuracy")


def plot_runs(run_dirs: Sequence[str | os.PathLike[str]], *,
              out: str | os.PathLike[str] | None = None, kind: str = "sorted-eps",
              methods: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Redraw a figure of saved ``certify area`` runs (what ``certify plot`` does).

    Each run is labelled by its model's file stem, with the method appended when the runs show
    more than one method, and the run folder's name when two labels would coincide.

    Args:
        run_dirs: Run folders written by ``certify area``.
        out: Output PNG; default ``<kind file>`` in the run folder (one run) or in the current
            folder (several).
        kind: ``sorted-eps`` or ``certified-accuracy``.
        methods: Only these methods (default: all of each run).
        title: Figure title (default: the plot's own).
    Returns:
        The written path.
    Raises:
        ReportError: a folder that is not a run, or no rows for the requested methods.
    """
    from certify.errors import ReportError, unknown_name
    from certify.report.area import ACCURACY_FIGURE, SORTED_FIGURE, read_run

    if kind not in KINDS:
        raise unknown_name("plot kind", kind, KINDS)
    runs = [read_run(d) for d in run_dirs]
    selected: list[tuple[str, Path, str, list[SampleRow]]] = []
    for run in runs:
        for method in dict.fromkeys(r.method for r in run.rows):
            if methods is None or method in methods:
                selected.append((run.label, run.run_dir, method, run.rows_of(method)))
    if not selected:
        wanted = ", ".join(methods) if methods else "any method"
        raise ReportError(f"no per-sample rows for {wanted} in {', '.join(map(str, run_dirs))}")
    several_methods = len({m for _, _, m, _ in selected}) > 1
    labels = [f"{stem} ({m})" if several_methods else stem for stem, _, m, _ in selected]
    curves: dict[str, Sequence[SampleRow]] = {}
    for label, (_, run_dir, _, rows) in zip(labels, selected, strict=True):
        key = label if labels.count(label) == 1 else f"{label} [{run_dir.name}]"
        curves[key] = rows
    tols = {run.settings.get("tol") for run in runs}
    tol = tols.pop() if len(tols) == 1 else None
    kwargs: dict[str, Any] = {"caption": caption(curves, tol=tol if isinstance(
        tol, (int, float)) else None)}
    if title:
        kwargs["title"] = title
    if kind == "sorted-eps":
        ax = plot_sorted_eps(curves, **kwargs)
        name = SORTED_FIGURE
    else:
        ax = plot_certified_accuracy(curves, **kwargs)
        name = ACCURACY_FIGURE
    target = Path(out) if out is not None else (
        Path(run_dirs[0]) / name if len(run_dirs) == 1 else Path(name))
    save_figure(ax, target)
    return target


# ------------------------------------------------------------------ study figures (additive)

ATTACK_ACCURACY_LABEL = "accuracy under attack (%)"  # percent, as every accuracy figure


def plot_attack_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                       ax: Axes | None = None, *,
                       title: str = "Accuracy under PGD attack",
                       caption: str | None = None) -> Axes:
    """Accuracy under attack vs eps, one curve (with markers) per model (Figs 8.19/8.22).

    Args:
        curves: Label -> ``(eps grid, accuracy as fractions)``; drawn in percent.
        ax: Axes to draw on; default a new figure.
        title: Axes title.
        caption: A second title line (attack, n, steps).
    Returns:
        The axes.
    """
    ax = ax if ax is not None else _new_axes()
    markers = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
    top = 0.0
    for k, ((label, (eps, acc)), color) in enumerate(zip(curves.items(), _colors(len(curves)),
                                                         strict=True)):
        xs = np.asarray(eps, dtype=np.float64)
        ys = 100.0 * np.asarray(acc, dtype=np.float64)
        ax.plot(xs, ys, color=color, linewidth=1.8, marker=markers[k % len(markers)],
                markersize=4, label=label)
        top = max(top, float(xs.max()) if xs.size else 0.0)
    ax.set_xlim(0, top * 1.02 if top > 0 else 1.0)
    ax.set_ylim(0, 101)
    _style(ax, xlabel=EPS_LABEL, ylabel=ATTACK_ACCURACY_LABEL, title=title, caption=caption)
    return ax


def plot_area_bars(areas: Mapping[str, float], ax: Axes | None = None, *,
                   title: str = "Certification area") -> Axes:
    """Horizontal bars of each model's certification area (mean certified eps)."""
    ax = ax if ax is not None else _new_axes()
    labels = list(areas)
    values = np.array([areas[k] for k in labels], dtype=np.float64)
    ax.barh(np.arange(len(labels)), values, color=_colors(len(labels)))
    ax.set_yticks(np.arange(len(labels)), labels)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.4f}", va="center", fontsize=9)
    ax.set_xlim(0, float(values.max()) * 1.25 if values.size and values.max() > 0 else 1.0)
    ax.set_xlabel(f"certification area: mean certified {EPS_LABEL}", fontsize=11)
    ax.set_title(title, fontsize=12)
    ax.tick_params(labelsize=10)
    ax.grid(True, axis="x", alpha=0.3, linewidth=0.6)
    ax.figure.tight_layout()
    return ax


def plot_sorted_panels(panels: Mapping[str, Runs],
                       legends: Mapping[str, tuple[float, float, float]], *, eps_max: float,
                       title: str = "") -> Axes:
    """The thesis's sorted-eps figures side by side on shared axes, one panel per comparison.

    Certified eps solid, attack eps dashed (capped at `eps_max`), exact eps dotted where known;
    each model's legend entry carries its area and interval from `legends`
    (``label -> (area, low, high)``).

    Returns:
        The first panel's axes (its figure holds all panels).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels), 4.4), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)[0]
    has_exact = any(not np.isnan(_exact_eps(r)) and r.correct for runs in panels.values()
                    for rows in runs.values() for r in rows)
    styles = "certified (solid), attack (dashed)" + (", exact (dotted)" if has_exact else "")
    for ax, (name, runs) in zip(axes, panels.items(), strict=True):
        for (label, rows), color in zip(runs.items(), _colors(len(runs)), strict=True):
            area = legends.get(label)
            tag = f" {area[0]:.4f} [{area[1]:.4f}, {area[2]:.4f}]" if area else ""
            cert = np.sort(_certified(rows))
            xs = np.arange(1, cert.size + 1)
            ax.plot(xs, cert, color=color, linewidth=1.8, label=f"{label}:{tag}")
            attack = np.sort([min(r.attack_eps, eps_max) if r.correct else 0.0 for r in rows])
            ax.plot(xs, attack, color=color, linewidth=1.2, linestyle="--")
            exact = np.array([_exact_eps(r) for r in rows])
            if np.isfinite(exact).any() or (exact == math.inf).any():
                known = np.sort(np.clip(np.where(exact == -math.inf, 0.0, exact)[~np.isnan(exact)],
                                        0.0, eps_max))
                ax.plot(np.arange(1, known.size + 1), known, color=color, linewidth=1.4,
                        linestyle=":")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("test points (sorted)", fontsize=10)
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.legend(fontsize=7, frameon=False, loc="upper left",
                  title=styles,
                  title_fontsize=6)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel(EPS_LABEL, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return axes[0]


def plot_claim_table(rows: Sequence[tuple[str, str, str]], *,
                     title: str = "Does this run support the thesis?") -> Axes:
    """The claim table as a figure: claim, verdict, verdict per certifier."""
    import textwrap

    ax = _new_axes()
    fig = ax.figure
    fig.set_size_inches(13.0, 0.9 + 0.62 * len(rows))
    ax.axis("off")
    cells = [[textwrap.fill(s, 70), v, textwrap.fill(p, 45)] for s, v, p in rows]
    table = ax.table(cellText=cells, colLabels=["claim", "verdict", "per certifier"],
                     loc="center", cellLoc="left", colWidths=[0.55, 0.13, 0.32])
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    colours = {"supported": "#d8f0d8", "yes": "#d8f0d8", "contradicted": "#f6d5d5",
               "no": "#f6d5d5", "inconclusive": "#f3ecd0"}
    for (r, c), cell in table.get_celld().items():
        cell.set_height(0.9 / (len(rows) + 1))
        if r > 0 and c == 1:
            cell.set_facecolor(colours.get(rows[r - 1][1].split(" ")[0], "white"))
    ax.set_title(title, fontsize=11)
    return ax


def write_figures(run_dir: str | os.PathLike[str], rows: Sequence[SampleRow], *,
                  label: str, tol: float | None = None) -> None:
    """Write ``sorted_eps.png`` and ``certified_accuracy.png`` of one run's rows."""
    from certify.records import ACCURACY_FIGURE, SORTED_FIGURE

    runs = runs_from_rows(rows, label)
    run_dir = Path(run_dir)
    note = caption(rows, tol=tol)
    save_figure(plot_sorted_eps(runs, caption=note), run_dir / SORTED_FIGURE)
    save_figure(plot_certified_accuracy(runs, caption=note), run_dir / ACCURACY_FIGURE)
