"""Key server settings: file, environment and option precedence; validation; init refusals."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from sealtorch._listen import ReadTimeouts
from sealtorch.cli import cli
from sealtorch.errors import ConfigError
from sealtorch.keyserver.masterkey import FileMasterKeyConfig, Pkcs11MasterKeyConfig
from sealtorch.keyserver.settings import (
    CONFIG_FILE,
    config_env_names,
    load_settings,
    render_config,
)
from sealtorch.keyserver.signingkey import FileSigningKeyConfig, Pkcs11SigningKeyConfig


def _write(directory: Path, text: str) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / CONFIG_FILE).write_text(text)
    return directory


def test_the_rendered_default_config_loads_with_resolved_paths(tmp_path: Path) -> None:
    data = _write(tmp_path / "ks", render_config(sim_trusted_keys=("ed25519:" + "ab" * 32,)))
    settings = load_settings(data, environ={})
    assert settings.database_url == f"sqlite:///{data / 'keyserver.db'}"
    assert settings.master_key == FileMasterKeyConfig(path=data / "master.key")
    assert settings.signing_key == FileSigningKeyConfig(path=data / "release-signing.key")
    assert settings.describe()["signing_key"] == "file"
    assert settings.tls_cert == data / "tls" / "server.crt"
    assert settings.sim_trusted_keys == ("ed25519:" + "ab" * 32,)
    assert settings.nonce_ttl == timedelta(seconds=60)
    assert settings.sqlite_synchronous == "FULL"
    assert settings.store_options() == {"busy_timeout": 10.0, "sqlite_synchronous": "FULL"}


def test_options_beat_environment_beat_file(tmp_path: Path) -> None:
    data = _write(
        tmp_path / "ks", "[server]\nport = 1111\nworkers = 2\n[release]\nlease_seconds = 5\n"
    )
    environ = {
        "SEALTORCH_KEYSERVER_SERVER_PORT": "2222",
        "SEALTORCH_KEYSERVER_DATABASE_URL": "postgresql+psycopg://ks:secret@db/keys",
        "SEALTORCH_KEYSERVER_ATTESTATION_SIM_TRUSTED_KEYS": "ed25519:aa, ed25519:bb",
    }
    settings = load_settings(data, environ=environ, overrides={"server": {"port": 3333}})
    assert settings.port == 3333
    assert settings.workers == 2
    assert settings.lease_duration == timedelta(seconds=5)
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.sim_trusted_keys == ("ed25519:aa", "ed25519:bb")
    assert settings.sources["server.port"] == "option"
    assert settings.sources["database.url"] == "env:SEALTORCH_KEYSERVER_DATABASE_URL"
    assert settings.sources["server.workers"] == "file"
    assert "secret" not in str(settings.describe())
    assert "pool_size" in settings.store_options()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 1\n", "server.prot: unknown setting"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("[server]\nport = 'eighty'\n", "server.port"),
        ("[database]\nsqlite_synchronous = 'OFF'\n", "sqlite_synchronous"),
        ("[master_key]\nkind = 'pkcs11'\n", "token_label"),
        ("[signing_key]\nkind = 'pkcs11'\n", "signing_key.token_label"),
        ("[signing_key]\nkind = 'hsm'\n", "signing_key.kind"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_invalid_configs_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    data = _write(tmp_path / "ks", text)
    with pytest.raises(ConfigError, match=message):
        load_settings(data, environ={})


def test_a_missing_config_points_at_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="keyserver init"):
        load_settings(tmp_path, environ={})


def test_pkcs11_config_round_trips(tmp_path: Path) -> None:
    config = Pkcs11MasterKeyConfig(token_label="tok", key_label="mk", module="/lib/p11.so")
    data = _write(tmp_path / "ks", render_config(master_key=config, signing_key_label="rsk"))
    settings = load_settings(data, environ={})
    assert settings.master_key == config
    # the release-signing key lives in the same token, under its own label
    assert settings.signing_key == Pkcs11SigningKeyConfig(
        token_label="tok", key_label="rsk", module="/lib/p11.so"
    )
    assert settings.describe()["signing_key"] == "pkcs11:tok/rsk"
    moved = load_settings(
        data, environ={"SEALTORCH_KEYSERVER_SIGNING_KEY_KEY_LABEL": "rsk-2027"}
    ).signing_key
    assert isinstance(moved, Pkcs11SigningKeyConfig)
    assert moved.key_label == "rsk-2027"


def test_every_setting_has_an_environment_variable() -> None:
    names = config_env_names()
    assert names["SEALTORCH_KEYSERVER_DATABASE_URL"] == ("database", "url")
    assert names["SEALTORCH_KEYSERVER_RELEASE_MAX_REQUEST_BYTES"] == (
        "release",
        "max_request_bytes",
    )
    assert len(names) >= 25


def test_init_refuses_a_non_empty_directory_and_half_pkcs11_options(tmp_path: Path) -> None:
    (tmp_path / "ks").mkdir()
    (tmp_path / "ks" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["keyserver", "init", str(tmp_path / "ks")])
    assert result.exit_code == 2
    assert (tmp_path / "ks" / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(
        cli, ["keyserver", "init", str(tmp_path / "new"), "--token-label", "x"]
    )
    assert result.exit_code == 2
    assert "--pkcs11-module" in result.output
    assert not (tmp_path / "new").exists()
    result = CliRunner().invoke(
        cli, ["keyserver", "init", str(tmp_path / "new"), "--trust-sim-key", "nope"]
    )
    assert result.exit_code == 2
    assert not (tmp_path / "new").exists()


def test_init_prints_the_token_once_and_stores_only_its_digest(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["keyserver", "init", str(tmp_path / "ks")])
    assert result.exit_code == 0, result.output
    token = result.output.strip().splitlines()[-1]
    assert token.startswith("sta_")
    secret = token.split(".")[1].encode()
    assert secret not in (tmp_path / "ks" / "keyserver.db").read_bytes()
    assert token.encode() not in (tmp_path / "ks" / "keyserver.toml").read_bytes()


def test_service_layer_imports_no_web_framework() -> None:
    code = (
        "import sys, sealtorch.keyserver.service, sealtorch.client\n"
        "print(','.join(m for m in ('fastapi', 'starlette', 'uvicorn', 'sqlalchemy') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert out == ""


def test_read_timeouts_come_from_the_server_section(tmp_path: Path) -> None:
    data = _write(tmp_path / "ks", render_config())
    assert load_settings(data, environ={}).read_timeouts == ReadTimeouts(
        header=10.0, body=30.0, keep_alive=30.0
    )
    environ = {
        "SEALTORCH_KEYSERVER_SERVER_HEADER_TIMEOUT": "2",
        "SEALTORCH_KEYSERVER_SERVER_BODY_TIMEOUT": "3.5",
        "SEALTORCH_KEYSERVER_SERVER_KEEP_ALIVE_TIMEOUT": "60",
    }
    settings = load_settings(data, environ=environ)
    assert settings.read_timeouts == ReadTimeouts(header=2.0, body=3.5, keep_alive=60.0)
    with pytest.raises(ConfigError, match="keep_alive_timeout"):
        load_settings(data, environ={"SEALTORCH_KEYSERVER_SERVER_KEEP_ALIVE_TIMEOUT": "0"})
