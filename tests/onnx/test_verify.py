"""The verification cascade on ONNX networks and VNNLIB properties.

Ground truth comes from outside the code under test: robustness is established first with
`compute_bounds` (a proof), non-robustness by sampling (a point), and every counterexample the
cascade returns is re-checked with onnxruntime.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx_helpers import crown_proves_ibp_does_not, export_bytes, robustness_vnnlib, run_ort
from torch import nn

from certify.bounds import compute_bounds
from certify.errors import SpecError, UnknownNameError, UnsupportedLayerError
from certify.model_io import load_model
from certify.nets import Normalize
from certify.onnx_import import import_onnx
from certify.verify import (
    RESULT_COLUMNS,
    format_result,
    read_instances,
    run_instances,
    verify,
    verify_files,
)
from certify.vnnlib import VnnlibProperty, parse_vnnlib, read_vnnlib


def mlp() -> nn.Sequential:
    torch.manual_seed(11)
    return nn.Sequential(Normalize([0.45], [0.25]), nn.Flatten(), nn.Linear(16, 24), nn.ReLU(),
                         nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def cnn() -> nn.Sequential:
    torch.manual_seed(12)
    return nn.Sequential(Normalize([0.3, 0.5], [0.2, 0.3]), nn.Conv2d(2, 4, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5)).eval()


def margin_spec(label: int, k: int) -> torch.Tensor:
    """Rows y_label - y_j, j != label: `(1, k - 1, k)`."""
    rows = [torch.eye(k)[label] - torch.eye(k)[j] for j in range(k) if j != label]
    return torch.stack(rows).unsqueeze(0).double()


def proven_robust(model: nn.Module, x: torch.Tensor, label: int, k: int, eps: float) -> bool:
    b = compute_bounds(model.double(), (x - eps).double(), (x + eps).double(), "crown",
                       margin_spec(label, k))
    model.float()
    return bool((b.lower > 0).all())


def sampled_counterexample(model: nn.Module, prop: VnnlibProperty, shape: tuple[int, ...],
                           n: int = 2000, seed: int = 0) -> bool:
    """Whether uniform sampling and random corners of the box find an unsafe point."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, prop.num_inputs, generator=g, dtype=torch.float64)
    u[n // 2:] = u[n // 2:].round()
    x = prop.lower + (prop.upper - prop.lower) * u
    with torch.no_grad():
        y = model(x.float().reshape(n, *shape))
    inside = prop.contains(x.float())
    return bool((prop.is_unsafe(y) & inside).any())


def recheck_with_onnxruntime(raw: bytes, prop: VnnlibProperty, verdict, onnx_shape) -> None:  # type: ignore[no-untyped-def]
    """A sat verdict's x lies in the box and onnxruntime's outputs there are unsafe."""
    assert verdict.result == "sat" and verdict.counterexample is not None
    x, y = verdict.counterexample
    assert prop.contains(x.unsqueeze(0)).item(), "counterexample outside the input box"
    theirs = run_ort(raw, x.numpy().astype(np.float32).reshape(1, *onnx_shape))
    y_ort = torch.from_numpy(theirs.astype(np.float64)).reshape(1, -1)
    assert prop.is_unsafe(y_ort).item(), "onnxruntime does not confirm the counterexample"
    np.testing.assert_allclose(y.numpy(), y_ort[0].numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [mlp, cnn])
def test_robust_and_non_robust_points(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = make()
    shape = (1, 4, 4) if make is mlp else (2, 6, 6)
    raw = export_bytes(model, torch.rand(1, *shape))
    (tmp_path / "net.onnx").write_bytes(raw)
    net, meta = load_model(tmp_path / "net.onnx", device="cpu")
    k = meta.num_classes
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, *shape, generator=g)
    label = int(net(x).argmax())

    eps = 1e-3
    assert proven_robust(net, x, label, k, eps), "precondition: crown proves the small box"
    prop = parse_vnnlib(robustness_vnnlib(x, label, k, eps))
    verdict = verify(net, prop, timeout=30, input_shape=shape)
    assert verdict.result == "unsat" and verdict.counterexample is None
    assert verdict.method in ("ibp", "crown", "alpha-crown")

    prop = parse_vnnlib(robustness_vnnlib(x, label, k, 0.5))
    assert sampled_counterexample(net, prop, shape), "precondition: a counterexample exists"
    verdict = verify(net, prop, timeout=30, input_shape=shape)
    assert verdict.method == "attack"
    recheck_with_onnxruntime(raw, prop, verdict, shape)


def test_tighter_method_needed(tmp_path: Path) -> None:
    """An eps that crown proves but ibp does not: ibp alone says unknown, the cascade unsat."""
    model = mlp()
    g = torch.Generator().manual_seed(7)
    x = torch.rand(1, 1, 4, 4, generator=g)
    label = int(model(x).argmax())
    spec = margin_spec(label, 4)
    eps = crown_proves_ibp_does_not(model, x, spec, np.geomspace(1e-3, 0.2, 30))
    prop = parse_vnnlib(robustness_vnnlib(x, label, 4, eps))
    only_ibp = verify(model, prop, timeout=3, methods=("ibp",), use_milp=False, use_bab=False,
                      input_shape=(1, 4, 4))
    assert only_ibp.result == "unknown" and only_ibp.method is None
    assert 2.5 <= only_ibp.seconds < 3  # the budget spent on attacks, less the reserve
    cascade = verify(model, prop, timeout=30, methods=("ibp", "crown"), input_shape=(1, 4, 4))
    assert cascade.result == "unsat" and cascade.method == "crown"
    # branch and bound after ibp proves it too (before any MILP)
    searched = verify(model, prop, timeout=30, methods=("ibp",), input_shape=(1, 4, 4))
    assert searched.result == "unsat" and searched.method == "bab"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(2, 8), min_size=1, max_size=3), seed=st.integers(0, 10_000),
       eps=st.sampled_from([0.01, 0.05, 0.2, 0.6]), k=st.integers(2, 4),
       conv=st.integers(0, 3))
def test_never_unsat_when_sampling_finds_a_counterexample(widths: list[int], seed: int,
                                                          eps: float, k: int, conv: int) -> None:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    features = 6
    if conv:  # a conv layer first: (1, 2, 3) -> (conv, 1, 2)
        layers = [nn.Conv2d(1, conv, 2), nn.ReLU(), nn.Flatten()]
        features = 2 * conv
    for w in widths:
        layers += [nn.Linear(features, w), nn.ReLU()]
        features = w
    layers.append(nn.Linear(features, k))
    torch_model = nn.Sequential(*layers).eval()
    raw = export_bytes(torch_model, torch.rand(1, 1, 2, 3))
    import onnx

    net, _ = import_onnx(onnx.load_model_from_string(raw))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, 2, 3, generator=g)
    label = int(net(x).argmax())
    prop = parse_vnnlib(robustness_vnnlib(x, label, k, eps))
    verdict = verify(net, prop, timeout=20, input_shape=(1, 2, 3), seed=seed)
    if sampled_counterexample(net, prop, (1, 2, 3), seed=seed):
        assert verdict.result != "unsat", "unsat although sampling found a counterexample"
        assert verdict.result == "sat"
    if verdict.result == "sat":
        recheck_with_onnxruntime(raw, prop, verdict, (1, 2, 3))


def test_general_unsafe_set_with_several_rows() -> None:
    """A conjunction of two rows (and a constant) needs both; the attack finds such a point."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    text = """(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)
(assert (<= X_0 1)) (assert (>= X_0 -1)) (assert (<= X_1 1)) (assert (>= X_1 -1))
"""
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(4000, 2, generator=g) * 2 - 1
    with torch.no_grad():
        y = model(pts)
    # a target that exists: the outputs of a random box point, loosened a little
    t = y[17].tolist()
    text += (f"(assert (and (<= Y_0 {t[0] + 0.01!r}) "
             f"(>= (- Y_1 Y_2) {t[1] - t[2] - 0.01!r})))\n")
    prop = parse_vnnlib(text)
    verdict = verify(model, prop, timeout=20)
    assert verdict.result == "sat"
    x, yv = verdict.counterexample  # type: ignore[misc]
    assert prop.contains(x.unsqueeze(0)).item()
    with torch.no_grad():
        again = model(x.float().unsqueeze(0)).double()
    assert prop.is_unsafe(again).item()


def test_unsat_needs_every_disjunct_ruled_out() -> None:
    """A far-out constraint on one output is refuted; with an easy second disjunct it is sat."""
    model = nn.Sequential(nn.Linear(1, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model[0].bias.zero_()
    head = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n" \
           "(assert (<= X_0 1))\n(assert (>= X_0 0))\n"
    hard = parse_vnnlib(head + "(assert (>= Y_0 2))\n")  # y0 = x <= 1 < 2
    verdict = verify(model, hard, timeout=10)
    assert verdict.result == "unsat"
    both = parse_vnnlib(head + "(assert (or (>= Y_0 2) (<= Y_1 -0.5)))\n")  # y1 = -x
    verdict = verify(model, both, timeout=10)
    assert verdict.result == "sat" and verdict.counterexample[0].item() >= 0.5  # type: ignore[index]


def test_counterexample_on_the_edge_of_the_box() -> None:
    """The only unsafe inputs are the box's upper corner (as float32 can hold it)."""
    model = nn.Sequential(nn.Linear(2, 1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0]]))
        model[0].bias.zero_()
    edge = torch.nextafter(torch.tensor(0.85, dtype=torch.float32), torch.tensor(0.0)).item()
    assert edge < 0.85 < torch.tensor(0.85, dtype=torch.float32).item()
    text = ("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
            "(assert (>= X_0 0.1))\n(assert (<= X_0 0.85))\n"
            "(assert (>= X_1 0))\n(assert (<= X_1 0))\n"
            f"(assert (>= Y_0 {edge!r}))\n")  # y = x_0 + 0 exactly in float32
    prop = parse_vnnlib(text)
    verdict = verify(model, prop, timeout=10)
    assert verdict.result == "sat"
    assert verdict.counterexample[0].tolist() == [edge, 0.0]  # type: ignore[index]


def test_timeout_is_reported() -> None:
    model = mlp()
    x = torch.full((1, 1, 4, 4), 0.5)
    label = int(model(x).argmax())
    prop = parse_vnnlib(robustness_vnnlib(x, label, 4, 1e-3))
    verdict = verify(model, prop, timeout=1e-4, input_shape=(1, 4, 4))
    assert verdict.result == "timeout" and verdict.method is None


def test_milp_decides_what_relaxations_can_not() -> None:
    model = mlp()
    g = torch.Generator().manual_seed(9)
    x = torch.rand(1, 1, 4, 4, generator=g)
    label = int(model(x).argmax())
    prop = parse_vnnlib(robustness_vnnlib(x, label, 4, 2e-3))
    verdict = verify(model, prop, timeout=60, methods=(), use_milp=True, use_bab=False,
                     input_shape=(1, 4, 4))
    assert verdict.result in ("unsat", "sat")
    assert verdict.method == ("milp" if verdict.result == "unsat" else "attack")
    # with branch and bound first, the MILP only runs where it left something open
    searched = verify(model, prop, timeout=60, methods=(), use_milp=True, input_shape=(1, 4, 4))
    assert searched.result == verdict.result
    assert searched.method in ("bab", "milp", "attack")


def test_bad_arguments() -> None:
    model = mlp()
    prop = parse_vnnlib(robustness_vnnlib(torch.zeros(1, 1, 4, 4), 0, 4, 0.1))
    with pytest.raises(SpecError, match="timeout"):
        verify(model, prop, timeout=0, input_shape=(1, 4, 4))
    with pytest.raises(UnknownNameError, match="did you mean 'alpha-crown'"):
        verify(model, prop, timeout=1, methods=("alpha_crown",), input_shape=(1, 4, 4))
    with pytest.raises(SpecError, match="16 inputs"):
        verify(model, prop, timeout=1, input_shape=(1, 3, 3))
    small = parse_vnnlib(robustness_vnnlib(torch.zeros(1, 1, 4, 4), 0, 6, 0.1))
    with pytest.raises(SpecError, match="declares 6 outputs"):
        verify(model, small, timeout=1, input_shape=(1, 4, 4))


# ---- files --------------------------------------------------------------------------------------


def test_result_file_format() -> None:
    model = nn.Sequential(nn.Linear(2, 2)).eval()
    text = ("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
            "(declare-const Y_1 Real)\n(assert (<= X_0 1))\n(assert (>= X_0 0.5))\n"
            "(assert (<= X_1 0.25))\n(assert (>= X_1 0.25))\n")  # no output constraint: all unsafe
    prop = parse_vnnlib(text)
    verdict = verify(model, prop, timeout=10)
    assert verdict.result == "sat"
    lines = format_result(verdict).splitlines()
    assert lines[0] == "sat" and lines[1].startswith("((X_0 ") and lines[-1].endswith("))")
    values = {}
    for line in lines[1:]:
        name, value = line.strip(" ()").split()
        values[name] = float(value)
    x, y = verdict.counterexample  # type: ignore[misc]
    assert [values["X_0"], values["X_1"]] == x.tolist() and values["X_1"] == 0.25
    assert [values["Y_0"], values["Y_1"]] == y.tolist()
    assert format_result(verdict.__class__("unsat", None, "crown", 1.0)) == "unsat\n"


def test_verify_files_errors_name_the_line_or_node(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], name="probabilities")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    bad_net = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph), str(bad_net))
    good_net = tmp_path / "good.onnx"
    good_net.write_bytes(export_bytes(mlp(), torch.rand(1, 1, 4, 4)))
    prop = tmp_path / "p.vnnlib"
    prop.write_text(robustness_vnnlib(torch.zeros(1, 1, 4, 4), 0, 4, 0.1))
    with pytest.raises(UnsupportedLayerError, match=r"'probabilities' \(op Softmax"):
        verify_files(bad_net, prop, timeout=5)
    broken = tmp_path / "broken.vnnlib"
    broken.write_text("\n".join(prop.read_text().splitlines()[:-3]) + "\n")  # X_15 loses a bound
    with pytest.raises(SpecError, match=r"broken.vnnlib:16: X_15 has no lower bound"):
        verify_files(good_net, broken, timeout=5)
    wide = tmp_path / "wide.vnnlib"
    wide.write_text(robustness_vnnlib(torch.zeros(1, 1, 4, 4), 0, 5, 0.1))
    with pytest.raises(SpecError, match=r"wide.vnnlib:21: Y_4 is out of range"):
        verify_files(good_net, wide, timeout=5)


def make_benchmark(root: Path) -> tuple[Path, list[str]]:
    """A VNN-COMP style folder: onnx/, vnnlib/ (one gzipped), instances.csv."""
    (root / "onnx").mkdir(parents=True)
    (root / "vnnlib").mkdir()
    model = mlp()
    (root / "onnx" / "mlp.onnx").write_bytes(export_bytes(model, torch.rand(1, 1, 4, 4)))
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    label = int(model(x).argmax())
    (root / "vnnlib" / "robust.vnnlib").write_text(robustness_vnnlib(x, label, 4, 1e-3))
    with gzip.open(root / "vnnlib" / "wide.vnnlib.gz", "wt") as f:
        f.write(robustness_vnnlib(x, label, 4, 0.5))
    (root / "instances.csv").write_text("onnx/mlp.onnx,vnnlib/robust.vnnlib,30\n"
                                        "onnx/mlp.onnx,vnnlib/wide.vnnlib,30\n")
    return root / "instances.csv", ["unsat", "sat"]


def test_run_instances_writes_and_resumes(tmp_path: Path) -> None:
    csv_path, expected = make_benchmark(tmp_path / "bench")
    assert [i.vnnlib_path.name for i in read_instances(csv_path)] == ["robust.vnnlib",
                                                                        "wide.vnnlib.gz"]
    out = tmp_path / "results.csv"
    seen: list[str] = []
    rows = run_instances(csv_path, out, on_result=lambda r: seen.append(r.result))
    assert [r.result for r in rows] == expected == seen
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == RESULT_COLUMNS
    assert [r["result"] for r in table] == expected and table[1]["method"] == "attack"
    # resume: nothing runs again; dropping a row runs only that one
    seen.clear()
    run_instances(csv_path, out, on_result=lambda r: seen.append(r.vnnlib))
    assert seen == []
    out.write_text(out.read_text().splitlines()[0] + "\n" + out.read_text().splitlines()[1] + "\n")
    run_instances(csv_path, out, on_result=lambda r: seen.append(r.vnnlib))
    assert seen == ["vnnlib/wide.vnnlib"]


def test_instances_errors(tmp_path: Path) -> None:
    (tmp_path / "instances.csv").write_text("net.onnx,prop.vnnlib,10\n")
    with pytest.raises(SpecError, match=r"instances.csv:1: file not found"):
        read_instances(tmp_path / "instances.csv")
    (tmp_path / "instances.csv").write_text("a,b\n")
    with pytest.raises(SpecError, match=r"instances.csv:1: expected 'onnx, vnnlib, timeout'"):
        read_instances(tmp_path / "instances.csv")


def test_read_vnnlib_with_network_sizes(tmp_path: Path) -> None:
    path = tmp_path / "p.vnnlib"
    path.write_text(robustness_vnnlib(torch.zeros(1, 1, 2, 2), 1, 3, 0.1))
    prop = read_vnnlib(path, num_inputs=4, num_outputs=3)
    lo, hi = prop.input_box((1, 2, 2))
    assert lo.shape == (1, 1, 2, 2) and torch.all(hi - lo > 0)
