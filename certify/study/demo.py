"""``certify demo``: the digits study (``configs/shallow-waters-digits.toml``) into one folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tomllib

from certify.errors import SpecError

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "shallow-waters-digits.toml"
DEMO = {"experiment": {"seeds": [0, 1, 2]}, "certify": {"n": 100}}
QUICK = {"experiment": {"seeds": [0, 1]},"teacher": {"epochs": 3}, "robust_teacher": {"epochs": 2},
         "distill": {"epochs": 3, "temperatures": [1.0, 3.0]}, "prune": {"finetune_epochs": 1},
         "retrain": {"epochs": 1}, "robust_shallow": {"epochs": 2},
         "attack": {"n": 100, "eps": "0:0.2:5"}, "certify": {"n": 30, "tol": 1e-3}}


def demo_config(*, quick: bool = False) -> Any:
    """The demo's :class:`~certify.study.experiment.ExperimentConfig` (smaller with `quick`)."""
    from certify.study.experiment import parse_config

    if not DEMO_CONFIG.is_file():
        raise SpecError(f"the demo config {DEMO_CONFIG} is missing; reinstall certify from its "
                        "source tree (pip install -e .)")
    data = tomllib.loads(DEMO_CONFIG.read_text())
    for section, values in DEMO.items():      # the demo's budget: 3 seeds, 100 points
        data.setdefault(section, {}).update(values)
    if quick:
        for section, values in QUICK.items():
            data.setdefault(section, {}).update(values)
        data["experiment"]["name"] = data["experiment"].get("name", "demo") + "-quick"
    return parse_config(data, source=str(DEMO_CONFIG))


def run_demo(*, out_dir: str | os.PathLike[str] = "reports/demo", quick: bool = False,
             quiet: bool = False, seeds: tuple[int, ...] | None = None) -> Any:
    """Run (or reuse) the digits study into `out_dir`; see :func:`run_experiment`."""
    from certify.study.experiment import run_experiment

    return run_experiment(demo_config(quick=quick), out_dir=out_dir, quiet=quiet, seeds=seeds)
