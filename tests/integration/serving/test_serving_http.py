"""The Open Inference Protocol over real HTTP: metadata, exact outputs, extensions, load."""

from __future__ import annotations

import json
import logging
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import serving_factories
import torch
from serving_helpers import (
    SealedSet,
    by_name,
    image_input,
    output_tensor,
    tensor_input,
)

from sealtorch._demo.pretrained import IMAGENET_PREPROCESS, sample_image
from sealtorch.payloads.manifest import ImagePreprocessSpec
from sealtorch.serving.preprocess import preprocess_image

SPEC = ImagePreprocessSpec.from_json(IMAGENET_PREPROCESS)


@pytest.fixture(scope="module")
def client(base_url: str) -> httpx.Client:
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c  # type: ignore[misc]


def _infer(client: httpx.Client, model: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def _reference(module: torch.nn.Module, *inputs: torch.Tensor) -> Any:
    with torch.inference_mode():
        return module(*inputs)


# -- server and model metadata ---------------------------------------------------------------


def test_server_metadata_and_health(client: httpx.Client) -> None:
    metadata = client.get("/v2").json()
    assert metadata["name"] == "sealtorch"
    assert "classification" in metadata["extensions"]
    assert "binary_tensor_data" in metadata["extensions"]
    assert client.get("/v2/health/live").json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True}


def test_image_model_metadata_shows_tensor_and_image_inputs(client: httpx.Client) -> None:
    metadata = client.get("/v2/models/efficientnet-lite0").json()
    assert metadata == {
        "name": "efficientnet-lite0",
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "output", "datatype": "FP32", "shape": [-1, 1000]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]},
        ],
    }


def test_exported_model_metadata_is_inferred_from_its_graph(client: httpx.Client) -> None:
    metadata = client.get("/v2/models/types").json()
    assert [i["name"] for i in metadata["inputs"]] == list(serving_factories.TYPE_INPUTS)
    assert [i["datatype"] for i in metadata["inputs"]] == [
        "FP32",
        "FP16",
        "BF16",
        "FP64",
        "INT64",
        "INT32",
        "INT16",
        "INT8",
        "UINT8",
        "BOOL",
    ]
    assert all(i["shape"] == [-1, 3] for i in metadata["inputs"])
    assert [o["name"] for o in metadata["outputs"]][:2] == ["f32_out", "f16_out"]


def test_declared_metadata_and_versions(client: httpx.Client) -> None:
    metadata = client.get("/v2/models/tiny-mlp").json()
    assert metadata["versions"] == ["3"]
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 6]}]
    assert metadata["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]},
    ]
    assert client.get("/v2/models/tiny-mlp/versions/3").json() == metadata
    assert client.get("/v2/models/tiny-mlp/versions/3/ready").json() == {
        "name": "tiny-mlp",
        "ready": True,
    }
    assert client.get("/v2/models/tiny-mlp/ready").status_code == 200
    assert client.get("/v2/models/tiny-mlp/versions/1").status_code == 404


# -- exact outputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_tensor_input_is_bit_identical_to_plain_pytorch(
    client: httpx.Client, sealed_set: SealedSet, nested: bool
) -> None:
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(int(nested)))
    document = _infer(
        client,
        "efficientnet-lite0",
        {"inputs": [tensor_input("input", x, nested=nested)], "outputs": [{"name": "output"}]},
    )
    served = output_tensor(by_name(document)["output"])
    expected = _reference(sealed_set.lite0_reference, x)
    assert served.dtype == torch.float32
    assert torch.equal(served, expected)


def test_images_give_bit_identical_logits_and_top5_labels(
    client: httpx.Client, sealed_set: SealedSet
) -> None:
    photos = [sample_image("chelsea.png"), sample_image("coffee.png")]
    document = _infer(
        client,
        "efficientnet-lite0",
        {
            "id": "photos-1",
            "inputs": [image_input(*photos)],
            "outputs": [
                {"name": "output"},
                {"name": "probabilities", "parameters": {"classification": 5}},
            ],
        },
    )
    assert document["id"] == "photos-1"
    assert document["model_name"] == "efficientnet-lite0"
    outputs = by_name(document)
    batch = torch.stack([preprocess_image(photo, SPEC) for photo in photos])
    expected = _reference(sealed_set.lite0_reference, batch)
    assert torch.equal(output_tensor(outputs["output"]), expected)

    top = outputs["probabilities"]
    assert top["datatype"] == "BYTES"
    assert top["shape"] == [2, 5]
    probabilities = torch.softmax(expected, dim=-1)
    values, indices = torch.sort(probabilities, dim=-1, descending=True, stable=True)
    for row in range(2):
        for rank in range(5):
            value, index, label = top["data"][row * 5 + rank].split(":", 2)
            assert int(index) == int(indices[row, rank])
            assert float(value) == float(values[row, rank])
            assert label == sealed_set.labels[int(index)]
    assert top["data"][5].split(":", 2)[2] == "espresso"


def test_every_datatype_round_trips_exactly(client: httpx.Client) -> None:
    inputs = serving_factories.example_inputs(batch=3)
    document = _infer(
        client,
        "types",
        {
            "id": "types-1",
            "parameters": {"anything": "ignored", "n": 1},
            "inputs": [
                tensor_input(name, tensor)
                for name, tensor in zip(serving_factories.TYPE_INPUTS, inputs, strict=True)
            ],
        },
    )
    assert document["id"] == "types-1"
    assert document["model_version"] == "1"
    expected = _reference(serving_factories.AllTypes().eval(), *inputs)
    outputs = by_name(document)
    assert list(outputs) == list(expected)
    for name, tensor in expected.items():
        served = output_tensor(outputs[name])
        assert served.dtype == tensor.dtype, name
        assert torch.equal(served, tensor), name


def test_requested_outputs_come_in_the_requested_order(client: httpx.Client) -> None:
    inputs = serving_factories.example_inputs(batch=1)
    document = _infer(
        client,
        "types",
        {
            "inputs": [
                tensor_input(name, tensor, nested=True)
                for name, tensor in zip(serving_factories.TYPE_INPUTS, inputs, strict=True)
            ],
            "outputs": [{"name": "i8_out"}, {"name": "f16_out"}],
        },
    )
    assert [o["name"] for o in document["outputs"]] == ["i8_out", "f16_out"]
    assert "id" not in document


def test_classification_of_a_plain_output_and_probabilities(
    client: httpx.Client, sealed_set: SealedSet
) -> None:
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(7))
    document = _infer(
        client,
        "tiny-mlp",
        {
            "inputs": [tensor_input("features", x)],
            "outputs": [
                {"name": "logits", "parameters": {"classification": 2}},
                {"name": "probabilities"},
            ],
        },
    )
    assert document["model_version"] == "3"
    logits = _reference(sealed_set.mlp_reference, x)
    outputs = by_name(document)
    assert torch.equal(output_tensor(outputs["probabilities"]), torch.softmax(logits, dim=-1))
    values, indices = torch.sort(logits, dim=-1, descending=True, stable=True)
    labels = ("ant", "bee", "cat", "dog")
    assert outputs["logits"]["shape"] == [3, 2]
    expected = [
        f"{float(values[r, k])!r}:{int(indices[r, k])}:{labels[int(indices[r, k])]}"
        for r in range(3)
        for k in range(2)
    ]
    assert outputs["logits"]["data"] == expected


def test_binary_tensor_data_extension_round_trips_exactly(client: httpx.Client) -> None:
    inputs = serving_factories.example_inputs(batch=2)
    header: dict[str, Any] = {"inputs": [], "parameters": {"binary_data_output": True}}
    blobs = []
    for name, tensor in zip(serving_factories.TYPE_INPUTS, inputs, strict=True):
        blob = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        spec = tensor_input(name, tensor)
        del spec["data"]
        spec["parameters"] = {"binary_data_size": len(blob)}
        header["inputs"].append(spec)
        blobs.append(blob)
    header["outputs"] = [
        {"name": "bf16_out"},
        {"name": "flag_out", "parameters": {"binary_data": False}},
    ]
    text = json.dumps(header).encode()
    response = client.post(
        "/v2/models/types/infer",
        content=text + b"".join(blobs),
        headers={
            "Inference-Header-Content-Length": str(len(text)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    document = json.loads(response.content[:length])
    expected = _reference(serving_factories.AllTypes().eval(), *inputs)
    bf16, flag = document["outputs"]
    size = bf16["parameters"]["binary_data_size"]
    raw = bytearray(response.content[length : length + size])
    assert len(response.content) == length + size
    served = torch.frombuffer(raw, dtype=torch.bfloat16).reshape(bf16["shape"])
    assert torch.equal(served, expected["bf16_out"])
    assert torch.equal(output_tensor(flag), expected["flag_out"])


def test_binary_image_bytes_and_binary_classification(client: httpx.Client) -> None:
    photo = sample_image("coffee.png")
    header = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "parameters": {"binary_data_size": 4 + len(photo)},
            }
        ],
        "outputs": [
            {"name": "probabilities", "parameters": {"classification": 1, "binary_data": True}}
        ],
    }
    text = json.dumps(header).encode()
    response = client.post(
        "/v2/models/efficientnet-lite0/infer",
        content=text + struct.pack("<I", len(photo)) + photo,
        headers={"Inference-Header-Content-Length": str(len(text))},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    body = response.content[length:]
    (size,) = struct.unpack("<I", body[:4])
    assert body[4 : 4 + size].decode().endswith(":967:espresso")


# -- concurrency, metrics, logs ----------------------------------------------------------------


def test_concurrent_requests_keep_answering_correctly(base_url: str, sealed_set: SealedSet) -> None:
    photos = {"chelsea.png": "tabby", "coffee.png": "espresso"}

    def one(index: int) -> bool:
        with httpx.Client(base_url=base_url, timeout=120) as c:
            if index % 8 == 0:  # images too: decoding runs in the worker threads as well
                photo = list(photos)[index // 8 % 2]
                document = _infer(
                    c,
                    "efficientnet-lite0",
                    {
                        "id": str(index),
                        "inputs": [image_input(sample_image(photo))],
                        "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
                    },
                )
                assert document["id"] == str(index)
                return bool(document["outputs"][0]["data"][0].endswith(":" + photos[photo]))
            x = torch.randn(2, 6, generator=torch.Generator().manual_seed(1000 + index))
            document = _infer(
                c, "tiny-mlp", {"id": str(index), "inputs": [tensor_input("features", x)]}
            )
        assert document["id"] == str(index)
        served = output_tensor(by_name(document)["logits"])
        return torch.equal(served, _reference(sealed_set.mlp_reference, x))

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(one, range(96)))
    assert all(results)


def test_metrics_count_by_model_and_status_with_bounded_labels(client: httpx.Client) -> None:
    x = torch.zeros(1, 6)
    _infer(client, "tiny-mlp", {"inputs": [tensor_input("features", x)]})
    assert client.post("/v2/models/tiny-mlp/infer", content=b"{").status_code == 400
    assert client.post("/v2/models/attacker-chosen-name/infer", json={}).status_code == 404
    assert client.get("/v2/attacker-chosen-route").status_code == 404
    response = client.get("/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = response.text
    assert 'sealtorch_inference_requests_total{model="tiny-mlp",status="200"}' in text
    assert 'sealtorch_inference_requests_total{model="tiny-mlp",status="400"}' in text
    assert 'sealtorch_inference_requests_total{model="",status="404"}' in text
    assert 'sealtorch_model_load_seconds{model="efficientnet-lite0"}' in text
    assert 'sealtorch_model_ready{model="types"} 1.0' in text
    assert 'sealtorch_model_info{model="tiny-mlp",sealed="true",version="3"} 1.0' in text
    assert "sealtorch_inference_in_flight" in text
    assert 'route="/v2/models/{name}/infer"' in text
    assert 'route="unmatched"' in text
    assert "attacker-chosen" not in text


def test_logs_hold_no_request_payloads(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    marker = 1234.5678125  # exactly representable, distinctive
    x = torch.full((1, 6), marker)
    with caplog.at_level(logging.DEBUG):
        _infer(client, "tiny-mlp", {"id": "id-MARKER-77", "inputs": [tensor_input("features", x)]})
        bad = client.post(
            "/v2/models/tiny-mlp/infer",
            json={
                "inputs": [
                    {"name": "features", "datatype": "FP32", "shape": [1, 6], "data": [marker]}
                ]
            },
        )
        assert bad.status_code == 400
    text = caplog.text + "".join(str(vars(r)) for r in caplog.records)
    assert "1234.56" not in text
    assert "MARKER" not in text
    assert any("tiny-mlp" in str(getattr(r, "model", "")) for r in caplog.records)
