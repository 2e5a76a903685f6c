"""Every command against every kind of bad input: one ``Error:`` line, a non-zero exit.

The table crosses the commands that read a model or write an output with the bad inputs a
hostile tester tries: a missing file, a folder, an empty, truncated or random file, a pickle
that carries code, NaN weights, a model for another dataset, an ``-o`` under a regular file or
in a read-only place, and a FIFO as ``-o``. The models are built once for the module.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import Result
from torch import nn

from tests.cli.cli_helpers import run
from tests.onnx.onnx_helpers import robustness_vnnlib

# a folder no user (root included) can create anything in: sysfs refuses mkdir with EPERM
READ_ONLY = Path("/sys/certify-cannot-write-here")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good digits checkpoint, a VNNLIB property for it, and every kind of bad model file."""
    from certify.checkpoint import ModelMeta, save_checkpoint
    from certify.nets import arch_kwargs_of, create_arch

    root = tmp_path_factory.mktemp("bad-inputs")
    torch.manual_seed(0)
    model = create_arch("mlp-8", (1, 8, 8), 10, mean=[0.3], std=[0.4]).eval()
    meta = ModelMeta("mlp", arch_kwargs_of(model), "digits", (1, 8, 8), 10, (0.3,), (0.4,))
    good = root / "good.pt"
    save_checkpoint(good, model, meta)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    spec = root / "prop.vnnlib"
    spec.write_text(robustness_vnnlib(x, int(model(x).argmax()), 10, 0.01))

    data = good.read_bytes()
    (root / "empty.pt").write_bytes(b"")
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    torch.save({"meta": {}, "state_dict": {}, "hook": os.getcwd}, root / "pickle.pt")
    with torch.no_grad():
        broken = create_arch("mlp-8", (1, 8, 8), 10, mean=[0.3], std=[0.4]).eval()
        broken.load_state_dict(model.state_dict())
        next(broken.parameters())[0, 0] = float("nan")
    save_checkpoint(root / "nan.pt", broken, meta)
    (root / "folder.pt").mkdir()
    (root / "a-file").write_text("in the way")
    os.mkfifo(root / "fifo")
    return {"good": good, "spec": spec, "root": root}


# command -> (argument list given MODEL and OUT; whether OUT is a folder, or None: no -o)
Args = Callable[[Path, Path, Path], list[object]]
COMMANDS: dict[str, tuple[Args, bool | None]] = {
    "info": (lambda m, o, s: ["info", m], None),
    "eval": (lambda m, o, s: ["eval", m], None),
    "area": (lambda m, o, s: ["area", m, "--n", 2, "--method", "ibp", "--attack", "none",
                              "-q", "-o", o], True),
    "attack": (lambda m, o, s: ["attack", m, "--dataset", "digits", "--n", 2, "--eps",
                                "0,0.1", "--steps", 2, "-q", "-o", o], True),
    "compare": (lambda m, o, s: ["compare", m, "--dataset", "digits", "--n", 2, "--method",
                                 "ibp", "-q", "-o", o], True),
    "verify": (lambda m, o, s: ["verify", m, s, "--timeout", 5, "--results", o], False),
    "distill": (lambda m, o, s: ["distill", m, "--student", "mlp-8", "--epochs", 1, "-q",
                                 "-o", o], False),
    "prune": (lambda m, o, s: ["prune", m, "--ratio", 0.5, "-q", "-o", o], False),
    "retrain": (lambda m, o, s: ["retrain", m, "--robust", "ibp", "--eps", 0.01, "--epochs", 1,
                                 "--eval-samples", 0, "-q", "-o", o], False),
    "train": (lambda m, o, s: ["train", "--dataset", "digits", "--arch", "mlp-8", "--epochs",
                               1, "-q", "-o", o], False),
}
READS_MODEL = [c for c in COMMANDS if c != "train"]
WRITES = [c for c, (_, folder) in COMMANDS.items() if folder is not None]
TAKES_DATASET = ["eval", "area", "attack", "compare", "distill", "retrain"]

# bad model file -> what the one line must say
MODEL_CASES = {
    "missing": ("missing.pt", "not found"),
    "directory": ("folder.pt", "directory"),
    "empty": ("empty.pt", "not a readable checkpoint"),
    "truncated": ("truncated.pt", "not a readable checkpoint"),
    "random bytes": ("random.pt", "not a readable checkpoint"),
    "pickle with code": ("pickle.pt", "pickled code"),
    "NaN weights": ("nan.pt", "NaN"),
}
# bad -o -> what the one line must say
OUT_CASES = {
    "unwritable -o (under a file)": ("a-file/out", "a-file is a file, not a folder"),
    "read-only -o": (str(READ_ONLY / "out"), "read-only"),
    "FIFO -o": ("fifo", "fifo"),
}


def one_error_line(result: Result) -> str:
    """A non-zero exit, no traceback, and exactly one ``Error: ...`` line on stderr."""
    assert result.exit_code in (1, 2), (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def _model_path(files: dict[str, Path], name: str) -> Path:
    return files["root"] / name


@pytest.mark.parametrize("case", list(MODEL_CASES))
@pytest.mark.parametrize("command", READS_MODEL)
def test_bad_model_file(files, tmp_path, command: str, case: str) -> None:
    name, says = MODEL_CASES[case]
    args, folder = COMMANDS[command]
    out = tmp_path / ("out" if folder else "out.pt")
    line = one_error_line(run(*args(_model_path(files, name), out, files["spec"])))
    assert says in line
    assert not out.exists() or (out.is_dir() and not any(out.iterdir()))  # nothing written


@pytest.mark.parametrize("command", TAKES_DATASET)
def test_model_for_another_dataset(files, tmp_path, command: str) -> None:
    args, folder = COMMANDS[command]
    argv = [str(a) for a in args(files["good"], tmp_path / "out", files["spec"])]
    if "--dataset" in argv:
        argv[argv.index("--dataset") + 1] = "mnist"
    else:
        argv[2:2] = ["--dataset", "mnist"]
    line = one_error_line(run(*argv))
    assert "mnist" in line and "(1, 8, 8)" in line  # names the mismatch


@pytest.mark.parametrize("case", list(OUT_CASES))
@pytest.mark.parametrize("command", WRITES)
def test_bad_output(files, command: str, case: str) -> None:
    where, says = OUT_CASES[case]
    out = Path(where) if Path(where).is_absolute() else files["root"] / where
    args, folder = COMMANDS[command]
    line = one_error_line(run(*args(files["good"], out, files["spec"])))
    assert says in line
    assert (files["root"] / "fifo").is_fifo()  # never replaced by a regular file
    assert (files["root"] / "a-file").read_text() == "in the way"


def test_good_inputs_pass_the_same_commands(files, tmp_path) -> None:
    """The table's argument lists are right: with good inputs the quick commands succeed."""
    for command in ("info", "eval", "area", "attack"):
        args, folder = COMMANDS[command]
        result = run(*args(files["good"], tmp_path / command, files["spec"]))
        assert result.exit_code == 0, (command, result.output)


def test_atomic_writer_refuses_fifo_and_device(tmp_path) -> None:
    """Only a regular file (or nothing) is replaced: a FIFO or a link to a device stays."""
    from certify._io import atomic_write_text
    from certify.errors import OutputError

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    device = tmp_path / "null"
    device.symlink_to("/dev/null")
    for path, kind in ((fifo, "FIFO"), (device, "character device"), (tmp_path, "folder")):
        with pytest.raises(OutputError, match=kind):
            atomic_write_text(path, "x")
    assert fifo.is_fifo() and device.is_symlink() and Path("/dev/null").is_char_device()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null", "pipe"]  # no temporaries
    regular = tmp_path / "file.txt"
    regular.write_text("old")
    atomic_write_text(regular, "new")
    assert regular.read_text() == "new"


def test_bad_option_is_one_line_with_exit_code_2(files) -> None:
    result = run("area", files["good"], "--method", "alpha_crown")
    line = one_error_line(result)
    assert result.exit_code == 2 and "did you mean 'alpha-crown'" in line and "--help" in line


def test_non_finite_logits_are_refused(files, tmp_path) -> None:
    """Finite weights whose logits overflow float32: refused, not certified."""
    from certify.checkpoint import ModelMeta, save_checkpoint
    from certify.nets import arch_kwargs_of, create_arch

    model = create_arch("mlp-8", (1, 8, 8), 10, mean=[0.3], std=[0.4]).eval()
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.fill_(1e30)
    meta = ModelMeta("mlp", arch_kwargs_of(model), "digits", (1, 8, 8), 10, (0.3,), (0.4,))
    save_checkpoint(tmp_path / "huge.pt", model, meta)
    line = one_error_line(run("area", tmp_path / "huge.pt", "--n", 2, "--attack", "none",
                              "-q", "-o", tmp_path / "run"))
    assert "infinite logits" in line and "float64" in line
