"""The architectures a serve enclave may build are part of its measured command line."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from sealtorch.deploy.cli import deploy
from sealtorch.deploy.gramine import PythonRuntime, ServeEnclave, render_serve_manifest
from sealtorch.errors import ConfigError

RUNTIME = PythonRuntime(
    interpreter=Path("/opt/python/bin/python3.11"),
    directories=(
        Path("/opt/python/lib/python3.11"),
        Path("/opt/venv/lib/python3.11/site-packages"),
    ),
    pythonpath=(Path("/opt/venv/lib/python3.11/site-packages"),),
)
#: A release-signing public key for the enclave to pin (an Ed25519 key, in its text form).
PIN = "sealtorch-release-key-v1:A6EHv_POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg"


def _argv(**changes: object) -> list[str]:
    config = ServeEnclave(
        models=(Path("/srv/models/mlp.sealed"),),
        keys_url="https://127.0.0.1:7443",
        extra_args=("--keyserver-pubkey", PIN),
        **changes,  # type: ignore[arg-type]
    )
    argv: list[str] = tomllib.loads(render_serve_manifest(config, runtime=RUNTIME))["loader"][
        "argv"
    ]
    return argv


def _allowed(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "--allow-arch"]


def test_allowed_factories_are_rendered_into_the_measured_argv() -> None:
    assert _allowed(_argv()) == []
    argv = _argv(allowed_archs=("mypkg.models:build", "torch.nn:Linear", "mypkg.models:build"))
    assert _allowed(argv) == ["mypkg.models:build", "torch.nn:Linear"]


@pytest.mark.parametrize(
    ("ref", "message"),
    [("timm:resnet18", "always allowed"), ("os.system", "invalid architecture reference")],
)
def test_only_factory_references_are_rendered(ref: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _argv(allowed_archs=(ref,))


def test_the_cli_offers_allow_arch() -> None:
    help_text = CliRunner().invoke(deploy, ["gramine", "serve", "--help"]).output
    assert "--allow-arch MODULE:FACTORY" in help_text
