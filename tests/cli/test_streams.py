"""stdout carries results only: a solver's native banner never reaches it (``--json`` parses).

These run ``python -m certify`` in a fresh process: HiGHS prints its banner to file descriptor 1
once per process, which click's test runner (a Python-level capture) would not see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def certify(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "certify", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def small_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained digits MLP: points are classified correctly, so the solvers really run."""
    from certify.train.loops import TrainConfig
    from certify.train.standard import train_standard

    path = tmp_path_factory.mktemp("streams") / "m.pt"
    train_standard("mlp-16", "digits", TrainConfig(epochs=3, lr=1e-2), output=path, quiet=True)
    return path


def test_area_json_with_lp_parses(tmp_path: Path, small_mlp: Path) -> None:
    model = small_mlp
    r = certify("area", model, "--dataset", "digits", "--n", 2, "--method", "lp", "--json",
                "-q", "-o", tmp_path / "run", "--tol", "1e-2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)            # nothing but the JSON document on stdout
    assert data["n_done"] == 2
    assert "HiGHS" in r.stderr              # the banner went to stderr, not away


def test_verify_json_with_milp_parses(tmp_path: Path, small_mlp: Path) -> None:
    from certify.checkpoint import load_checkpoint
    from tests.onnx.onnx_helpers import robustness_vnnlib

    model = small_mlp
    loaded, meta = load_checkpoint(model)
    x = torch.rand(1, *meta.input_shape, generator=torch.Generator().manual_seed(2))
    label = int(loaded(x).argmax())
    spec = tmp_path / "p.vnnlib"
    spec.write_text(robustness_vnnlib(x, label, meta.num_classes, 0.02))
    r = certify("verify", model, spec, "--milp", "always", "--no-bab", "--method", "ibp", "--json",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["result"] in ("sat", "unsat", "unknown", "timeout")
    assert "HiGHS" in r.stderr
