"""The rest of the REST surface: the SDKs' body fields, compressed bodies (and zip bombs), HEAD,
precise errors for malformed binary bodies, and the read-only model configuration."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import httpx
import pytest
import torch
from serving_helpers import MAX_BODY, assert_protocol_error, output_tensor, tensor_input


@pytest.fixture(scope="module")
def client(base_url: str) -> httpx.Client:
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c  # type: ignore[misc]


def _body(**extra: Any) -> dict[str, Any]:
    return {"inputs": [tensor_input("features", torch.ones(2, 6))], **extra}


def _logits(response: httpx.Response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    return output_tensor(response.json()["outputs"][0])


# -- the SDKs' request shapes ------------------------------------------------------------------


def test_model_name_and_version_in_the_body_are_accepted_when_they_match(
    client: httpx.Client,
) -> None:
    plain = _logits(client.post("/v2/models/tiny-mlp/infer", json=_body()))
    named = client.post("/v2/models/tiny-mlp/infer", json=_body(model_name="tiny-mlp"))
    assert torch.equal(_logits(named), plain)
    versioned = client.post(
        "/v2/models/tiny-mlp/versions/3/infer", json=_body(model_name="tiny-mlp", model_version="3")
    )
    assert torch.equal(_logits(versioned), plain)
    unversioned_url = client.post("/v2/models/tiny-mlp/infer", json=_body(model_version="3"))
    assert torch.equal(_logits(unversioned_url), plain)


@pytest.mark.parametrize(
    ("url", "fields", "message"),
    [
        ("/v2/models/tiny-mlp/infer", {"model_name": "types"}, "names model 'types'"),
        ("/v2/models/tiny-mlp/infer", {"model_version": "4"}, "names model version '4'"),
        (
            "/v2/models/tiny-mlp/versions/3/infer",
            {"model_version": "2"},
            "but it was sent to version '3'",
        ),
        ("/v2/models/tiny-mlp/infer", {"model_name": 7}, "model_name must be a non-empty string"),
    ],
)
def test_a_body_naming_another_model_is_refused(
    client: httpx.Client, url: str, fields: dict[str, Any], message: str
) -> None:
    error = assert_protocol_error(client.post(url, json=_body(**fields)), 400)
    assert message in error


# -- compressed bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),  # the zlib format (RFC 9110)
        ("deflate", lambda data: zlib.compress(data, wbits=-15)),  # raw deflate, as some send
    ],
    ids=["gzip", "zlib", "raw-deflate"],
)
def test_gzip_and_deflate_bodies_give_the_same_answer(
    client: httpx.Client, encoding: str, compress: Any
) -> None:
    document = json.dumps(_body()).encode()
    plain = _logits(client.post("/v2/models/tiny-mlp/infer", content=document))
    response = client.post(
        "/v2/models/tiny-mlp/infer",
        content=compress(document),
        headers={"Content-Encoding": encoding},
    )
    assert torch.equal(_logits(response), plain)


def test_a_zip_bomb_is_refused_after_decompressing_at_most_the_limit(
    client: httpx.Client,
) -> None:
    bomb = gzip.compress(b" " * (MAX_BODY * 4), mtime=0)  # tens of KiB that inflate to 64 MiB
    assert len(bomb) < MAX_BODY // 100
    response = client.post(
        "/v2/models/tiny-mlp/infer", content=bomb, headers={"Content-Encoding": "gzip"}
    )
    assert "decompresses to more than" in assert_protocol_error(response, 413)


@pytest.mark.parametrize(
    ("encoding", "body", "status", "message"),
    [
        ("br", b"x", 415, "Content-Encoding 'br' is not supported"),
        ("gzip", b"not gzip at all", 400, "gzip request body is corrupt"),
        ("gzip", gzip.compress(b'{"inputs": []}', mtime=0)[:-6], 400, "truncated"),
        ("gzip", gzip.compress(b"{}", mtime=0) + b"trailing", 400, "trailing bytes"),
    ],
    ids=["br", "corrupt", "truncated", "trailing"],
)
def test_bad_compressed_bodies_are_refused(
    client: httpx.Client, encoding: str, body: bytes, status: int, message: str
) -> None:
    response = client.post(
        "/v2/models/tiny-mlp/infer", content=body, headers={"Content-Encoding": encoding}
    )
    assert message in assert_protocol_error(response, status)


# -- malformed binary bodies ---------------------------------------------------------------------


def _binary_body() -> tuple[bytes, int]:
    raw = torch.ones(1, 6).numpy().tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": [1, 6],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return header + raw, len(header)


def test_binary_bodies_with_a_missing_or_wrong_header_length_say_so(
    client: httpx.Client,
) -> None:
    body, length = _binary_body()
    good = client.post(
        "/v2/models/tiny-mlp/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(length)},
    )
    assert good.status_code == 200, good.text
    missing = client.post("/v2/models/tiny-mlp/infer", content=body)
    assert "needs the Inference-Header-Content-Length header" in assert_protocol_error(missing, 400)
    for wrong in (length - 3, length + 5):
        response = client.post(
            "/v2/models/tiny-mlp/infer",
            content=body,
            headers={"Inference-Header-Content-Length": str(wrong)},
        )
        error = assert_protocol_error(response, 400)
        assert f"the first {wrong} bytes (Inference-Header-Content-Length)" in error


# -- HEAD and the model configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/metrics",
        "/v2/models/tiny-mlp",
        "/v2/models/tiny-mlp/versions/3",
        "/v2/models/tiny-mlp/ready",
        "/v2/models/tiny-mlp/config",
    ],
)
def test_head_works_wherever_get_does(client: httpx.Client, path: str) -> None:
    get = client.get(path)
    head = client.head(path)
    assert get.status_code == head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_head_on_an_unknown_model_is_404(client: httpx.Client) -> None:
    assert client.head("/v2/models/nope").status_code == 404


def test_the_model_configuration_describes_inputs_outputs_and_batching(
    client: httpx.Client,
) -> None:
    response = client.get("/v2/models/tiny-mlp/config")
    assert response.status_code == 200
    assert response.json() == {
        "name": "tiny-mlp",
        "platform": "pytorch",
        "backend": "pytorch",
        "version_policy": {"specific": {"versions": ["3"]}},
        "max_batch_size": 0,
        "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [-1, 6]}],
        "output": [
            {"name": "logits", "data_type": "TYPE_FP32", "dims": [-1, 4]},
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [-1, 4]},
        ],
    }
    image = client.get("/v2/models/efficientnet-lite0/versions/1/config").json()
    assert image["input"][-1] == {"name": "image", "data_type": "TYPE_STRING", "dims": [-1]}
    assert client.post("/v2/models/tiny-mlp/config").status_code == 405
    assert_protocol_error(client.get("/v2/models/tiny-mlp/versions/9/config"), 404)
