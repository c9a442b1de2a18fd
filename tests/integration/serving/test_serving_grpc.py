"""The gRPC service over a real socket: health, reflection, loading, limits, status codes."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving_helpers import SealedSet, running_server
from torch import nn

from sealtorch.errors import ConfigError
from sealtorch.serving.grpc_proto import SERVICE, message
from sealtorch.serving.model import ServedModel
from sealtorch.serving.server import InferenceServer, SealedModelSource, ServerSettings

ALLOWED_ARCHS = ("serving_factories:tiny_classifier", "serving_factories:sleeper")


class GatedSource:
    """A model source that loads when its gate opens."""

    def __init__(self, name: str, gate: threading.Event) -> None:
        self.name = name
        self.gate = gate

    def describe(self) -> str:
        return f"gated source {self.name}"

    def load(self, *, max_images: int) -> ServedModel:
        self.gate.wait(60)
        return ServedModel.build(nn.Linear(2, 2), name=self.name, sealed=False)


def _stub(channel: grpc.Channel, method: str) -> Any:
    return channel.unary_unary(
        f"/{SERVICE}/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=message(f"{method}Response").FromString,
    )


def _call(channel: grpc.Channel, method: str, **fields: Any) -> Any:
    return _stub(channel, method)(message(f"{method}Request")(**fields), timeout=60)


def _code(channel: grpc.Channel, method: str, **fields: Any) -> tuple[Any, str]:
    with pytest.raises(grpc.RpcError) as info:
        _call(channel, method, **fields)
    return info.value.code(), info.value.details()


def _features(batch: int = 1, size: int = 6) -> dict[str, Any]:
    return {"name": "features", "datatype": "FP32", "shape": [batch, size]}


@pytest.fixture(scope="module")
def grpc_server(sealed_set: SealedSet) -> Iterator[InferenceServer]:
    sources = [
        SealedModelSource(sealed_set.mlp, key=sealed_set.key_file, allowed_archs=ALLOWED_ARCHS),
        SealedModelSource(sealed_set.sleeper, key=sealed_set.key_file, allowed_archs=ALLOWED_ARCHS),
    ]
    settings = ServerSettings(
        port=0, grpc_port=0, workers=1, max_pending=1, max_body_bytes=64 * 1024
    )
    with running_server(sources, settings) as server:
        yield server


@pytest.fixture
def channel(grpc_server: InferenceServer) -> Iterator[grpc.Channel]:
    assert grpc_server.grpc_url is not None
    with grpc.insecure_channel(grpc_server.grpc_url.removeprefix("grpc://")) as channel:
        yield channel


def test_health_service_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="other"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # the protocol's file


def test_typed_and_raw_inputs_match_plain_pytorch(
    channel: grpc.Channel, sealed_set: SealedSet
) -> None:
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = sealed_set.mlp_reference(x)
    typed = _call(
        channel,
        "ModelInfer",
        model_name="tiny-mlp",
        inputs=[{**_features(3), "contents": {"fp32_contents": x.reshape(-1).tolist()}}],
        parameters={"binary_data_output": {"bool_param": False}},
    )
    got = torch.tensor(list(typed.outputs[0].contents.fp32_contents)).reshape(3, 4)
    assert torch.equal(got, expected)
    assert typed.model_version == "3"
    raw = _call(
        channel,
        "ModelInfer",
        model_name="tiny-mlp",
        id="req-1",
        inputs=[_features(3)],
        raw_input_contents=[x.numpy().tobytes()],
    )
    assert raw.id == "req-1"
    assert raw.raw_output_contents[0] == expected.numpy().tobytes()


def test_status_codes(channel: grpc.Channel) -> None:
    zeros = {"inputs": [_features()], "raw_input_contents": [bytes(24)]}
    assert _code(channel, "ModelInfer", model_name="nope", **zeros)[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    code, details = _code(channel, "ModelInfer", model_name="tiny-mlp", model_version="9", **zeros)
    assert code == grpc.StatusCode.NOT_FOUND
    assert "has no version '9'" in details
    code, details = _code(
        channel,
        "ModelInfer",
        model_name="tiny-mlp",
        inputs=[_features(1, 5)],
        raw_input_contents=[bytes(20)],
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "has shape [1, 5], but the model takes [-1, 6]" in details
    assert _code(channel, "ModelMetadata", name="nope")[0] == grpc.StatusCode.NOT_FOUND
    assert _code(channel, "ModelReady", name="nope")[0] == grpc.StatusCode.NOT_FOUND
    code, details = _code(
        channel,
        "ModelInfer",
        model_name="tiny-mlp",
        inputs=[_features(4096)],
        raw_input_contents=[bytes(4096 * 24)],  # 96 KiB > the 64 KiB message limit
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_full_queue_is_resource_exhausted(channel: grpc.Channel) -> None:
    slow = torch.tensor([[1.5, 0.0]])

    def sleep() -> Any:
        return _call(
            channel,
            "ModelInfer",
            model_name="sleeper",
            inputs=[{"name": "x", "datatype": "FP32", "shape": [1, 2]}],
            raw_input_contents=[slow.numpy().tobytes()],
        )

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(sleep)
        time.sleep(0.5)  # the slow request holds the only --max-pending place
        code, details = _code(
            channel,
            "ModelInfer",
            model_name="tiny-mlp",
            inputs=[_features()],
            raw_input_contents=[bytes(24)],
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already queued" in details
        assert first.result(timeout=30).raw_output_contents[0] == (slow * 2).numpy().tobytes()


def test_metadata_and_config(channel: grpc.Channel) -> None:
    server = _call(channel, "ServerMetadata")
    assert server.name == "sealtorch"
    assert "classification" in server.extensions
    metadata = _call(channel, "ModelMetadata", name="tiny-mlp")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("features", "FP32", [-1, 6])
    ]
    config = _call(channel, "ModelConfig", name="tiny-mlp", version="3").config
    assert config.max_batch_size == 0
    assert list(config.version_policy.specific.versions) == [3]
    assert [(t.name, list(t.dims)) for t in config.output] == [
        ("logits", [-1, 4]),
        ("probabilities", [-1, 4]),
    ]


def test_while_loading_models_are_unavailable_and_health_not_serving() -> None:
    gate = threading.Event()
    settings = ServerSettings(port=0, grpc_port=0)
    server = InferenceServer(settings, [GatedSource("gated", gate)])
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert server.listening.wait(30)
        assert server.grpc_url is not None
        with grpc.insecure_channel(server.grpc_url.removeprefix("grpc://")) as channel:
            assert _call(channel, "ServerLive").live
            assert not _call(channel, "ServerReady").ready
            assert not _call(channel, "ModelReady", name="gated").ready
            code, details = _code(channel, "ModelMetadata", name="gated")
            assert code == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in details
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            gate.set()
            assert server.ready.wait(60)
            assert _call(channel, "ServerReady").ready
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gate.set()
        server.stop()
        thread.join(60)


def test_a_taken_grpc_port_is_a_clear_error(sealed_set: SealedSet) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        source = SealedModelSource(
            sealed_set.mlp, key=sealed_set.key_file, allowed_archs=ALLOWED_ARCHS
        )
        server = InferenceServer(ServerSettings(port=0, grpc_port=port), [source])
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port} for gRPC"):
            server.run()


def test_tls_serves_https_and_grpc_with_the_same_certificate(
    sealed_set: SealedSet, tmp_path: Path
) -> None:
    from sealtorch._crypto import tls

    ca = tls.create_dev_ca(cert_path=tmp_path / "ca.pem", key_path=tmp_path / "ca.key")
    server_cert = tls.create_server_certificate(
        ca=ca, cert_path=tmp_path / "server.pem", key_path=tmp_path / "server.key"
    )
    source = SealedModelSource(sealed_set.mlp, key=sealed_set.key_file, allowed_archs=ALLOWED_ARCHS)
    settings = ServerSettings(
        port=0, grpc_port=0, tls_cert=server_cert.cert, tls_key=server_cert.key
    )
    with running_server([source], settings) as server:
        assert server.url is not None
        assert server.grpc_url is not None
        assert server.url.startswith("https://127.0.0.1:")
        assert server.grpc_url.startswith("grpcs://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(ca.cert))
        answer = httpx.get(f"{server.url}/v2/health/ready", verify=trust, timeout=30)
        assert answer.json() == {"ready": True}
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{server.url}/v2/health/ready", timeout=30)  # not the system's CA
        address = server.grpc_url.removeprefix("grpcs://")
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert.read_bytes())
        with grpc.secure_channel(address, credentials) as channel:
            assert _call(channel, "ServerReady").ready
        with grpc.insecure_channel(address) as channel:
            assert _code(channel, "ServerLive")[0] == grpc.StatusCode.UNAVAILABLE


def test_tls_needs_both_files_and_a_private_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give both --tls-cert and --tls-key"):
        ServerSettings(tls_cert=tmp_path / "server.pem")
