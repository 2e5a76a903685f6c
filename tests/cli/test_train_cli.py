"""``certify train``, ``certify eval`` and ``certify info`` through click's CliRunner.

Torch runs single-threaded here: on a small shared machine that is many times faster for
digits-sized models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import Result

from tests.cli.cli_helpers import one_line_error, run, single_thread  # noqa: F401


@pytest.fixture(scope="module")
def mlp_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """`certify train --dataset digits --arch mlp` with its default recipe."""
    out = tmp_path_factory.mktemp("train") / "mlp.pt"
    result = run("train", "--dataset", "digits", "--arch", "mlp", "-o", out, "--quiet")
    return out, result


def test_train_mlp_on_digits_reaches_95_percent(mlp_digits):  # type: ignore[no-untyped-def]
    out, result = mlp_digits
    assert result.exit_code == 0, result.output
    acc = float(re.search(r"test accuracy ([\d.]+)%", result.stdout).group(1))
    assert acc >= 95.0
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["metrics"]["test_accuracy"] == pytest.approx(acc / 100, abs=5e-5)
    assert meta["training"]["epochs"] == 30 and meta["training"]["optimizer"] == "adam"
    assert not out.with_name("mlp.pt.partial").exists()


def test_eval_and_info(mlp_digits):  # type: ignore[no-untyped-def]
    out, _ = mlp_digits
    meta = torch.load(out, weights_only=True)["meta"]
    result = run("eval", out)
    assert result.exit_code == 0, result.output
    assert f"{100 * meta['metrics']['test_accuracy']:.2f}%" in result.stdout
    assert "/450) on digits/test" in result.stdout
    data = json.loads(run("eval", out, "--dataset", "digits", "--split", "train", "--json").stdout)
    assert data["total"] == 1347 and 0.9 <= data["accuracy"] <= 1.0
    info = run("info", out)
    assert info.exit_code == 0 and "mlp" in info.stdout and "training.command: train" in info.stdout


def test_same_seed_same_weights_and_resume(tmp_path):  # type: ignore[no-untyped-def]
    args = ["train", "--dataset", "digits", "--arch", "scn-4-4", "--epochs", "3", "-q"]
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    assert run(*args, "--seed", "5", "-o", a).exit_code == 0
    assert run(*args, "--seed", "5", "-o", b).exit_code == 0
    assert run(*args, "--seed", "6", "-o", c).exit_code == 0
    sa, sb, sc = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)

    # An interrupted run (1 of 3 epochs, state kept beside the output) resumed by the CLI.
    from certify.data import get_dataset_info, load_dataset
    from certify.train.loops import TrainConfig, partial_path, train
    from certify.train.standard import init_model

    resumed = tmp_path / "r.pt"
    info = get_dataset_info("digits")
    model, _, _ = init_model("scn-4-4", info.input_shape, 10, mean=info.mean, std=info.std,
                             seed=5)

    def stop(record):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, load_dataset("digits", "train"), None, TrainConfig(epochs=3, seed=5),
              state_path=partial_path(resumed), tag="train", on_epoch=stop, quiet=True)
    result = run(*args, "--seed", "5", "-o", resumed, "--resume")
    assert result.exit_code == 0, result.output
    sr = torch.load(resumed, weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sr[k]) for k in sa)
    assert not partial_path(resumed).exists()


def test_temperature_training_is_recorded(tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "t.pt"
    result = run("train", "--dataset", "digits", "--arch", "mlp-32", "--epochs", "1",
                 "--temperature", "20", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert torch.load(out, weights_only=True)["meta"]["training"]["temperature"] == 20.0


@pytest.mark.parametrize("command", ["train", "eval", "info", "distill", "prune"])
def test_help(command):  # type: ignore[no-untyped-def]
    result = run(command, "--help")
    assert result.exit_code == 0 and "Example" in result.output


def test_eval_on_dataset_of_other_shape(mlp_digits):  # type: ignore[no-untyped-def]
    out, _ = mlp_digits
    line = one_line_error(run("eval", out, "--dataset", "svhn"))
    assert line == ("Error: mlp.pt expects input (1, 8, 8) (digits) but svhn has (3, 32, 32); "
                    "pick --dataset digits.")


def test_unknown_arch_suggests_and_leaves_no_file(tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "x.pt"
    line = one_line_error(run("train", "--dataset", "digits", "--arch", "scnn", "-o", out))
    assert "unknown architecture 'scnn'; did you mean 'scn'?" in line
    assert not any(tmp_path.iterdir())


def test_missing_data_files(tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "x.pt"
    line = one_line_error(run("train", "--dataset", "svhn", "--arch", "mlp", "--data-dir",
                              tmp_path / "nowhere", "-o", out))
    assert "not found" in line and "nowhere" in line
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"plain text"])
def test_corrupt_checkpoint(tmp_path, content):  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    assert "bad.pt" in one_line_error(run("eval", bad))


def test_bad_training_options(tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "x.pt"
    result = run("train", "--dataset", "digits", "--arch", "mlp", "--epochs", "0", "-o", out)
    assert result.exit_code == 2 and not out.exists()
    if not torch.cuda.is_available():
        line = one_line_error(run("train", "--dataset", "digits", "--arch", "mlp", "--device",
                                  "cuda", "-o", out))
        assert "no CUDA GPU" in line and not out.exists()


def test_library_errors_name_arguments_and_the_cli_names_flags():  # type: ignore[no-untyped-def]
    import click

    from certify.cli import main
    from certify.errors import NAME, SpecError

    e = SpecError("{epochs} must be >= 1; or {resume}", epochs=0, resume=NAME)
    assert str(e) == "epochs=0 must be >= 1; or resume"
    train = main.get_command(click.Context(main), "train")
    with click.Context(train):
        assert str(e) == "--epochs 0 must be >= 1; or --resume"


def test_robust_choices_come_from_the_registry():  # type: ignore[no-untyped-def]
    from certify.cli.train import ROBUST_CHOICES
    from certify.train.robust import ROBUST_LOSSES

    assert list(ROBUST_CHOICES) == list(ROBUST_LOSSES)
    line = run("train", "--dataset", "digits", "--arch", "mlp", "--robust", "nope").stderr
    assert all(name in line for name in ROBUST_LOSSES)
