"""Every setting is checked whatever overrides it (issue 14, item 4).

Before: a misspelled ``SEALTORCH_KEYSERVER_*`` variable was ignored silently (the server ran on
its default), and ``--port`` hid an invalid ``port`` in ``keyserver.toml``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sealtorch.errors import ConfigError
from sealtorch.keyserver.settings import CONFIG_FILE, load_settings, render_config


def _data_dir(tmp_path: Path, text: str | None = None) -> Path:
    data = tmp_path / "ks"
    data.mkdir()
    (data / CONFIG_FILE).write_text(text if text is not None else render_config())
    return data


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("SEALTORCH_KEYSERVER_DATABSE_URL", "SEALTORCH_KEYSERVER_DATABASE_URL"),
        ("SEALTORCH_KEYSEVER_DATABASE_URL", "SEALTORCH_KEYSERVER_DATABASE_URL"),
        ("SEALTORCH_KEYSERVER_SERVER_PROT", "SEALTORCH_KEYSERVER_SERVER_PORT"),
    ],
)
def test_a_misspelled_variable_is_refused_with_a_suggestion(
    tmp_path: Path, variable: str, suggestion: str
) -> None:
    data = _data_dir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_settings(data, environ={variable: "postgresql+psycopg://u@h/db"})
    message = str(info.value)
    assert "\n" not in message
    assert f"unknown environment variable {variable}" in message
    assert f"did you mean {suggestion}?" in message


def test_an_unknown_variable_under_the_prefix_is_refused_even_without_a_near_name(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="unknown environment variable SEALTORCH_KEYSERVER_X"):
        load_settings(_data_dir(tmp_path), environ={"SEALTORCH_KEYSERVER_X": "1"})


def test_known_and_unrelated_variables_are_accepted(tmp_path: Path) -> None:
    settings = load_settings(
        _data_dir(tmp_path),
        environ={
            "SEALTORCH_KEYSERVER_SERVER_PORT": "9443",
            "SEALTORCH_KEYSERVER_URL": "https://ks:8443",  # the admin CLI's
            "SEALTORCH_PKCS11_PIN": "1234",
            "SEALTORCH_PG_BINDIR": "/usr/lib/postgresql/16/bin",  # not a sealtorch setting
            "HOME": "/root",
        },
    )
    assert settings.port == 9443


def test_an_option_does_not_hide_an_invalid_port_in_the_file(tmp_path: Path) -> None:
    text = render_config().replace("port = 8443", 'port = "eighty"')
    assert 'port = "eighty"' in text
    data = _data_dir(tmp_path, text)
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_settings(data, environ={}, overrides={"server": {"port": 9000}})


def test_an_invalid_option_is_named_as_an_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the options has invalid settings"):
        load_settings(_data_dir(tmp_path), environ={}, overrides={"server": {"workers": "many"}})


def test_serve_refuses_a_misspelled_variable_in_one_line(tmp_path: Path) -> None:
    data = _data_dir(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "sealtorch", "keyserver", "serve", str(data), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "SEALTORCH_KEYSERVER_DATABASE_ULR": "sqlite:///x.db"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "did you mean SEALTORCH_KEYSERVER_DATABASE_URL?" in lines[0]
