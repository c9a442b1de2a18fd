"""The gRPC port of a serve enclave is part of its measured command line (Gramine manifest)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sealtorch.deploy.gramine import PythonRuntime, ServeEnclave, render_serve_manifest
from sealtorch.errors import ConfigError

RUNTIME = PythonRuntime(
    interpreter=Path("/opt/python/bin/python3.11"),
    directories=(Path("/opt/venv/lib/python3.11/site-packages"),),
    pythonpath=(Path("/opt/venv/lib/python3.11/site-packages"),),
)
PIN = "sealtorch-release-key-v1:A6EHv_POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg"


def _render(extra: tuple[str, ...] = (), **changes: object) -> str:
    config = ServeEnclave(
        models=(Path("/srv/models/mlp.sealed"),),
        keys_url="https://127.0.0.1:7443",
        extra_args=("--keyserver-pubkey", PIN, *extra),
        **changes,  # type: ignore[arg-type]
    )
    return render_serve_manifest(config, runtime=RUNTIME)


def _grpc_port(manifest: str) -> str | None:
    argv: list[str] = tomllib.loads(manifest)["loader"]["argv"]
    return argv[argv.index("--grpc-port") + 1] if "--grpc-port" in argv else None


def test_the_grpc_port_is_measured_and_documented_in_the_manifest() -> None:
    rest_only = _render()
    assert _grpc_port(rest_only) is None
    assert "REST on port 8080" in rest_only
    manifest = _render(grpc_port=8081)
    assert _grpc_port(manifest) == "8081"
    assert "REST on 8080, gRPC on\n# 8081" in manifest
    assert "gRPC on\n# 9000" in _render(("--grpc-port", "9000"))  # through the extra args


@pytest.mark.parametrize(
    ("extra", "changes", "message"),
    [
        ((), {"grpc_port": 0}, "port 0 cannot be published"),
        ((), {"grpc_port": 8080}, "differ from the HTTP port"),
        (("--grpc-port", "8081"), {"grpc_port": 8081}, "give the gRPC port once"),
        (("--grpc-port", "x"), {}, "as a port number"),
    ],
)
def test_bad_grpc_ports_are_refused(
    extra: tuple[str, ...], changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _render(extra, **changes)
