"""Two CPU processes under torchrun (gloo): sharded ``area``, data-parallel ``train``, failures.

Each test starts ``python -m torch.distributed.run --nproc_per_node=2`` on 127.0.0.1 and a free
port, with one thread per process, and compares against the same command in one process.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("certify.bounds")

TIMING = {"seconds", "samples_per_second"}  # columns and summary keys that may differ
# (--indices, not --n: torchrun's own parser takes "--n" for an ambiguous abbreviation)
AREA_ARGS = ["--dataset", "digits", "--indices", "0:64", "--batch-size", "8", "--method", "crown",
             "--quiet"]  # 8 batches: 4 learn first guesses, 4 are sharded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def certify(*args: str, nproc: int = 1, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``certify ARGS`` in a subprocess, under torchrun with `nproc` processes when > 1."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    full_env.update({"OMP_NUM_THREADS": "1", "CERTIFY_DIST_TIMEOUT_MINUTES": "2"}, **(env or {}))
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}"] if nproc > 1 \
        else [sys.executable]
    return subprocess.run([*launcher, "-m", "certify", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, check=False)


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "per_sample.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def results(run: Path) -> dict:
    data = json.loads((run / "results.json").read_text())
    summary = {m: {k: v for k, v in s.items() if k not in TIMING}
               for m, s in data["summary"].items()}
    return {**{k: data[k] for k in ("status", "n_done", "n_total", "settings", "eps_grid")},
            "summary": summary}


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> Path:
    from certify.train.loops import TrainConfig
    from certify.train.standard import train_standard

    path = tmp_path_factory.mktemp("dist") / "digits-mlp.pt"
    train_standard("mlp-32-32", "digits", TrainConfig(epochs=4, lr=1e-2, seed=0),
                   output=path, quiet=True)
    return path


@pytest.fixture(scope="module")
def single_run(digits_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "single"
    done = certify("area", str(digits_model), *AREA_ARGS, "-o", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_area_two_ranks_equals_one(digits_model, single_run, tmp_path):
    out = tmp_path / "two"
    done = certify("area", str(digits_model), *AREA_ARGS, "-o", str(out), nproc=2)
    assert done.returncode == 0, done.stderr
    assert rows(out) == rows(single_run)
    assert results(out) == results(single_run)
    assert not (out / "shards").exists()  # merged into per_sample.csv
    assert done.stdout.count("results in") == 1  # only rank 0 prints


def test_failed_rank_fails_run_and_resume_completes(digits_model, single_run, tmp_path):
    out = tmp_path / "failing"
    # rank 1 finishes one of its batches, then fails on the next
    done = certify("area", str(digits_model), *AREA_ARGS, "-o", str(out), nproc=2,
                   env={"CERTIFY_TEST_FAIL_RANK": "1:1"})
    assert done.returncode != 0
    assert "rank 1 failed: RuntimeError: injected failure" in done.stderr
    assert "rerun with --resume" in done.stderr
    kept = {p.parent.name: rows(p.parent) for p in (out / "shards").glob("*/per_sample.csv")}
    assert len(kept["rank-1"]) == 8  # its finished batch
    assert len(kept["rank-0"]) == 8 * 6  # the 4 first batches and its 2 shard batches
    assert not (out / "per_sample.csv").exists()

    done = certify("area", str(digits_model), *AREA_ARGS, "-o", str(out), "--resume", nproc=2)
    assert done.returncode == 0, done.stderr
    assert rows(out) == rows(single_run)
    assert results(out) == results(single_run)


def test_ddp_training_matches_single_process(tmp_path):
    from certify.checkpoint import load_checkpoint
    from certify.train.standard import evaluate_checkpoint

    args = ["train", "--arch", "mlp-32-32", "--dataset", "digits", "--epochs", "3",
            "--lr", "0.01", "--seed", "0", "--quiet"]
    one = certify(*args, "-o", str(tmp_path / "one.pt"))
    assert one.returncode == 0, one.stderr
    two = certify(*args, "-o", str(tmp_path / "two.pt"), nproc=2)
    assert two.returncode == 0, two.stderr
    assert not list(tmp_path.glob("*.partial"))  # state removed after the final save
    acc_one = evaluate_checkpoint(tmp_path / "one.pt").accuracy
    acc_two = evaluate_checkpoint(tmp_path / "two.pt").accuracy
    assert acc_two > 0.8
    assert abs(acc_one - acc_two) <= 0.03
    # same global batches, summed gradients: the weights agree up to summation order
    m1, _ = load_checkpoint(tmp_path / "one.pt")
    m2, _ = load_checkpoint(tmp_path / "two.pt")
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-3), name
