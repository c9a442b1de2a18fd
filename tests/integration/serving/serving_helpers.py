"""Helpers of the serving integration tests: sealed test models, servers, protocol tensors."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import torch

from sealtorch.serving.server import InferenceServer, ModelSource, ServerSettings
from sealtorch.serving.tensors import DTYPES, datatype_of

HERE = Path(__file__).resolve().parent
#: The session test server's body limit (the 413 tests send more).
MAX_BODY = 16 * 1024 * 1024


@dataclass(frozen=True)
class SealedSet:
    """The sealed test models (one data key for all) and their plain references."""

    directory: Path
    key_file: Path
    lite0: Path
    types: Path
    mlp: Path
    sleeper: Path
    lite0_reference: torch.nn.Module
    mlp_reference: torch.nn.Module
    labels: tuple[str, ...]


@contextmanager
def running_server(
    sources: Sequence[ModelSource], settings: ServerSettings | None = None
) -> Iterator[InferenceServer]:
    """An :class:`InferenceServer` on a random loopback port, in a background thread."""
    server = InferenceServer(settings or ServerSettings(port=0), sources)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=run, name="test-inference-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while not server.ready.is_set():
        if errors or not thread.is_alive():
            raise AssertionError(f"the server stopped while loading: {errors!r}")
        if time.monotonic() > deadline:
            raise AssertionError("the server did not become ready within 180 s")
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.stop()
        thread.join(60)
        assert not thread.is_alive(), "the server did not stop"
        if errors:
            raise errors[0]


def tensor_input(name: str, tensor: torch.Tensor, *, nested: bool = False) -> dict[str, Any]:
    """A protocol input whose JSON data reads back exactly (floats as doubles)."""
    data = tensor.tolist() if nested else tensor.reshape(-1).tolist()
    return {
        "name": name,
        "datatype": datatype_of(tensor.dtype),
        "shape": list(tensor.shape),
        "data": data,
    }


def output_tensor(output: dict[str, Any]) -> torch.Tensor:
    """The exact tensor of a JSON response output."""
    dtype = DTYPES[output["datatype"]]
    if dtype.is_floating_point:
        parsed = torch.tensor(output["data"], dtype=torch.float64).to(dtype)
    elif dtype == torch.bool:
        parsed = torch.tensor(output["data"], dtype=torch.bool)
    else:
        parsed = torch.tensor(output["data"], dtype=torch.int64).to(dtype)
    return parsed.reshape(output["shape"])


def image_input(*images: bytes, name: str = "image") -> dict[str, Any]:
    return {
        "name": name,
        "datatype": "BYTES",
        "shape": [len(images)],
        "data": [base64.b64encode(image).decode("ascii") for image in images],
    }


def by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {output["name"]: output for output in document["outputs"]}


def assert_protocol_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str)
    assert body["error"]
    return str(body["error"])


# -- subprocesses --------------------------------------------------------------------------------


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sealtorch", *args]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_for_line(stream: IO[str], prefix: str, *, timeout: float) -> str:
    """Read lines until one starts with ``prefix`` (fails on EOF or timeout)."""
    result: list[str] = []

    def read() -> None:
        for line in stream:
            if line.startswith(prefix):
                result.append(line.strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not result:
        raise AssertionError(f"no line starting with {prefix!r} within {timeout} s")
    return result[0]


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)
