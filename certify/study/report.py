"""The experiment's report: ``study.json`` (every number), figures, and ``summary.md``.

Everything here is read from the stage records and run folders the earlier stages wrote; the
claim table is computed from those numbers by :func:`certify.study.claims.compute_claims`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from certify.errors import ReportError, literal
from certify.study import claims as C

STUDY_FILE = "study.json"
SUMMARY_FILE = "summary.md"
FIGURES = {
    "attack_all": "attack/attack_curves.png",
    "attack_pair": "attack/teacher-vs-pruned/attack_curves.png",
    "sorted_normal": "figures/sorted_eps_teacher_vs_students.png",
    "sorted_robust": "figures/sorted_eps_robust_teacher_vs_student.png",
    "sorted_retrained": "figures/sorted_eps_retrained_vs_scratch.png",
    "sorted_all": "figures/sorted_eps_all.png",
    "certified_accuracy": "figures/certified_accuracy_all.png",
    "areas": "figures/certification_area.png",
    "panels": "figures/sorted_eps_panels.png",
    "claims": "figures/claims.png",
}


def _steps(out: Path, stage: str) -> dict[str, Any]:
    path = out / "stages" / f"{stage}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ReportError(f"stage record {literal(path)} is missing or unreadable; rerun the "
                          "experiment from that stage ({from_stage})",
                          from_stage=stage) from None
    return {k: v.get("result") for k, v in data.get("steps", {}).items()}


def collect(config: Any, out: Path) -> dict[str, Any]:
    """Gather every number of the run into one JSON-able dict (``study.json``)."""
    from certify.checkpoint import load_checkpoint
    from certify.nets import arch_name, count_parameters
    from certify.report.area import read_run
    from certify.report.summary import summarize_method
    from certify.study.experiment import MODEL_LABELS, MODEL_ORDER

    attack = _steps(out, "attack")
    certified = _steps(out, "certify")
    method = config.certify.method
    eps_table = config.certify.eps if config.certify.eps >= 0 else None
    if eps_table is None:
        grid = [e for e in next(iter(attack.values()))["eps"] if e > 0]
        eps_table = grid[len(grid) // 3] if grid else 0.0
    models: dict[str, Any] = {}
    for label in MODEL_ORDER:
        model, meta = load_checkpoint(out / "models" / f"{label}.pt")
        run = read_run(out / "certify" / label)
        s = summarize_method(run.rows_of(method), [eps_table])
        curve = attack.get(label) or {}
        curve_at = None
        if curve:
            k = min(range(len(curve["eps"])), key=lambda i: abs(curve["eps"][i] - eps_table))
            curve_at = curve["accuracy"][k]
        models[label] = {
            "name": MODEL_LABELS[label], "arch": arch_name(meta.arch, meta.arch_kwargs),
            "parameters": count_parameters(model),
            "test_accuracy": meta.metrics.get("test_accuracy"),
            "validation_accuracy": meta.metrics.get("validation_accuracy"),
            "clean_accuracy": s.clean_accuracy, "certification_area": s.certification_area,
            "median_certified_eps": s.median_certified_eps,
            "certified_accuracy_at_eps": s.certified_accuracy[0][1],
            # same points and rows as the certified columns: PGD's minimal-eps search found no
            # adversarial example at eps_table or below
            "pgd_accuracy_at_eps": s.attack_accuracy[0][1] if s.attack_accuracy else None,
            "pgd_curve_accuracy_at_eps": curve_at, "mean_ratio": s.mean_ratio,
            "certified_samples": s.n, "certify_seconds": certified.get(label, {}).get("seconds"),
        }
    distill = _steps(out, "distill")
    prune = _steps(out, "prune")
    return {"name": config.name, "dataset": config.experiment.dataset, "method": method,
            "table_eps": eps_table, "models": models,
            "attack": {k: {"eps": v["eps"], "accuracy": v["accuracy"], "n": v["n"]}
                       for k, v in attack.items()},
            "sweep": distill.get("sweep") or {}, "prune": prune.get(C.PRUNED) or {}}


def _mean_std(values: list[Any]) -> tuple[Any, Any]:
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(nums) != len(values) or not nums:
        return values[0], None
    if all(v == values[0] for v in values):       # the same in every seed: keep its type
        return values[0], 0.0
    mean = sum(nums) / len(nums)
    std = math.sqrt(sum((v - mean) ** 2 for v in nums) / (len(nums) - 1)) if len(nums) > 1 \
        else 0.0
    return mean, std


def pool(studies: list[dict[str, Any]]) -> dict[str, Any]:
    """One study from several seeds': numbers are means, with ``<key>_std`` over seeds."""
    if len(studies) == 1:
        return dict(studies[0])
    first = studies[0]
    models: dict[str, Any] = {}
    for label, m in first["models"].items():
        row: dict[str, Any] = {}
        for key in m:
            mean, std = _mean_std([st["models"][label][key] for st in studies])
            row[key] = mean
            if std is not None and key not in ("parameters",):
                row[f"{key}_std"] = std
        models[label] = row
    attack = {}
    for label, c in first["attack"].items():
        acc = [sum(st["attack"][label]["accuracy"][i] for st in studies) / len(studies)
               for i in range(len(c["accuracy"]))]
        attack[label] = {**c, "accuracy": acc}
    sweep = dict(first.get("sweep") or {})
    for key in ("temperature", "temperature_validation"):
        if isinstance(sweep.get(key), dict):
            sweep[key] = {t: _mean_std([(st.get("sweep") or {}).get(key, {}).get(t)
                                        for st in studies])[0] for t in sweep[key]}
    for key in ("logits", "logits_validation", "teacher_accuracy"):
        sweep[key] = _mean_std([(st.get("sweep") or {}).get(key) for st in studies])[0]
    sweep["selected"] = ", ".join(str((st.get("sweep") or {}).get("selected", ""))
                                  for st in studies)
    return {**first, "models": models, "attack": attack, "sweep": sweep}


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def _num(v: Any, spec: str = ".5f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def _figures(study: dict[str, Any], out: Path, *, tol: float | None = None,
             rows_dir: Path | None = None) -> None:
    from certify.report.area import read_run
    from certify.report.plots import (
        caption,
        plot_area_bars,
        plot_certified_accuracy,
        plot_sorted_eps,
        save_figure,
    )
    from certify.study.experiment import MODEL_LABELS, MODEL_ORDER

    method = study["method"]
    src = rows_dir if rows_dir is not None else out
    rows = {label: read_run(src / "certify" / label).rows_of(method) for label in MODEL_ORDER}

    def runs(*labels: str) -> dict[str, Any]:
        return {MODEL_LABELS[k]: rows[k] for k in labels}

    (out / "figures").mkdir(exist_ok=True)
    m = _cert_name(method)
    note = caption(runs(*MODEL_ORDER), tol=tol)
    save_figure(plot_sorted_eps(runs(C.TEACHER, C.STUDENT, C.PRUNED), caption=note,
                                title=f"Teacher vs distilled students ({m}; cf. Figs 8.30/8.31)"),
                out / FIGURES["sorted_normal"])
    save_figure(plot_sorted_eps(runs(C.ROBUST_TEACHER, C.ROBUST_STUDENT), caption=note,
                                title=f"Robust teacher vs robust-distilled ({m}; cf. Fig 8.47)"),
                out / FIGURES["sorted_robust"])
    save_figure(plot_sorted_eps(runs(C.RETRAINED, C.ROBUST_SHALLOW), caption=note,
                                title=f"Re-trained distilled vs robust scratch ({m}; Fig 8.48)"),
                out / FIGURES["sorted_retrained"])
    save_figure(plot_sorted_eps(runs(*MODEL_ORDER), caption=note,
                                title=f"Sorted certified ε, all models ({m})"),
                out / FIGURES["sorted_all"])
    save_figure(plot_certified_accuracy(runs(*MODEL_ORDER), caption=note,
                                        title=f"Certified ({m}) and PGD accuracy vs ε"),
                out / FIGURES["certified_accuracy"])
    ax = plot_area_bars({MODEL_LABELS[k]: study["models"][k]["certification_area"]
                         for k in MODEL_ORDER}, title=f"Certification area per model ({m})")
    ax.set_title(f"Certification area per model ({m})\n{note}", fontsize=11)
    save_figure(ax, out / FIGURES["areas"])


def models_table(study: dict[str, Any]) -> str:
    """The per-model table in markdown: architecture, size and accuracy on the test split."""
    lines = ["| model | architecture | parameters | test accuracy |", "|---|---|---:|---:|"]
    for m in study["models"].values():
        lines.append(f"| {m['name']} | {m['arch']} | {m['parameters']:,} | "
                     f"{_pm(m, 'test_accuracy')} |")
    return "\n".join(lines) + "\n"


def certification_table(study: dict[str, Any]) -> str:
    """Per model, every column from the same certified points and the same per-sample attack.

    Clean, PGD and certified accuracy, certification area and the mean certified/attack ratio
    all come from one ``certify area`` run's rows, so certified accuracy <= PGD accuracy holds in
    every row whenever every sample's certified eps is below its attack eps (which the run
    checks).
    """
    e = study["table_eps"]
    lines = [f"| model | clean accuracy | PGD accuracy at ε={e:g} | certified accuracy at "
             f"ε={e:g} | certification area | mean certified/attack |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in study["models"].values():
        lines.append(f"| {m['name']} | {_pm(m, 'clean_accuracy')} | "
                     f"{_pm(m, 'pgd_accuracy_at_eps')} | {_pm(m, 'certified_accuracy_at_eps')}"
                     f" | {_pm(m, 'certification_area', '.5f')} | "
                     f"{_pm(m, 'mean_ratio', '.3f')} |")
    return "\n".join(lines) + "\n"


def _pm(m: dict[str, Any], key: str, spec: str = "") -> str:
    """`m[key]` as a percentage (no `spec`) or number, with ``± std`` over seeds if pooled."""
    v, std = m.get(key), m.get(f"{key}_std")
    text = _num(v, spec) if spec else _pct(v)
    if isinstance(std, (int, float)) and isinstance(v, (int, float)):
        text += " ± " + (_num(std, spec) if spec else f"{100 * std:.2f}")
    return text


def certification_caption(config: Any) -> str:
    """What the columns of :func:`certification_table` were computed on."""
    cert = config.certify
    return (f"All columns on the same first {cert.n} test points: certified ε by "
            f"`{cert.method}` (an ε where the proof succeeded, within {cert.tol:g}); PGD accuracy "
            f"at ε: correctly classified and no adversarial example found at ε or below by the "
            f"per-sample minimal-ε PGD search ({cert.attack_steps} steps, the attack ε of the "
            "sorted-ε figures). Certification area = mean certified ε (misclassified points "
            "count 0).")


def _sweep_table(study: dict[str, Any]) -> str:
    sw = study.get("sweep") or {}
    temps = sw.get("temperature") or {}
    if not temps:
        return "(no sweep)\n"
    val = sw.get("temperature_validation") or {}
    lines = ["| temperature | validation accuracy | test accuracy | logit-matched: validation | "
             "logit-matched: test |", "|---:|---:|---:|---:|---:|"]
    for t, acc in temps.items():
        best = " (selected)" if sw.get("selected", "").endswith(f"T{t}") else ""
        lines.append(f"| {t}{best} | {_pct(val.get(t))} | {_pct(acc)} | "
                     f"{_pct(sw.get('logits_validation'))} | {_pct(sw.get('logits'))} |")
    chosen = sw.get("selected", "")
    lines.append(f"\nTeacher test accuracy: {_pct(sw.get('teacher_accuracy'))}; student "
                 f"parameters: {sw.get('parameters', 0):,}. Logit matching does not use T. "
                 f"Selected on validation accuracy (a tenth of the training split, held out "
                 f"and not trained on): `{chosen}`; test accuracy is reported, never chosen on.")
    return "\n".join(lines) + "\n"


def _prune_table(study: dict[str, Any]) -> str:
    rows = (study.get("prune") or {}).get("rows") or []
    if not rows:
        return "(no pruning)\n"
    lines = ["| model | parameters | conv parameters | test accuracy |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['parameters']:,} | {r['conv_parameters']:,} | "
                     f"{_pct(r['test_accuracy'])} |")
    return "\n".join(lines) + "\n"


def _cert_name(c: str) -> str:
    """How tables and figures spell a certifier: the method's display name (``CROWN``)."""
    import certify.bounds  # noqa: F401  (registers the methods)
    from certify.bounds.base import display_name

    return display_name(c)


def certifier_section(study: dict[str, Any]) -> str:
    """Markdown: areas per certifier with intervals, relaxation gaps, per-claim verdicts."""
    from certify.study import certifiers as K
    from certify.study.experiment import MODEL_LABELS

    certs = study["certifiers"]
    seeds = study.get("seeds") or [0]
    over = f"{len(seeds)} seeds ({', '.join(map(str, seeds))}) and " if len(seeds) > 1 else ""
    lines = [f"Certification area of every model under each certifier (mean over {over}the "
             "test points, 95% bootstrap interval in brackets). `attack`: the area under the "
             "per-sample attack ε (an upper bound on the true area, capped at eps_max); "
             "`exact`: the MILP's exact ε where it ran.", "",
             "| model | " + " | ".join(_cert_name(c) for c in certs) + " |",
             "|---|" + "---:|" * len(certs)]
    for label, per in study["areas"].items():
        cells = [f"{per[c]['area']:.5f} [{per[c]['low']:.5f}, {per[c]['high']:.5f}]"
                 if c in per else "–" for c in certs]
        lines.append(f"| {MODEL_LABELS.get(label, label)} | " + " | ".join(cells) + " |")
    gaps = study["relaxation_gaps"]
    methods = [c for c in certs if c not in (K.ATTACK, K.EXACT)]
    refs = [r for r in (K.EXACT, K.ATTACK) if r in certs]
    if refs:
        lines += ["", "Relaxation gap: reference area minus certified area (what the certifier "
                  "leaves unproven; larger on deeper nets if the relaxation is to blame).", "",
                  "| model | " + " | ".join(f"{r} − {_cert_name(m)}" for m in methods
                                            for r in refs) + " |",
                  "|---|" + "---:|" * (len(methods) * len(refs))]
        for label, per in gaps.items():
            cells = [f"{per[m][r]:.5f}" if r in per.get(m, {}) else "–"
                     for m in methods for r in refs]
            lines.append(f"| {MODEL_LABELS.get(label, label)} | " + " | ".join(cells) + " |")
    lines += ["", "Each area claim under each certifier: area of the first model vs the second, "
              "the ratio and its 95% paired bootstrap interval, and the verdict.", "",
              "| claim | " + " | ".join(_cert_name(c) for c in certs) + " | flips |",
              "|---|" + "---|" * len(certs) + ":---:|"]
    for key, per in study["area_ci"].items():
        cells = [f"{K.describe(per[c])}: **{per[c]['verdict']}**" if c in per else "–"
                 for c in certs]
        flag = "**yes**" if K.flips(per) else "no"
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {flag} |")
    return "\n".join(lines) + "\n"


def _certifier_figures(study: dict[str, Any], claims: list[C.Claim], out: Path, rows_dir: Path,
                       *, eps_max: float) -> None:
    from certify.report.area import read_run
    from certify.report.plots import plot_claim_table, plot_sorted_panels, save_figure
    from certify.study.experiment import MODEL_LABELS

    method = study["method"]
    panels = {
        "Fig 8.30: teacher vs distilled": (C.TEACHER, C.STUDENT),
        "Fig 8.31: teacher vs pruned": (C.TEACHER, C.PRUNED),
        "Fig 8.47: robust teacher vs robust-distilled": (C.ROBUST_TEACHER, C.ROBUST_STUDENT),
        "Fig 8.48: re-trained vs robust scratch": (C.RETRAINED, C.ROBUST_SHALLOW),
    }
    runs = {title: {MODEL_LABELS[k]: read_run(rows_dir / "certify" / k).rows_of(method)
                    for k in labels} for title, labels in panels.items()}
    legends = {MODEL_LABELS[k]: (v[method]["area"], v[method]["low"], v[method]["high"])
               for k, v in study["areas"].items()}
    seeds = study.get("seeds") or [0]
    fig = plot_sorted_panels(runs, legends, eps_max=eps_max,
                             title=f"Sorted ε per test point ({_cert_name(method)}, seed "
                                   f"{seeds[0]}); legend: area [95% CI over "
                                   f"{len(seeds)} seed(s) and points]")
    save_figure(fig, out / FIGURES["panels"])
    rows = [(c.statement, c.verdict + (" (flips)" if c.flips else "")
             + (" (attack disagrees)" if c.attack_disagrees else ""), ", ".join(
        f"{k}: {v}" for k, v in c.by_certifier)) for c in claims]
    save_figure(plot_claim_table(rows), out / FIGURES["claims"])


def write_report(config: Any, out: Path, *, seed_dirs: list[Path] | None = None
                 ) -> dict[str, Path]:
    """Write ``study.json``, the figures and ``summary.md``; return their paths.

    Args:
        config: The experiment's config.
        out: The report folder.
        seed_dirs: The folders of every seed's pipeline (default: `out`, one seed); tables
            show the mean ± std over them and the intervals resample them.
    """
    from certify._io import atomic_write_json, atomic_write_text
    from certify.report.results import json_safe
    from certify.study import certifiers as K
    from certify.study.experiment import MODEL_ORDER, seed_config

    dirs = seed_dirs or [out]
    seeds = list(config.seeds) if seed_dirs else [config.experiment.seed]
    study = pool([collect(seed_config(config, s), d) for s, d in zip(seeds, dirs, strict=True)])
    evidence, certs = K.read_evidence(dirs, MODEL_ORDER, config.certifiers,
                                      config.certify.eps_max)
    areas = K.area_table(evidence, certs)
    study.update({"seeds": seeds, "certifiers": list(certs), "areas": areas,
                  "relaxation_gaps": K.relaxation_gaps(areas, certs),
                  "area_ci": K.claim_intervals(evidence, certs)})
    claims = C.compute_claims(study, prune_tolerance=config.claims.prune_tolerance,
                              small_eps=config.claims.small_eps if config.claims.small_eps >= 0
                              else None)
    study["claims"] = [{"key": c.key, "statement": c.statement, "supported": c.supported,
                        "evidence": c.evidence, "status": c.status,
                        "by_certifier": [list(p) for p in c.by_certifier], "flips": c.flips}
                       for c in claims]
    atomic_write_json(out / STUDY_FILE, json_safe(study))
    _figures(study, out, tol=config.certify.tol, rows_dir=dirs[0])
    _certifier_figures(study, claims, out, dirs[0], eps_max=config.certify.eps_max)
    a = config.attack
    md = [
        f"# Shallow waters: {config.name}", "",
        "Does taking a network into shallow waters (distilling, pruning, robustly re-training) "
        "enlarge the region in which its predictions are certified? Reproduction of the thesis "
        "study on the `" + study["dataset"] + "` dataset. ε is the L∞ radius in pixel units of a "
        "[0, 1] image.", "",
        "## Models", "", models_table(study),
        "Test accuracy on the whole test split, on which nothing was chosen (the distillation "
        "temperature was chosen on a tenth of the training split held out for validation).", "",
        "## Certification", "", certification_table(study), certification_caption(config), "",
        f"![certification area]({FIGURES['areas']})", "",
        "## Distillation: temperature sweep (cf. Tables 8.7/8.8)", "",
        f"Students `{config.distill.student}` distilled from the teacher "
        f"`{config.teacher.arch}` with `{config.distill.method}` at each temperature, and once by "
        "logit matching.", "", _sweep_table(study),
        "## Filter pruning (cf. Table 8.10)", "", _prune_table(study),
        f"## Accuracy under {a.attack.upper()} (cf. Figs 8.19/8.22)", "",
        f"{a.n} test points, {a.steps} steps, {a.restarts} restart(s), ε grid `{a.eps}`.", "",
        f"![teacher vs pruned]({FIGURES['attack_pair']})", "",
        f"![all models]({FIGURES['attack_all']})", "",
        "## Certification: sorted maximal certified ε per test point", "",
        "Solid: certified ε (a proof); dashed: the smallest ε at which PGD found an adversarial "
        "example (an upper bound on the true distance).", "",
        f"![teacher vs students]({FIGURES['sorted_normal']})", "",
        f"![robust teacher vs robust-distilled]({FIGURES['sorted_robust']})", "",
        f"![re-trained vs scratch]({FIGURES['sorted_retrained']})", "",
        f"![all]({FIGURES['sorted_all']})", "",
        f"![certified accuracy]({FIGURES['certified_accuracy']})", "",
        "## Certifier-independence", "", certifier_section(study), "",
        f"![sorted-ε panels]({FIGURES['panels']})", "",
        "## Does this run support the thesis?", "",
        "Each verdict is computed from the numbers above (`study.json`). An area claim is "
        f"decided under the main certifier (`{config.certify.method}`) by its 95% paired "
        "bootstrap interval of the area ratio: supported if it lies above 1, contradicted if "
        "below, inconclusive if it contains 1 (per-certifier verdicts in the table above).", "",
        C.claims_markdown(claims),
        f"![claim table]({FIGURES['claims']})", "",
    ]
    atomic_write_text(out / SUMMARY_FILE, "\n".join(md))
    paths = {"study": out / STUDY_FILE, "summary": out / SUMMARY_FILE}
    paths.update({k: out / v for k, v in FIGURES.items()})
    return paths


def read_claims(out: str | Path) -> list[C.Claim]:
    """The claims stored in ``study.json`` of an experiment folder."""
    from certify.report.results import read_json

    data = read_json(Path(out) / STUDY_FILE)
    return [C.Claim(c["key"], c["statement"], c["supported"], c["evidence"],
                    c.get("status", ""), tuple(tuple(p) for p in c.get("by_certifier", [])),
                    bool(c.get("flips", False)))
            for c in data.get("claims", [])]
