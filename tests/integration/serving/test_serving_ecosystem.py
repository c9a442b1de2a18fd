"""Unmodified ecosystem clients against ``sealtorch serve``: tritonclient (HTTP and gRPC) and the
kserve SDK (REST and gRPC), each in a process of its own (clients/ecosystem_client.py).

Outputs are compared bit for bit with plain PyTorch under the same conditions (one thread on
both sides, the same CPU), for one and several inputs; then the error paths.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from serving_helpers import HERE, SealedSet, serve_command, stop, subprocess_env, wait_for_line

from sealtorch.payloads.manifest import ImagePreprocessSpec
from sealtorch.serving.preprocess import preprocess_image

pytestmark = pytest.mark.slow

CLIENT = HERE / "clients" / "ecosystem_client.py"
KSERVE_REST = "kserve-rest"
KSERVE_GRPC = "kserve-grpc"
CLIENTS = ("triton-http", "triton-grpc", KSERVE_REST, KSERVE_GRPC)
GRPC_CLIENTS = ("triton-grpc", KSERVE_GRPC)
_ALLOWED = ("serving_factories:tiny_classifier",)


@dataclass(frozen=True)
class Endpoints:
    http: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT

    def url(self, client: str) -> str:
        if client == "kserve-rest":
            return self.http
        if client.endswith("http"):
            return self.http.removeprefix("http://")
        return self.grpc


@pytest.fixture(scope="module")
def endpoints(sealed_set: SealedSet) -> Iterator[Endpoints]:
    """``sealtorch serve`` as deployed: both protocols, one PyTorch thread."""
    with subprocess.Popen(
        serve_command(
            "serve",
            str(sealed_set.mlp),
            str(sealed_set.lite0),
            "--key-file",
            str(sealed_set.key_file),
            "--allow-arch",
            _ALLOWED[0],
            "--port",
            "0",
            "--grpc-port",
            "0",
            "--threads",
            "1",
            "--max-body-size",
            "4MiB",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    ) as process:
        try:
            assert process.stdout is not None
            http = wait_for_line(process.stdout, "listening on ", timeout=60).split()[-1]
            grpc = wait_for_line(process.stdout, "grpc listening on ", timeout=10).split()[-1]
            assert re.fullmatch(r"grpc://127\.0\.0\.1:\d+", grpc)
            wait_for_line(process.stdout, "ready on ", timeout=180)
            yield Endpoints(http=http, grpc=grpc.removeprefix("grpc://"))
        finally:
            stop(process)


def call(endpoints: Endpoints, client: str, job: dict[str, Any]) -> Any:
    done = subprocess.run(
        [sys.executable, str(CLIENT), client, endpoints.url(client)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def raw_input(name: str, tensor: torch.Tensor, datatype: str = "FP32") -> dict[str, Any]:
    data = tensor.contiguous().numpy().tobytes()
    return {
        "name": name,
        "datatype": datatype,
        "shape": list(tensor.shape),
        "b64": base64.b64encode(data).decode(),
    }


def output_array(result: dict[str, Any], name: str) -> np.ndarray:
    output = result["outputs"][name]
    return np.frombuffer(base64.b64decode(output["b64"]), dtype=output["datatype"]).reshape(
        output["shape"]
    )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference(module: torch.nn.Module, *inputs: torch.Tensor) -> np.ndarray:
    with one_thread(), torch.inference_mode():
        return module(*inputs).numpy()  # type: ignore[no-any-return]


# -- health and metadata -------------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
def test_health_and_metadata(endpoints: Endpoints, client: str) -> None:
    assert call(endpoints, client, {"call": "live"}) == {"live": True}
    assert call(endpoints, client, {"call": "ready"}) == {"ready": True}
    assert call(endpoints, client, {"call": "model_ready", "model": "tiny-mlp"}) == {"ready": True}
    if client.startswith("kserve"):
        return  # the kserve SDK has no metadata calls
    metadata = call(endpoints, client, {"call": "metadata", "model": "tiny-mlp"})["model"]
    assert metadata["name"] == "tiny-mlp"
    assert metadata["versions"] == ["3"]
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 6]}]


@pytest.mark.parametrize("client", ["triton-http", "triton-grpc"])
def test_model_config(endpoints: Endpoints, client: str) -> None:
    config = call(endpoints, client, {"call": "config", "model": "tiny-mlp"})
    config = config.get("config", config)  # gRPC wraps it in ModelConfigResponse
    assert config["name"] == "tiny-mlp"
    assert config["input"][0]["name"] == "features"
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert [int(d) for d in config["input"][0]["dims"]] == [-1, 6]
    assert [int(d) for d in config["output"][0]["dims"]] == [-1, 4]


# -- exact outputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("client", CLIENTS)
def test_logits_match_plain_pytorch_exactly(
    endpoints: Endpoints, sealed_set: SealedSet, client: str, batch: int
) -> None:
    features = torch.randn(batch, 6, generator=torch.Generator().manual_seed(batch))
    result = call(
        endpoints,
        client,
        {"call": "infer", "model": "tiny-mlp", "inputs": [raw_input("features", features)]},
    )
    assert set(result["outputs"]) == {"logits"}  # the derived probabilities on request only
    expected = reference(sealed_set.mlp_reference, features)
    np.testing.assert_array_equal(output_array(result, "logits"), expected)
    assert output_array(result, "logits").dtype == np.float32


@pytest.mark.parametrize("client", [KSERVE_REST, KSERVE_GRPC, "triton-http"])
def test_json_and_typed_contents_are_exact_too(
    endpoints: Endpoints, sealed_set: SealedSet, client: str
) -> None:
    """kserve without binary data sends JSON (REST) or typed fp32_contents (gRPC)."""
    features = torch.randn(3, 6, generator=torch.Generator().manual_seed(7))
    if client == "triton-http":
        job_input = raw_input("features", features)
    else:
        job_input = {
            "name": "features",
            "datatype": "FP32",
            "shape": [3, 6],
            "values": features.reshape(-1).tolist(),
        }
    result = call(
        endpoints,
        client,
        {
            "call": "infer",
            "model": "tiny-mlp",
            "inputs": [job_input],
            "outputs": [{"name": "logits"}],
            "binary": False,
        },
    )
    expected = reference(sealed_set.mlp_reference, features)
    np.testing.assert_array_equal(output_array(result, "logits"), expected)


@pytest.mark.parametrize("client", ["triton-http", "triton-grpc", KSERVE_GRPC])
def test_classification_ranks_with_labels(
    endpoints: Endpoints, sealed_set: SealedSet, client: str
) -> None:
    features = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    result = call(
        endpoints,
        client,
        {
            "call": "infer",
            "model": "tiny-mlp",
            "inputs": [raw_input("features", features)],
            "outputs": [{"name": "probabilities", "classification": 2}],
        },
    )
    output = result["outputs"]["probabilities"]
    assert output["shape"] == [2, 2]
    with one_thread(), torch.inference_mode():
        probabilities = torch.softmax(sealed_set.mlp_reference(features), dim=-1)
    values, indices = torch.sort(probabilities, dim=-1, descending=True, stable=True)
    expected = [
        f"{float(values[row, k])!r}:{int(indices[row, k])}:{sealed_set_label(indices[row, k])}"
        for row in range(2)
        for k in range(2)
    ]
    assert output["values"] == expected


def sealed_set_label(index: torch.Tensor) -> str:
    return ("ant", "bee", "cat", "dog")[int(index)]


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 52, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("client", GRPC_CLIENTS)
def test_encoded_images_over_grpc_match_plain_pytorch(
    endpoints: Endpoints, sealed_set: SealedSet, client: str
) -> None:
    """BYTES elements over gRPC are the raw encoded images (no base64)."""
    from sealtorch._demo.pretrained import IMAGENET_PREPROCESS

    images = [_jpeg(1), _jpeg(2)]
    job_input = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [2],
        "b64_elements": [base64.b64encode(image).decode() for image in images],
    }
    result = call(
        endpoints,
        client,
        {
            "call": "infer",
            "model": "efficientnet-lite0",
            "inputs": [job_input],
            "outputs": [{"name": "output"}],
        },
    )
    spec = ImagePreprocessSpec.from_json(IMAGENET_PREPROCESS)
    batch = torch.stack([preprocess_image(image, spec) for image in images])
    expected = reference(sealed_set.lite0_reference, batch)
    np.testing.assert_array_equal(output_array(result, "output"), expected)


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_compressed_requests_from_tritonclient(
    endpoints: Endpoints, sealed_set: SealedSet, compression: str
) -> None:
    features = torch.randn(4, 6, generator=torch.Generator().manual_seed(11))
    result = call(
        endpoints,
        "triton-http",
        {
            "call": "infer",
            "model": "tiny-mlp",
            "inputs": [raw_input("features", features)],
            "compression": compression,
        },
    )
    np.testing.assert_array_equal(
        output_array(result, "logits"), reference(sealed_set.mlp_reference, features)
    )


# -- refusals ----------------------------------------------------------------------------------

_NOT_FOUND = {
    "triton-http": "400",  # tritonclient.http reports every refusal as 400 in status()
    "triton-grpc": "StatusCode.NOT_FOUND",
    "kserve-rest": "404",
    "kserve-grpc": "NOT_FOUND",
}
_INVALID = {
    "triton-http": "400",
    "triton-grpc": "StatusCode.INVALID_ARGUMENT",
    "kserve-rest": "400",
    "kserve-grpc": "INVALID_ARGUMENT",
}


@pytest.mark.parametrize("client", CLIENTS)
def test_refusals_reach_every_client(endpoints: Endpoints, client: str) -> None:
    features = raw_input("features", torch.zeros(1, 6))
    unknown = call(endpoints, client, {"call": "infer", "model": "nope", "inputs": [features]})
    assert "no model 'nope' is served here" in unknown["error"]["message"]
    if client != "triton-http":
        assert unknown["error"]["status"] == _NOT_FOUND[client]

    wrong = raw_input("features", torch.zeros(1, 5))
    refused = call(endpoints, client, {"call": "infer", "model": "tiny-mlp", "inputs": [wrong]})
    assert "has shape [1, 5], but the model takes [-1, 6]" in refused["error"]["message"]
    assert refused["error"]["status"] == _INVALID[client]

    if client == "kserve-rest":
        return  # the kserve REST client sends no version (neither in the URL nor the body)
    version = call(
        endpoints,
        client,
        {"call": "infer", "model": "tiny-mlp", "version": "9", "inputs": [features]},
    )
    assert "has no version '9'" in version["error"]["message"]
