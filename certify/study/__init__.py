"""The thesis's study in one command: attack curves, comparisons, experiments, the demo."""

from certify.study.attack_curves import parse_eps_grid, run_attack_curves
from certify.study.claims import Claim, compute_claims
from certify.study.compare import compare_models
from certify.study.experiment import ExperimentConfig, load_config, run_experiment

__all__ = [
    "Claim",
    "ExperimentConfig",
    "compare_models",
    "compute_claims",
    "load_config",
    "parse_eps_grid",
    "run_attack_curves",
    "run_experiment",
]
