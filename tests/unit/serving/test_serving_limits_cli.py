"""`sealtorch serve` request limits and read timeouts: options, defaults, and their checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from click.testing import CliRunner

import sealtorch
import sealtorch.serving.server as server_module
from sealtorch._listen import ReadTimeouts
from sealtorch.cli import cli
from sealtorch.errors import ConfigError
from sealtorch.keys import write_key_file
from sealtorch.serving.jsondata import DEFAULT_MAX_JSON_ELEMENTS
from sealtorch.serving.server import ServerSettings


class CapturedServer:
    """Stands in for InferenceServer: keeps the settings instead of serving."""

    settings: ClassVar[list[ServerSettings]] = []

    def __init__(self, settings: ServerSettings, sources: Any, **callbacks: Any) -> None:
        del sources, callbacks
        self.settings.append(settings)

    def run(self) -> None:
        return None


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    key_path = tmp_path / "m.key"
    sealtorch.encrypt_model(
        {"w": torch.zeros(2)}, tmp_path / "m.sealed", model_id="m", key=write_key_file(key_path)
    )
    CapturedServer.settings = []
    monkeypatch.setattr(server_module, "InferenceServer", CapturedServer)
    return ["serve", str(tmp_path / "m.sealed"), "--key-file", str(key_path)]


def test_defaults(served: list[str]) -> None:
    result = CliRunner().invoke(cli, served)
    assert result.exit_code == 0, result.output
    (settings,) = CapturedServer.settings
    assert settings.max_json_elements == DEFAULT_MAX_JSON_ELEMENTS
    assert settings.read_timeouts == ReadTimeouts(header=10.0, body=30.0, keep_alive=5.0)


def test_options_reach_the_server(served: list[str]) -> None:
    options = ["--max-json-elements", "1000", "--header-timeout", "2.5"]
    options += ["--body-timeout", "7", "--keep-alive-timeout", "60"]
    result = CliRunner().invoke(cli, [*served, *options])
    assert result.exit_code == 0, result.output
    (settings,) = CapturedServer.settings
    assert settings.max_json_elements == 1000
    assert settings.read_timeouts == ReadTimeouts(header=2.5, body=7.0, keep_alive=60.0)


@pytest.mark.parametrize(
    "option",
    [
        ["--max-json-elements", "0"],
        ["--header-timeout", "0"],
        ["--body-timeout", "-1"],
        ["--keep-alive-timeout", "3601"],
    ],
)
def test_out_of_range_options_are_usage_errors(served: list[str], option: list[str]) -> None:
    result = CliRunner().invoke(cli, [*served, *option])
    assert result.exit_code == 2
    assert option[0] in result.output
    assert CapturedServer.settings == []


def test_help_names_the_limits() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"])
    for text in ("--max-json-elements N", "--header-timeout SECONDS", "binary tensor data"):
        assert text in result.output, text


def test_settings_check_the_json_limit() -> None:
    with pytest.raises(ConfigError, match="--max-json-elements"):
        ServerSettings(max_json_elements=0)
