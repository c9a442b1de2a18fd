from __future__ import annotations

import json
import logging
import subprocess
import sys

from click.testing import CliRunner

from sealtorch.cli import cli
from sealtorch.cli._logging import JsonFormatter


def test_help_lists_sections_and_examples() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "Model owner" in result.output
    assert "sealtorch demo" in result.output


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("sealtorch, version ")


def test_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2
    assert "No such command" in result.output


def test_console_script_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sealtorch", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Usage: sealtorch" in done.stdout


def test_json_log_lines_carry_extra_fields() -> None:
    record = logging.LogRecord(
        "sealtorch.x", logging.INFO, __file__, 1, "granted %s", ("m1",), None
    )
    record.model_id = "m1"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "granted m1"
    assert line["model_id"] == "m1"
    assert line["level"] == "info"
