"""`sealtorch serve` options and the errors raised before anything listens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import sealtorch
from sealtorch.cli import cli
from sealtorch.errors import ConfigError, KeyReleaseError
from sealtorch.keys import write_key_file
from sealtorch.serving.server import InferenceServer, SealedModelSource, ServerSettings


@pytest.fixture
def sealed(tmp_path: Path) -> tuple[Path, Path]:
    key_path = tmp_path / "m.key"
    key = write_key_file(key_path)
    path = tmp_path / "m.sealed"
    sealtorch.encrypt_model({"w": torch.zeros(2)}, path, model_id="plain-sd", key=key)
    return path, key_path


def test_help_teaches_with_examples() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    for text in (
        "--keys URL",
        "--key-file",
        "--tee [sim|gramine|tdx|snp]",
        "--port",
        "--threads",
        "--name NAME",
        "unix:///run/sealtorch/keycache.sock",
        "classification",
        "listening on http://HOST:PORT",
        "SIGTERM",
        "DEVELOPMENT ONLY",
    ):
        assert text in result.output, text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "exactly one key source"),
        (["--key-file", "k", "--keys", "https://h:1"], "exactly one key source"),
        (
            ["--key-file", "k", "--name", "a", "--name", "b"],
            "--name was given 2 times for 1 models",
        ),
        (["--key-file", "k", "--tee", "sim"], "--keyserver-pubkey apply to --keys"),
        (["--key-file", "k", "--keyserver-pubkey", "x"], "--keyserver-pubkey apply to --keys"),
    ],
)
def test_usage_errors(sealed: tuple[Path, Path], extra: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["serve", str(sealed[0]), *extra])
    assert result.exit_code == 2
    assert message in result.output


def test_missing_model_file_is_a_config_error(tmp_path: Path, sealed: tuple[Path, Path]) -> None:
    result = CliRunner().invoke(
        cli, ["serve", str(tmp_path / "nope.sealed"), "--key-file", str(sealed[1])]
    )
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_a_file_that_is_not_sealed_is_refused_before_listening(tmp_path: Path) -> None:
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"PK\x03\x04 not a sealed file")
    key = tmp_path / "k.key"
    write_key_file(key)
    result = CliRunner().invoke(cli, ["serve", str(bogus), "--key-file", str(key)])
    assert result.exit_code == 1
    assert "listening on" not in result.output


def test_duplicate_names_are_refused(sealed: tuple[Path, Path]) -> None:
    path, key = sealed
    result = CliRunner().invoke(cli, ["serve", str(path), str(path), "--key-file", str(key)])
    assert result.exit_code == 2
    assert "same name" in result.output
    result = CliRunner().invoke(
        cli, ["serve", str(path), "--key-file", str(key), "--name", "bad name"]
    )
    assert result.exit_code == 2
    assert "must be 1-128 letters" in result.output


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 70000}, "port"),
        ({"threads": 0}, "--threads"),
        ({"workers": 0}, "--workers"),
        ({"max_body_bytes": 10}, "at least 1 KiB"),
        ({"drain_timeout": -1}, "negative"),
    ],
)
def test_settings_are_validated(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerSettings(**kwargs)


def test_a_server_needs_distinct_models(sealed: tuple[Path, Path]) -> None:
    path, key = sealed
    with pytest.raises(ConfigError, match="at least one model"):
        InferenceServer(ServerSettings(), [])
    source = SealedModelSource(path, key=key)
    assert source.name == "plain-sd"
    assert "plain-sd" in source.describe()
    with pytest.raises(ConfigError, match="distinct --name"):
        InferenceServer(ServerSettings(), [source, source])


class RefusingProvider:
    """A key source whose key server denies the release (the attested client's failure mode)."""

    def data_key(self, model_id: str, key_version: int) -> object:
        raise KeyReleaseError(
            f"the key server refused {model_id} v{key_version}",
            reasons=("measurement_mismatch", "tcb_out_of_date"),
            status_code=403,
        )


def test_a_denied_key_exits_non_zero_with_the_reasons(
    sealed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sealtorch.serving.keysource as keysource

    def resolve(url: str, *, tee: str | None, **options: object) -> RefusingProvider:
        assert (url, tee) == ("https://127.0.0.1:7443", "sim")
        return RefusingProvider()

    monkeypatch.setattr(keysource, "resolve_key_source", resolve)
    result = CliRunner().invoke(
        cli,
        [
            "serve",
            str(sealed[0]),
            "--keys",
            "https://127.0.0.1:7443",
            "--tee",
            "sim",
            "--port",
            "0",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "listening on http://127.0.0.1:" in result.output
    assert "ready on" not in result.output
    assert "error: the key server refused plain-sd v1" in result.output
    assert "reasons: measurement_mismatch, tcb_out_of_date" in result.output


def test_command_modules_import_nothing_heavy() -> None:
    """`sealtorch --help` imports these; PyTorch and the server stack load only to serve."""
    import subprocess
    import sys

    code = (
        "import sys, sealtorch.serving, sealtorch.cli.serve, sealtorch.serving.keysource,"
        " sealtorch.deploy.cli, sealtorch.deploy.gramine;"
        "print(','.join(m for m in ('torch', 'fastapi', 'uvicorn', 'jinja2', 'numpy', 'PIL')"
        " if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert done.stdout.strip() == ""
