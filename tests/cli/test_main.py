from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from certify.cli import COMMANDS, main


def test_every_registered_command_exists_and_has_help() -> None:
    runner = CliRunner()
    for name in COMMANDS:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, f"`certify {name} --help` failed: {result.output}"
        assert "Example" in result.output or "Usage" in result.output


def test_top_level_help_lists_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "area" in result.output or "info" in result.output


def test_info_prints_architecture_and_parameters(tiny_checkpoint: Path) -> None:
    result = CliRunner().invoke(main, ["info", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert "scn" in result.output and "parameters" in result.output


def test_info_json(tiny_checkpoint: Path) -> None:
    result = CliRunner().invoke(main, ["info", str(tiny_checkpoint), "--json"])
    data = json.loads(result.output)
    assert data["arch"] == "scn" and data["parameters"] > 0 and len(data["sha256"]) == 64


@pytest.mark.parametrize("content", [None, b"garbage", b"", b"junk", b"PK\x03\x04broken"])
def test_info_bad_files_one_line_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "m.pt"
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert "Traceback" not in result.output


def test_help_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from click.testing import CliRunner; from certify.cli import main; "
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "certify --help should stay fast: torch was imported"
