from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
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
        # an example continued with a lone backslash in the source joins its lines in the help
        joined = [
            line
            for line in result.output.splitlines()
            if "sealtorch " in line and re.search(r"\S {4,}--\w", line)
        ]
        assert not joined, (path, joined)
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


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    ("before", "after", "level"),
    [
        ([], [], logging.WARNING),
        (["-v"], [], logging.INFO),
        ([], ["-v"], logging.INFO),
        ([], ["-vv"], logging.DEBUG),
        (["-v"], ["-v"], logging.DEBUG),
        ([], ["-q"], logging.ERROR),
        (["-v"], ["--quiet"], logging.ERROR),
    ],
)
def test_verbosity_options_work_before_and_after_the_command(
    tmp_path: Path, before: list[str], after: list[str], level: int
) -> None:
    args = [*before, "keygen", "-o", str(tmp_path / "m.key"), *after]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert logging.getLogger().level == level
    assert ("wrote a new" in result.output) is (level != logging.ERROR)


@pytest.mark.usefixtures("restore_logging")
def test_quiet_after_a_nested_command(tmp_path: Path) -> None:
    """Groups pass -q/-v on too: `sealtorch admin model list -q` is `sealtorch -q admin ...`."""
    result = CliRunner(env={"SEALTORCH_KEYSERVER_URL": None}).invoke(
        cli, ["admin", "model", "list", "-q"]
    )
    assert "No such option" not in result.output
    assert logging.getLogger().level == logging.ERROR
