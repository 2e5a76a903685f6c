"""The README's digits examples, run as written, and the numbers quoted next to them.

Each command is looked up verbatim in README.md (so the README cannot drift from what is run)
and run in a fresh folder through the CLI; the numbers the README quotes beside it are checked
against this run. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from certify.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def readme_command(line: str) -> list[str]:
    """`line` as it appears in the README (a code line), split into CLI arguments."""
    assert any(ln.split("  #")[0].rstrip() == line for ln in README.splitlines()), \
        f"not in README.md: {line}"
    args = shlex.split(line)
    assert args[0] == "certify"
    return args[1:]


def invoke(line: str) -> str:
    result = CliRunner().invoke(main, readme_command(line))
    assert result.exit_code == 0, result.output
    return result.stdout


def python_example() -> str:
    """The library example: the one Python block that computes certified radii."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S)
              if "certified_radii(" in b]
    assert len(blocks) == 1
    return blocks[0]


def test_quick_model_eval_and_library_example(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = invoke("certify train --dataset digits --arch mlp -o models/mlp.pt")
    accuracy = float(re.search(r"test accuracy ([0-9.]+)%", out).group(1))
    assert round(accuracy, 1) == 96.4       # README: "96.4% in seconds"
    assert "# 96.4% in seconds" in README
    assert "%" in invoke("certify eval  models/mlp.pt --dataset digits")
    scope: dict[str, object] = {}
    exec(compile(python_example(), "README.md", "exec"), scope)   # noqa: S102 - our README
    radii = scope["radii"]
    assert radii.shape == (8,) and bool((radii >= 0).all())


def test_exact_radii_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    invoke("certify train --dataset digits --arch mlp-32-16 -o models/mlp-32-16.pt")
    invoke("certify area models/mlp-32-16.pt --dataset digits --n 10 --method crown --exact "
           "--eps-max 0.2")
    (run,) = (tmp_path / "reports" / "area").iterdir()
    summary = json.loads((run / "results.json").read_text())["summary"]["crown"]
    assert round(summary["mean_exact_ratio"], 2) == 0.82   # README: "0.82 here"
    assert "0.82 here" in README


def test_robust_training_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = invoke("certify train --dataset digits --arch mlp-64-64 --robust wong-kolter --eps 0.1 "
                 "--epochs 20 --eval-samples 450 -o models/mlp-wk.pt")
    certified = float(re.search(r"certified \(wong-kolter\) ([0-9.]+)%", out).group(1))
    assert round(certified, 1) == 69.6               # README: "69.6% with `wong-kolter`"
    assert "69.6% with `wong-kolter`" in README
