"""``certify experiment``: the thesis's whole study from one TOML file, in cached stages.

Stages, in order (each one's models feed the next)::

    teachers  teacher (standard) and robust-teacher (Wong-Kolter or another robust loss)
    distill   temperature sweep + logit matching from the teacher (best -> student) and the
              robust-distilled student from the robust teacher (robust-student)
    prune     L1 filter pruning of the student, fine-tuned (student-pruned)
    robust    robust re-training of the robust-distilled student (robust-student-retrained) and
              the same shallow net trained robustly from scratch (robust-shallow)
    attack    accuracy under PGD over the eps grid for every model
    certify   per-sample certified eps (and attack eps) of every model: ``run_area``
    report    summary.md with every table and figure, study.json, and the claim table

Every stage writes its outputs atomically and then ``stages/<stage>.json``: the hash of its
inputs (its config sections and the keys of all earlier stages), the files it wrote with their
sha256, and per-model steps done. A rerun skips a stage whose record matches and whose files are
intact; ``from_stage`` reruns that stage and every later one; an interrupted stage keeps its
finished steps and continues the interrupted one (training and area runs resume).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from certify.errors import NAME, SpecError, unknown_name
from certify.study import claims as C

STAGES = ("teachers", "distill", "prune", "robust", "attack", "certify", "report")
MODEL_LABELS = {
    C.TEACHER: "teacher", C.ROBUST_TEACHER: "robust teacher", C.STUDENT: "distilled student",
    C.PRUNED: "pruned student", C.ROBUST_STUDENT: "robust-distilled student",
    C.RETRAINED: "robust-distilled, re-trained", C.ROBUST_SHALLOW: "robust shallow (scratch)",
}
MODEL_ORDER = (C.TEACHER, C.STUDENT, C.PRUNED, C.ROBUST_TEACHER, C.ROBUST_STUDENT, C.RETRAINED,
               C.ROBUST_SHALLOW)


# --------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ExperimentSection:
    name: str = ""
    dataset: str = ""
    seed: int = 0
    seeds: tuple[int, ...] = ()
    device: str = "cpu"
    data_dir: str = ""
    description: str = ""


@dataclass(frozen=True)
class TrainSection:
    arch: str = ""
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    schedule: str = "cosine"
    weight_decay: float = 0.0


@dataclass(frozen=True)
class RobustSection:
    arch: str = ""
    method: str = "wong-kolter"
    eps: float = 0.01
    ramp_epochs: float = -1.0
    kappa_start: float = 1.0
    kappa: float = 0.0
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    schedule: str = "cosine"
    eval_samples: int = 0


@dataclass(frozen=True)
class DistillSection:
    student: str = ""
    temperatures: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0)
    method: str = "hinton"
    alpha: float = 0.9
    robust_method: str = "logits"
    robust_temperature: float = 2.0
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    schedule: str = "cosine"


@dataclass(frozen=True)
class PruneSection:
    ratio: float = 0.5
    finetune_epochs: int = 2
    lr: float = 5e-4
    batch_size: int = 64


@dataclass(frozen=True)
class AttackSection:
    eps: str = "0:0.014:15"
    attack: str = "pgd"
    n: int = 500
    steps: int = 20
    restarts: int = 1


@dataclass(frozen=True)
class CertifySection:
    method: str = "crown"
    n: int = 200
    eps_max: float = 0.5
    tol: float = 1e-4
    attack_steps: int = 40
    batch_size: int = 100
    eps: float = -1.0
    certifiers: tuple[str, ...] = ("ibp", "crown", "alpha-crown")
    exact: bool = False
    exact_time_limit: float = 30.0


@dataclass(frozen=True)
class ClaimsSection:
    prune_tolerance: float = 2.0
    small_eps: float = -1.0


@dataclass(frozen=True)
class ExperimentConfig:
    """A parsed experiment file (see ``configs/shallow-waters-*.toml`` for every key)."""

    experiment: ExperimentSection
    teacher: TrainSection
    robust_teacher: RobustSection
    distill: DistillSection
    prune: PruneSection
    retrain: RobustSection
    robust_shallow: RobustSection
    attack: AttackSection
    certify: CertifySection
    claims: ClaimsSection
    source: str = ""

    @property
    def name(self) -> str:
        return self.experiment.name

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seeds of the study: ``[experiment] seeds``, or the one ``seed``."""
        return self.experiment.seeds or (self.experiment.seed,)

    @property
    def certifiers(self) -> tuple[str, ...]:
        """The bound methods every model is certified by: the main ``method`` first."""
        c = self.certify
        return (c.method,) + tuple(m for m in c.certifiers if m != c.method)

    def section(self, name: str) -> dict[str, Any]:
        return asdict(getattr(self, name))


SECTIONS: dict[str, type] = {
    "experiment": ExperimentSection, "teacher": TrainSection, "robust_teacher": RobustSection,
    "distill": DistillSection, "prune": PruneSection, "retrain": RobustSection,
    "robust_shallow": RobustSection, "attack": AttackSection, "certify": CertifySection,
    "claims": ClaimsSection,
}
REQUIRED = {("experiment", "dataset"), ("teacher", "arch"), ("distill", "student"),
            ("robust_teacher", "eps")}


TEXT_LISTS = frozenset({"certifiers"})
INT_LISTS = frozenset({"seeds"})


def _coerce(where: str, key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str) or (key == "eps" and isinstance(value, list))
        if ok and isinstance(value, list):
            value = ",".join(str(v) for v in value)
    elif key in TEXT_LISTS:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    elif key in INT_LISTS:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                             for v in value)
        value = tuple(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)
        value = tuple(float(v) for v in value) if ok else value
    else:
        ok = True
    if not ok:
        raise SpecError(f"{where}: '{key}' must be {type(default).__name__}, got {value!r}")
    return value


def parse_config(data: Mapping[str, Any], *, source: str = "config") -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from parsed TOML.

    Raises:
        SpecError / UnknownNameError: an unknown section or key (named, with suggestions), a
            value of the wrong type, a missing required key, bad values.
    """
    for name in data:
        if name not in SECTIONS:
            raise unknown_name(f"section in {source}", name, SECTIONS)
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, Mapping):
            raise SpecError(f"{source}: [{name}] must be a table, got {raw!r}")
        defaults = {f.name: cls().__getattribute__(f.name) for f in fields(cls)}
        values = {}
        for key, value in raw.items():
            if key not in defaults:
                raise unknown_name(f"key in [{name}] of {source}", key, defaults)
            values[key] = _coerce(f"{source} [{name}]", key, value, defaults[key])
        built[name] = cls(**values)
    for section, key in sorted(REQUIRED):
        if section == "robust_teacher" and key == "eps":
            if "eps" not in data.get(section, {}):
                raise SpecError(f"{source}: [robust_teacher] needs 'eps' (the robust training "
                                "radius in pixel units, e.g. eps = 0.01)")
            continue
        if not getattr(built[section], key):
            raise SpecError(f"{source}: [{section}] needs '{key}'")
    exp = built["experiment"]
    if not exp.name:
        built["experiment"] = ExperimentSection(**{**asdict(exp), "name": Path(source).stem})
    # robust sections inherit: robust teacher -> teacher arch; retrain/shallow -> teacher's eps
    rt = built["robust_teacher"]
    if not rt.arch:
        built["robust_teacher"] = RobustSection(**{**asdict(rt), "arch": built["teacher"].arch})
    for name in ("retrain", "robust_shallow"):
        sec = built[name]
        raw = data.get(name, {})
        changes = {}
        if "eps" not in raw:
            changes["eps"] = built["robust_teacher"].eps
        if "method" not in raw:
            changes["method"] = built["robust_teacher"].method
        if name == "robust_shallow" and not sec.arch:
            changes["arch"] = built["distill"].student
        built[name] = RobustSection(**{**asdict(sec), **changes})
    config = ExperimentConfig(**built, source=str(source))
    validate(config)
    return config


def validate(config: ExperimentConfig) -> None:
    """Check names and values before any work (architectures, datasets, methods, grids)."""
    from certify.bounds import list_methods
    from certify.data import get_dataset_info
    from certify.nets import list_archs, parse_arch
    from certify.study.attack_curves import ATTACK_NAMES, parse_eps_grid
    from certify.train.distill import METHODS as DISTILL_METHODS
    from certify.train.robust import ROBUST_METHODS

    get_dataset_info(config.experiment.dataset)
    for arch in (config.teacher.arch, config.robust_teacher.arch, config.distill.student,
                 config.robust_shallow.arch):
        base, _ = parse_arch(arch)
        if base not in list_archs():
            raise unknown_name("architecture", base, list_archs())
    for sec in (config.robust_teacher, config.retrain, config.robust_shallow):
        if sec.method not in ROBUST_METHODS:
            raise unknown_name("robust training method", sec.method, ROBUST_METHODS)
        if not (math.isfinite(sec.eps) and sec.eps > 0):
            raise SpecError(f"robust eps must be > 0, got {sec.eps}")
    if config.distill.method not in ("hinton", "defensive"):
        raise unknown_name("temperature distillation method", config.distill.method,
                           ("hinton", "defensive"))
    if config.distill.robust_method not in DISTILL_METHODS:
        raise unknown_name("distillation method", config.distill.robust_method, DISTILL_METHODS)
    if not config.distill.temperatures or any(t <= 0 for t in config.distill.temperatures):
        raise SpecError(f"[distill] temperatures must be > 0, got {config.distill.temperatures}")
    if not 0 < config.prune.ratio < 1:
        raise SpecError(f"[prune] ratio must be in (0, 1), got {config.prune.ratio}")
    if config.attack.attack not in ATTACK_NAMES:
        raise unknown_name("attack", config.attack.attack, ATTACK_NAMES)
    parse_eps_grid(config.attack.eps)
    for m in (config.certify.method, *config.certify.certifiers):
        if m not in list_methods():
            raise unknown_name("bound method", m, list_methods())
    if len(set(config.certify.certifiers)) != len(config.certify.certifiers):
        raise SpecError(f"[certify] certifiers must name each method once, got "
                        f"{list(config.certify.certifiers)}")
    seeds = config.experiment.seeds
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise SpecError(f"[experiment] seeds must be distinct integers >= 0, got {list(seeds)}; "
                        "e.g. seeds = [0, 1, 2]")
    if not (math.isfinite(config.certify.exact_time_limit)
            and config.certify.exact_time_limit > 0):
        raise SpecError(f"[certify] exact_time_limit must be > 0 seconds, got "
                        f"{config.certify.exact_time_limit}")
    for what, v in (("[attack] n", config.attack.n), ("[certify] n", config.certify.n)):
        if v < 1:
            raise SpecError(f"{what} must be >= 1, got {v}")


def load_config(path: str | os.PathLike[str]) -> ExperimentConfig:
    """Read and validate an experiment TOML file.

    Raises:
        SpecError: a missing or malformed file, unknown keys, bad values.
    """
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"experiment file not found: {p}; e.g. configs/shallow-waters-digits.toml")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{p} is not valid TOML: {e}") from None
    return parse_config(data, source=str(p))


# --------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class ExperimentResult:
    """What :func:`run_experiment` did.

    Attributes:
        out_dir: The experiment folder.
        ran: Stages computed in this call.
        skipped: Stages reused from an earlier call.
        claims: The claim table of the report.
        seconds: Wall time of this call.
    """

    out_dir: Path
    ran: tuple[str, ...]
    skipped: tuple[str, ...]
    claims: tuple[C.Claim, ...]
    seconds: float


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


STAGE_SECTIONS = {
    "teachers": ("experiment", "teacher", "robust_teacher"),
    "distill": ("distill",),
    "prune": ("prune",),
    "robust": ("retrain", "robust_shallow"),
    "attack": ("attack",),
    "certify": ("certify",),
    "report": ("claims",),
}
RECORD_VERSION = 1


@dataclass
class _Stage:
    """A stage's record while it runs: finished steps are saved as they finish."""

    path: Path
    key: str
    steps: dict[str, Any] = field(default_factory=dict)

    def save(self, *, complete: bool, outputs: Mapping[str, str] | None = None) -> None:
        from certify._io import atomic_write_json, sha256_file

        files = {name: {"path": p, "sha256": sha256_file(self.path.parent.parent / p)}
                 for name, p in (outputs or {}).items()}
        atomic_write_json(self.path, {"version": RECORD_VERSION, "stage": self.path.stem,
                                      "key": self.key, "complete": complete, "steps": self.steps,
                                      "outputs": files})

    def step(self, name: str, key: Any, fn: Callable[[], Any]) -> Any:
        """Run `fn` unless step `name` finished with the same `key`; store its JSON result."""
        k = _hash(key)
        done = self.steps.get(name)
        if done is not None and done.get("key") == k:
            return done.get("result")
        result = fn()
        self.steps[name] = {"key": k, "result": result}
        self.save(complete=False)
        return result


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == RECORD_VERSION else None


def _intact(out: Path, record: Mapping[str, Any]) -> bool:
    from certify._io import sha256_file

    for info in record.get("outputs", {}).values():
        p = out / info["path"]
        if not p.is_file() or sha256_file(p) != info["sha256"]:
            return False
    return True


class _Runner:
    def __init__(self, config: ExperimentConfig, out: Path, quiet: bool) -> None:
        self.config = config
        self.out = out
        self.quiet = quiet
        exp = config.experiment
        self.dataset = exp.dataset
        self.seed = exp.seed
        self.device = exp.device
        self.data_dir = exp.data_dir or None
        self.models_dir = out / "models"

    def log(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def model(self, label: str) -> Path:
        return self.models_dir / f"{label}.pt"

    def rel(self, p: Path) -> str:
        return str(p.relative_to(self.out))

    def train_config(self, sec: Any, *, epochs: int | None = None) -> Any:
        from certify.train.loops import TrainConfig

        return TrainConfig(epochs=epochs if epochs is not None else sec.epochs,
                           batch_size=sec.batch_size, lr=sec.lr,
                           optimizer=getattr(sec, "optimizer", "adam"),
                           schedule=getattr(sec, "schedule", "cosine"),
                           weight_decay=getattr(sec, "weight_decay", 0.0), seed=self.seed,
                           device=self.device)

    def robust_config(self, sec: RobustSection) -> Any:
        from certify.train.robust import RobustConfig, default_ramp
        from certify.train.schedules import EpsSchedule

        ramp = default_ramp(sec.epochs, None if sec.ramp_epochs < 0 else sec.ramp_epochs)
        return RobustConfig(method=sec.method, eps=EpsSchedule(final=sec.eps, ramp_epochs=ramp),
                            kappa=sec.kappa, kappa_start=sec.kappa_start,
                            eval_samples=sec.eval_samples)

    # ------------------------------------------------------------------ the stages

    def teachers(self, st: _Stage) -> dict[str, str]:
        import certify.train.robust as robust
        import certify.train.standard as standard

        c = self.config
        t = self.model(C.TEACHER)
        st.step(C.TEACHER, c.section("teacher"), lambda: self._done(standard.train_standard(
            c.teacher.arch, self.dataset, self.train_config(c.teacher), output=t,
            data_dir=self.data_dir, resume=True, quiet=self.quiet)))
        r = self.model(C.ROBUST_TEACHER)
        rt = c.robust_teacher
        st.step(C.ROBUST_TEACHER, c.section("robust_teacher"), lambda: self._done(
            robust.train_robust(rt.arch, self.dataset, self.train_config(rt),
                                self.robust_config(rt), output=r, data_dir=self.data_dir,
                                resume=True, quiet=self.quiet)))
        return {C.TEACHER: self.rel(t), C.ROBUST_TEACHER: self.rel(r)}

    def _done(self, trained: Any) -> dict[str, Any]:
        m = trained.meta.metrics
        self.log(f"  {trained.path.name}: test accuracy {100 * m['test_accuracy']:.2f}%")
        return {"test_accuracy": m.get("test_accuracy")}

    def distill(self, st: _Stage) -> dict[str, str]:
        distill = importlib.import_module("certify.train.distill")

        c = self.config
        d = c.distill
        student = self.model(C.STUDENT)

        def sweep() -> dict[str, Any]:
            res = distill.distill_sweep(
                self.model(C.TEACHER), d.student, list(d.temperatures), method=d.method,
                alpha=d.alpha, with_logits=True, config=self.train_config(d), output=student,
                data_dir=self.data_dir, resume=True, quiet=self.quiet)
            self.log(f"  sweep: best {res.best_label}")
            row_logits = res.rows[0].logits_accuracy if res.rows else None
            return {"temperature": {f"{r.temperature:g}": r.temperature_accuracy
                                    for r in res.rows},
                    "temperature_validation": {f"{r.temperature:g}": r.temperature_validation
                                               for r in res.rows},
                    "logits": row_logits,
                    "logits_validation": res.rows[0].logits_validation if res.rows else None,
                    "selected": res.best_label,
                    "teacher_accuracy": res.teacher_accuracy,
                    "parameters": res.rows[0].parameters if res.rows else None}

        st.step("sweep", d, sweep)
        rs = self.model(C.ROBUST_STUDENT)
        st.step(C.ROBUST_STUDENT, d, lambda: self._done(distill.distill(
            self.model(C.ROBUST_TEACHER), d.student, method=d.robust_method,
            temperature=d.robust_temperature, alpha=d.alpha, config=self.train_config(d),
            data_dir=self.data_dir, output=rs, resume=True, quiet=self.quiet)))
        sweep_md = student.with_name(student.stem + ".sweep.md")
        return {C.STUDENT: self.rel(student), C.ROBUST_STUDENT: self.rel(rs),
                "sweep_table": self.rel(sweep_md)}

    def prune(self, st: _Stage) -> dict[str, str]:
        import certify.train.prune as prune

        p = self.config.prune
        out = self.model(C.PRUNED)

        def run() -> dict[str, Any]:
            from certify.train.loops import TrainConfig

            ft = TrainConfig(epochs=p.finetune_epochs, batch_size=p.batch_size, lr=p.lr,
                             seed=self.seed, device=self.device) if p.finetune_epochs > 0 else None
            res = prune.prune_checkpoint(self.model(C.STUDENT), p.ratio, finetune=ft,
                                         data_dir=self.data_dir, output=out, resume=True,
                                         device=self.device, quiet=self.quiet)
            return {"rows": [dict(r) for r in res.rows],
                    "widths": {k: list(v) for k, v in res.widths.items()}}

        st.step(C.PRUNED, p, run)
        return {C.PRUNED: self.rel(out)}

    def robust(self, st: _Stage) -> dict[str, str]:
        import certify.train.robust as robust

        c = self.config
        re_out = self.model(C.RETRAINED)
        st.step(C.RETRAINED, c.section("retrain"), lambda: self._done(robust.retrain_checkpoint(
            self.model(C.ROBUST_STUDENT), self.robust_config(c.retrain),
            self.train_config(c.retrain), data_dir=self.data_dir, output=re_out, resume=True,
            quiet=self.quiet)))
        sh = self.model(C.ROBUST_SHALLOW)
        rs = c.robust_shallow
        st.step(C.ROBUST_SHALLOW, c.section("robust_shallow"), lambda: self._done(
            robust.train_robust(rs.arch, self.dataset, self.train_config(rs),
                                self.robust_config(rs), output=sh, data_dir=self.data_dir,
                                resume=True, quiet=self.quiet)))
        return {C.RETRAINED: self.rel(re_out), C.ROBUST_SHALLOW: self.rel(sh)}

    def attack(self, st: _Stage) -> dict[str, str]:
        from certify.study.attack_curves import (
            FIGURE_FILE,
            JSON_FILE,
            ModelCurve,
            attack_curves,
            parse_eps_grid,
            write_attack_curves,
        )

        a = self.config.attack
        grid = parse_eps_grid(a.eps)
        curves = []
        for label in MODEL_ORDER:
            res = st.step(label, {"attack": asdict(a), "model": self._sha(label)},
                          lambda label=label: asdict(attack_curves(
                              [self.model(label)], self.dataset, grid, attack=a.attack, n=a.n,
                              steps=a.steps, restarts=a.restarts, labels=[label], seed=self.seed,
                              device=self.device, data_dir=self.data_dir, quiet=True)[0]))
            curves.append(ModelCurve(res["label"], res["path"], tuple(res["eps"]),
                                     tuple(res["accuracy"]), int(res["n"])))
            self.log(f"  {label}: {a.attack} accuracy " + " ".join(
                f"{100 * v:.0f}" for v in res["accuracy"]))
        folder = self.out / "attack"
        settings = {**asdict(a), "dataset": self.dataset, "seed": self.seed}
        write_attack_curves(folder, _relabel(curves), attack=a.attack, settings=settings,
                            title=f"Accuracy under {a.attack.upper()}: all models")
        pair = [c for c in curves if c.label in (C.TEACHER, C.PRUNED)]
        write_attack_curves(folder / "teacher-vs-pruned", _relabel(pair), attack=a.attack,
                            settings=settings, title=f"{a.attack.upper()} accuracy: teacher vs "
                            "pruned student (cf. Figs 8.19/8.22)")
        return {"curves": self.rel(folder / JSON_FILE), "figure": self.rel(folder / FIGURE_FILE),
                "pair_figure": self.rel(folder / "teacher-vs-pruned" / FIGURE_FILE)}

    def _sha(self, label: str) -> str:
        from certify._io import sha256_file

        return sha256_file(self.model(label))

    def certify(self, st: _Stage) -> dict[str, str]:
        from certify.records import CONFIG_FILE, RESULTS_FILE
        from certify.run.area import AreaConfig, run_area

        c = self.config.certify
        outputs = {}
        for label in MODEL_ORDER:
            run_dir = self.out / "certify" / label
            config = AreaConfig(model=str(self.model(label)), dataset=self.dataset, n=c.n,
                                methods=self.config.certifiers, eps_max=c.eps_max, tol=c.tol,
                                attack_steps=c.attack_steps, batch_size=c.batch_size,
                                seed=self.seed, device=self.device, data_dir=self.data_dir,
                                exact=c.exact, exact_time_limit=c.exact_time_limit)

            def run(config: AreaConfig = config, run_dir: Path = run_dir) -> dict[str, Any]:
                t0 = time.perf_counter()
                if (run_dir / CONFIG_FILE).is_file():
                    try:
                        res = run_area(config, out_dir=run_dir, resume=True, quiet=self.quiet)
                    except SpecError:      # an earlier run with other settings: start over
                        shutil.rmtree(run_dir)
                        res = run_area(config, out_dir=run_dir, quiet=self.quiet)
                else:
                    if run_dir.exists():
                        shutil.rmtree(run_dir)
                    res = run_area(config, out_dir=run_dir, quiet=self.quiet)
                s = res.summaries[c.method]
                areas = ", ".join(f"{m} {res.summaries[m].certification_area:.5f}"
                                  for m in self.config.certifiers)
                self.log(f"  {run_dir.name}: certification area {areas} "
                         f"({time.perf_counter() - t0:.0f}s)")
                return s.as_dict()

            st.step(label, {"certify": asdict(c), "model": self._sha(label)}, run)
            outputs[label] = self.rel(run_dir / RESULTS_FILE)
        return outputs

    def report(self, st: _Stage) -> dict[str, str]:
        from certify.study.report import write_report

        paths = write_report(self.config, self.out)
        return {k: self.rel(v) for k, v in paths.items()}


def _relabel(curves: list[Any]) -> list[Any]:
    from dataclasses import replace

    return [replace(c, label=MODEL_LABELS.get(c.label, c.label)) for c in curves]


def run_experiment(config: ExperimentConfig | str | os.PathLike[str], *,
                   out_dir: str | os.PathLike[str] | None = None, from_stage: str | None = None,
                   quiet: bool = False, seeds: tuple[int, ...] | None = None
                   ) -> ExperimentResult:
    """Run (or continue) the study described by `config` into `out_dir`.

    Args:
        config: A parsed config or the path of a TOML file.
        out_dir: The experiment folder (default ``reports/<experiment name>``).
        from_stage: Recompute this stage and all later ones, even if their records match.
        quiet: No progress output.
        seeds: Run the whole pipeline once per seed (overrides ``[experiment] seeds``); each
            seed's stages live in ``<out>/seeds/seed-<s>/`` and the report pools them.
    Returns:
        :class:`ExperimentResult` (which stages ran, which were reused, the claims).
    Raises:
        SpecError: bad config or stage name; DatasetError: missing data; RunLockedError:
            another live run uses `out_dir`; and what the underlying commands raise.
    """
    t0 = time.perf_counter()
    if not isinstance(config, ExperimentConfig):
        config = load_config(config)
    if seeds is not None:
        from dataclasses import replace

        if not seeds:
            raise SpecError("{seeds} needs at least one seed, e.g. (0, 1, 2)", seeds=NAME)
        config = replace(config, experiment=replace(config.experiment, seeds=tuple(seeds)))
        validate(config)
    if from_stage is not None and from_stage not in STAGES:
        raise unknown_name("stage", from_stage, STAGES)
    from certify._io import ensure_dir
    from certify._lock import hold_output

    out = ensure_dir(Path(out_dir) if out_dir is not None else Path("reports") / config.name)
    with hold_output(out, command="experiment"):  # one run per folder; stale temporaries go
        if not config.experiment.seeds:
            return _run_stages(config, out, from_stage=from_stage, quiet=quiet, started=t0)
        return _run_seeds(config, out, from_stage=from_stage, quiet=quiet, started=t0)


def seed_config(config: ExperimentConfig, seed: int) -> ExperimentConfig:
    """`config` for one seed of a multi-seed study (``seeds`` cleared, ``seed`` set)."""
    from dataclasses import replace

    return replace(config, experiment=replace(config.experiment, seed=seed, seeds=()))


def seed_dir(out: Path, seed: int) -> Path:
    """The folder of one seed's whole pipeline inside a multi-seed study."""
    return out / "seeds" / f"seed-{seed}"


def _run_seeds(config: ExperimentConfig, out: Path, *, from_stage: str | None, quiet: bool,
               started: float) -> ExperimentResult:
    """Every seed's pipeline in ``seeds/seed-<s>/`` (each cached), then the pooled report."""
    from certify._io import atomic_write_text, ensure_dir
    from certify.study.report import read_claims, write_report

    if config.source and Path(config.source).is_file():
        atomic_write_text(out / "experiment.toml", Path(config.source).read_text())
    ran: list[str] = []
    skipped: list[str] = []
    for seed in config.seeds:
        if not quiet:
            print(f"== seed {seed} ==", file=sys.stderr, flush=True)
        res = _run_stages(seed_config(config, seed), ensure_dir(seed_dir(out, seed)),
                          from_stage=from_stage, quiet=quiet, started=started)
        ran += [f"seed-{seed}/{s}" for s in res.ran]
        skipped += [f"seed-{seed}/{s}" for s in res.skipped]
    write_report(config, out, seed_dirs=[seed_dir(out, s) for s in config.seeds])
    return ExperimentResult(out, tuple(ran), tuple(skipped), tuple(read_claims(out)),
                            time.perf_counter() - started)


def _run_stages(config: ExperimentConfig, out: Path, *, from_stage: str | None, quiet: bool,
                started: float) -> ExperimentResult:
    """:func:`run_experiment` in its locked folder `out`."""
    (out / "stages").mkdir(exist_ok=True)
    from certify._io import atomic_write_text

    if config.source and Path(config.source).is_file():
        atomic_write_text(out / "experiment.toml", Path(config.source).read_text())
    runner = _Runner(config, out, quiet)
    ran: list[str] = []
    skipped: list[str] = []
    previous = ""
    forced = False
    for stage in STAGES:
        key = _hash({"stage": stage, "previous": previous, "dataset": config.experiment.dataset,
                     "seed": config.experiment.seed,
                     "sections": {s: config.section(s) for s in STAGE_SECTIONS[stage]}})
        previous = key
        forced = forced or stage == from_stage
        path = out / "stages" / f"{stage}.json"
        record = _read_record(path)
        if (not forced and record is not None and record.get("key") == key
                and record.get("complete") and _intact(out, record)):
            skipped.append(stage)
            runner.log(f"[{stage}] up to date, reused")
            continue
        steps = record.get("steps", {}) if record and record.get("key") == key and not forced \
            else {}
        st = _Stage(path, key, dict(steps))
        runner.log(f"[{stage}] running")
        outputs = getattr(runner, stage)(st)
        st.save(complete=True, outputs=outputs)
        ran.append(stage)
    from certify.study.report import read_claims

    claims = read_claims(out)
    return ExperimentResult(out, tuple(ran), tuple(skipped), tuple(claims),
                            time.perf_counter() - started)
