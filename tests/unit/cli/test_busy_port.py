"""A server whose port is taken says so, and how to get a free port, on every command."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import sealtorch
from _fixtures.keyserver import new_signing_key
from sealtorch.attestation import SimAttester
from sealtorch.cli import cli
from sealtorch.keys import write_key_file


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_serve(tmp_path: Path, taken_port: int) -> None:
    key = write_key_file(tmp_path / "m.key")
    sealtorch.encrypt_model({"w": torch.zeros(2)}, tmp_path / "m.sealed", model_id="m", key=key)
    code, output = _invoke(
        "serve", str(tmp_path / "m.sealed"), "--key-file", str(tmp_path / "m.key"),
        "--port", str(taken_port),
    )  # fmt: skip
    assert code == 2, output
    assert f"cannot listen on 127.0.0.1:{taken_port}: Address already in use" in output
    assert "--port 0 picks a free one" in output
    assert output.count("NO ATTESTATION") == 1  # the development warning, once


@pytest.mark.parametrize("workers", ["1", "2"])
def test_keyserver_serve(tmp_path: Path, taken_port: int, workers: str) -> None:
    data_dir = tmp_path / "ks"
    code, output = _invoke("keyserver", "init", str(data_dir))
    assert code == 0, output
    code, output = _invoke(
        "keyserver", "serve", str(data_dir), "--port", str(taken_port), "--workers", workers
    )
    assert code == 2, output
    assert f"cannot listen on 127.0.0.1:{taken_port}: Address already in use" in output
    assert "--port 0 picks a free one" in output


@pytest.mark.parametrize("option", ["--tcp", "--metrics"])
def test_keycache_serve(tmp_path: Path, taken_port: int, option: str) -> None:
    sim_key = tmp_path / "sim.key"
    trusted = SimAttester("keycache", sim_key).public_key
    code, output = _invoke(
        "keycache", "serve", "--keyserver", "https://127.0.0.1:9", "--tee", "sim",
        "--keyserver-pubkey", new_signing_key().public_key.text,
        "--sim-key", str(sim_key), "--trust-sim-key", trusted, "--allow-simulated-tee-insecure",
        "--socket", str(tmp_path / "kc.sock"), option, f"127.0.0.1:{taken_port}",
    )  # fmt: skip
    assert code == 2, output
    assert f"cannot listen on 127.0.0.1:{taken_port}: Address already in use" in output
    assert f"{option} 127.0.0.1:0 picks a free one" in output
