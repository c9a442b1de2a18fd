from __future__ import annotations

import json
import logging
import subprocess
import sys

import click
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


def test_every_subcommand_help_works_without_configuration() -> None:
    """`--help` anywhere must work on a fresh machine with no server, key or env configured."""
    runner = CliRunner(env={"SEALTORCH_KEYSERVER_URL": None})

    def walk(command: click.Command, path: list[str]) -> None:
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output
        if isinstance(command, click.Group):
            ctx = click.Context(command)
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                walk(sub, [*path, name])

    walk(cli, [])


def test_admin_without_a_server_says_how_to_give_one() -> None:
    result = CliRunner(env={"SEALTORCH_KEYSERVER_URL": None}).invoke(
        cli, ["admin", "model", "list"]
    )
    assert result.exit_code == 2
    assert "--server https://HOST:PORT" in result.output
    assert "SEALTORCH_KEYSERVER_URL" in result.output
