"""Server lifecycle on a real socket: live before ready, ready only when every model is,
a refused key stops the server with its reasons, stopping while loading is clean."""

from __future__ import annotations

import threading

import httpx
import pytest
from serving_helpers import assert_protocol_error
from torch import nn

from _fixtures.polling import eventually
from sealtorch.errors import KeyReleaseError
from sealtorch.serving.model import ServedModel
from sealtorch.serving.server import InferenceServer, ServerSettings


class GatedSource:
    """A model source that loads when its gate opens (or fails with ``error``)."""

    def __init__(self, name: str, gate: threading.Event, error: BaseException | None = None):
        self._name = name
        self.gate = gate
        self.error = error

    @property
    def name(self) -> str:
        return self._name

    def describe(self) -> str:
        return f"gated source {self._name}"

    def load(self, *, max_images: int) -> ServedModel:
        self.gate.wait(60)
        if self.error is not None:
            raise self.error
        return ServedModel.build(
            nn.Linear(2, 2), name=self._name, sealed=False, max_images=max_images
        )


def _start(server: InferenceServer) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert server.listening.wait(30)
    return thread, errors


def test_live_at_once_ready_only_when_every_model_is() -> None:
    first, second = threading.Event(), threading.Event()
    server = InferenceServer(
        ServerSettings(port=0), [GatedSource("a", first), GatedSource("b", second)]
    )
    thread, errors = _start(server)
    try:
        with httpx.Client(base_url=str(server.url), timeout=30) as client:
            assert client.get("/v2/health/live").json() == {"live": True}
            not_ready = client.get("/v2/health/ready")
            assert (not_ready.status_code, not_ready.json()) == (503, {"ready": False})
            model_ready = client.get("/v2/models/a/ready")
            assert (model_ready.status_code, model_ready.json()) == (
                503,
                {"name": "a", "ready": False},
            )
            assert "still loading" in assert_protocol_error(client.get("/v2/models/a"), 503)
            body = {
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]
            }
            assert "still loading" in assert_protocol_error(
                client.post("/v2/models/a/infer", json=body), 503
            )
            assert 'sealtorch_model_ready{model="a"} 0.0' in client.get("/metrics").text

            first.set()
            eventually(
                lambda: client.get("/v2/models/a/ready").status_code == 200, what="model a ready"
            )
            assert client.post("/v2/models/a/infer", json=body).status_code == 200
            assert client.get("/v2/health/ready").status_code == 503  # b is still loading

            second.set()
            assert server.ready.wait(30)
            assert client.get("/v2/health/ready").json() == {"ready": True}
            metrics = client.get("/metrics").text
            assert 'sealtorch_model_info{model="b",sealed="false",version="1"} 1.0' in metrics
    finally:
        first.set()
        second.set()
        server.stop()
        thread.join(30)
    assert not errors


def test_a_refused_key_stops_the_server_with_its_reasons() -> None:
    gate = threading.Event()
    gate.set()
    refused = KeyReleaseError(
        "the key server refused model b", reasons=("measurement_mismatch",), status_code=403
    )
    server = InferenceServer(
        ServerSettings(port=0), [GatedSource("a", gate), GatedSource("b", gate, refused)]
    )
    thread, errors = _start(server)
    thread.join(60)
    assert not thread.is_alive()
    assert errors == [refused]
    assert errors[0].reasons == ("measurement_mismatch",)  # type: ignore[attr-defined]
    assert not server.ready.is_set()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/v2/health/live", timeout=5)


def test_stopping_while_a_model_loads_is_clean() -> None:
    gate = threading.Event()
    server = InferenceServer(ServerSettings(port=0), [GatedSource("a", gate)])
    thread, errors = _start(server)
    try:
        server.stop()
        thread.join(30)
        assert not thread.is_alive()
        assert not errors
        assert not server.ready.is_set()
    finally:
        gate.set()
