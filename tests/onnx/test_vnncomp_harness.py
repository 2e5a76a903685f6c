"""The VNN-COMP scripts (vnncomp/prepare_instance.sh, vnncomp/run_instance.sh) run through
subprocess as the competition's harness runs them, on a generated network and properties.

The network takes NHWC images and starts with a Transpose (as Keras/TensorFlow exports do), so
the counterexample's ``X_i`` are checked in the file's own input order: onnxruntime re-evaluates
the network at the counterexample, and its outputs must violate the property.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx_helpers import make_graph, run_ort, tensor

ROOT = Path(__file__).resolve().parents[2]
PREPARE = ROOT / "vnncomp" / "prepare_instance.sh"
RUN = ROOT / "vnncomp" / "run_instance.sh"
SHAPE = (3, 3, 2)  # one NHWC input: H, W, C
CLASSES = 3


def _network() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Transpose", ["x"], ["a"], perm=[0, 3, 1, 2], name="to_nchw"),
             helper.make_node("Conv", ["a", "K", "B"], ["b"], name="conv"),
             helper.make_node("Relu", ["b"], ["c"], name="relu1"),
             helper.make_node("Flatten", ["c"], ["d"], name="flatten"),
             helper.make_node("Gemm", ["d", "W1", "b1"], ["e"], transB=1, name="fc1"),
             helper.make_node("Relu", ["e"], ["f"], name="relu2"),
             helper.make_node("Gemm", ["f", "W2", "b2"], ["y"], transB=1, name="fc2")]
    consts = {"K": rng.standard_normal((4, 2, 2, 2)), "B": rng.standard_normal(4) * 0.1,
              "W1": rng.standard_normal((6, 16)) * 0.5, "b1": rng.standard_normal(6) * 0.1,
              "W2": rng.standard_normal((CLASSES, 6)), "b2": rng.standard_normal(CLASSES) * 0.1}
    return make_graph(nodes, [tensor("x", [1, *SHAPE])], [tensor("y", [1, CLASSES])], consts)


def _property(lower: np.ndarray, upper: np.ndarray, label: int) -> str:
    """Unsafe: some other class reaches `label` in the box (the VNN-COMP robustness form)."""
    lines = [f"(declare-const X_{i} Real)" for i in range(lower.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(CLASSES)]
    for i, (lo, hi) in enumerate(zip(lower.tolist(), upper.tolist(), strict=True)):
        lines += [f"(assert (>= X_{i} {lo!r}))", f"(assert (<= X_{i} {hi!r}))"]
    others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(CLASSES) if j != label)
    return "\n".join([*lines, f"(assert (or {others}))", ""])


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """net.onnx, safe.vnnlib (a tiny box around a point) and unsafe.vnnlib (the box spanned by
    that point and one of another class: a counterexample exists), in one folder."""
    folder = tmp_path_factory.mktemp("bench")
    model = _network()
    onnx.save(model, str(folder / "net.onnx"))
    rng = np.random.default_rng(3)
    points = rng.random((400, *SHAPE)).astype(np.float32)
    logits = np.concatenate([run_ort(model, p[None]) for p in points])
    top2 = np.sort(logits, axis=1)[:, -2:]
    best = int(np.argmax(top2[:, 1] - top2[:, 0]))  # the point with the largest margin
    x, label = points[best], int(np.argmax(logits[best]))
    assert top2[best, 1] - top2[best, 0] > 0.1, "the generated network has no clear point"
    other = points[int(np.nonzero(np.argmax(logits, axis=1) != label)[0][0])]
    flat_x, flat_other = x.reshape(-1).astype(np.float64), other.reshape(-1).astype(np.float64)
    (folder / "safe.vnnlib").write_text(_property(flat_x - 1e-4, flat_x + 1e-4, label))
    (folder / "unsafe.vnnlib").write_text(_property(np.minimum(flat_x, flat_other),
                                                    np.maximum(flat_x, flat_other), label))
    return {"folder": folder, "model": model, "label": label,
            "lower": np.minimum(flat_x, flat_other), "upper": np.maximum(flat_x, flat_other)}


def _env(state: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, CERTIFY_PYTHON=sys.executable, CERTIFY_VNNCOMP_STATE=str(state),
               OMP_NUM_THREADS="1")
    env.pop("CERTIFY_VNNCOMP_ARGS", None)
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _instance(bench: dict, cwd: Path, vnnlib: str, results: str, timeout: str = "60",
              onnx_name: str = "net.onnx", **env: str) -> tuple[subprocess.CompletedProcess[str],
                                                                 str]:
    """run_instance.sh from `cwd` with paths relative to it, as the harness passes them."""
    folder = os.path.relpath(bench["folder"], cwd)
    out = _run([str(RUN), "v1", "test_category", f"{folder}/{onnx_name}", f"{folder}/{vnnlib}",
                results, timeout], cwd, _env(cwd, **env))
    return out, (cwd / results).read_text() if (cwd / results).exists() else ""


def _parse_counterexample(text: str) -> tuple[list[float], list[float]]:
    """The competition's counterexample: ``((X_0 v) ... (Y_0 v) ...)`` after the line ``sat``,
    read the way the competition's checker reads it (whitespace and newlines are free)."""
    first, _, rest = text.partition("\n")
    assert first == "sat"
    content = " ".join(rest.split())
    assert content.startswith("(") and content.endswith(")"), content[:40]
    xs: list[float] = []
    ys: list[float] = []
    for part in content[1:-1].split(")"):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"\(([XY])_(\d+) (\S+)", part)
        assert match, f"not a (NAME VALUE) pair: {part!r}"
        values = xs if match.group(1) == "X" else ys
        assert int(match.group(2)) == len(values), "indices must count up from 0"
        values.append(float(match.group(3)))
    return xs, ys


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_unsafe_instance_gives_a_counterexample_that_violates_the_property(
        bench: dict, tmp_path: Path) -> None:
    prepared = _run([str(PREPARE), "v1", "test_category", str(bench["folder"] / "net.onnx"),
                     str(bench["folder"] / "unsafe.vnnlib")], tmp_path, _env(tmp_path))
    assert prepared.returncode == 0, prepared.stderr
    assert list(tmp_path.iterdir()) == []  # prepare writes no result file
    out, text = _instance(bench, tmp_path, "unsafe.vnnlib", "out.txt")
    assert out.returncode == 0, out.stderr
    xs, ys = _parse_counterexample(text)
    assert len(xs) == int(np.prod(SHAPE)) and len(ys) == CLASSES
    x = np.asarray(xs)
    assert np.all(x >= bench["lower"]) and np.all(x <= bench["upper"]), "X outside the box"
    # the file's X_i in the ONNX input's own (NHWC) order: onnxruntime agrees on the outputs
    y = run_ort(bench["model"], x.reshape(1, *SHAPE).astype(np.float32))[0].astype(np.float64)
    np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-5)
    label = bench["label"]
    assert any(y[j] >= y[label] for j in range(CLASSES) if j != label), (
        f"onnxruntime's outputs {y} at the counterexample do not violate the property")
    _no_temporaries(tmp_path)


def test_safe_instance_is_unsat_from_another_directory(bench: dict, tmp_path: Path) -> None:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    (cwd / "out.txt").write_text("sat\n")  # a stale result is never read as this run's
    out, text = _instance(bench, cwd, "safe.vnnlib", "out.txt")
    assert out.returncode == 0, out.stderr
    assert text == "unsat\n"
    _no_temporaries(cwd)


def test_spent_budget_gives_timeout(bench: dict, tmp_path: Path) -> None:
    """The timeout counts from the script's start: the interpreter's start spends 0.2 s."""
    out, text = _instance(bench, tmp_path, "unsafe.vnnlib", "out.txt", timeout="0.2")
    assert out.returncode == 0, out.stderr
    assert text == "timeout\n"


def test_unsupported_network_and_missing_file_give_error(bench: dict, tmp_path: Path) -> None:
    model = make_graph([helper.make_node("Sin", ["x"], ["a"], name="odd_op"),
                        helper.make_node("Flatten", ["a"], ["y"])],
                       [tensor("x", [1, *SHAPE])], [tensor("y", [1, 18])], {})
    onnx.save(model, str(bench["folder"] / "odd.onnx"))
    out, text = _instance(bench, tmp_path, "safe.vnnlib", "odd.txt", onnx_name="odd.onnx")
    assert out.returncode == 0 and text == "error\n"
    assert "'odd_op' (op Sin" in out.stderr
    out, text = _instance(bench, tmp_path, "safe.vnnlib", "missing.txt",
                          onnx_name="missing.onnx")
    assert out.returncode == 0 and text == "error\n"
    assert "not found" in out.stderr
    _no_temporaries(tmp_path)


def test_wrong_version_or_arguments_are_refused(bench: dict, tmp_path: Path) -> None:
    net, spec = str(bench["folder"] / "net.onnx"), str(bench["folder"] / "safe.vnnlib")
    for args in ([str(RUN), "v2", "c", net, spec, "out.txt", "10"],
                 [str(RUN), "v1", "c", net, spec, "out.txt"],
                 [str(PREPARE), "v2", "c", net, spec]):
        out = _run(args, tmp_path, _env(tmp_path))
        assert out.returncode == 1 and ("v1" in out.stderr or "usage" in out.stderr)
    assert not (tmp_path / "out.txt").exists()
    out = _run([str(PREPARE), "v1", "c", str(tmp_path / "nothere.onnx"), spec], tmp_path,
               _env(tmp_path))
    assert out.returncode == 1 and "not found" in out.stderr


def test_prepare_stops_the_instance_left_running(bench: dict, tmp_path: Path) -> None:
    """A run_instance.sh whose verifier hangs (an interpreter that only sleeps): prepare ends
    its whole process group, by the id it recorded, and reports ready."""
    sleeper = tmp_path / "sleepy-python"
    sleeper.write_text("#!/bin/sh\nsleep 120\n")
    sleeper.chmod(0o755)
    state = tmp_path / "state"
    env = _env(state, CERTIFY_PYTHON=str(sleeper))
    folder = bench["folder"]
    hung = subprocess.Popen(
        ["bash", str(RUN), "v1", "c", str(folder / "net.onnx"), str(folder / "safe.vnnlib"),
         str(tmp_path / "hung.txt"), "100"], cwd=tmp_path, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pid_file: Path | None = None
        for _ in range(200):
            found = list(state.glob("certify-vnncomp-*.pid")) if state.exists() else []
            if found and found[0].read_text().strip():
                pid_file = found[0]
                break
            time.sleep(0.05)
        assert pid_file is not None, "run_instance.sh recorded no process"
        group = int(pid_file.read_text())
        os.killpg(group, 0)  # the verifier's group is running
        prepared = _run([str(PREPARE), "v1", "c", str(folder / "net.onnx"),
                         str(folder / "safe.vnnlib")], tmp_path, _env(state), timeout=60)
        assert prepared.returncode == 0, prepared.stderr
        for _ in range(100):
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the verifier's process group is still running after prepare")
        assert not pid_file.exists()
        assert hung.wait(timeout=30) != 0  # its verifier was stopped
    finally:
        if hung.poll() is None:
            os.killpg(hung.pid, signal.SIGKILL)
            hung.wait()
