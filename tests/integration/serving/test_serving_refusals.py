"""Malformed and hostile requests over real HTTP: 400/404/405/413 with the protocol's error
body, never a 500, and never a word about the model's private layers."""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import MAX_BODY, assert_protocol_error

MLP = "/v2/models/tiny-mlp/infer"
LITE0 = "/v2/models/efficientnet-lite0/infer"
TYPES = "/v2/models/types/infer"


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


def features(data: Any = None, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "features",
        "datatype": "FP32",
        "shape": [1, 6],
        "data": [0.5] * 6 if data is None else data,
    }
    spec.update(changes)
    return {"inputs": [spec]}


def image(data: list[Any], **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [len(data)],
        "data": data,
    }
    spec.update(changes)
    return {"inputs": [spec]}


BAD_JSON: list[tuple[str, bytes, str]] = [
    ("not json", b"{bad", "not valid JSON"),
    ("empty body", b"", "not valid JSON"),
    ("not utf-8", b"\xff\xfe\xfa{", "not"),
    ("array", b"[]", "must be a JSON object"),
    ("string", b'"x"', "must be a JSON object"),
    ("deep nesting", b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    ("duplicate keys", b'{"inputs": [], "inputs": []}', "repeats the key"),
]

BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("no inputs", {}, "inputs must be a list"),
    ("empty inputs", {"inputs": []}, "inputs must be a list"),
    ("inputs not a list", {"inputs": {"name": "x"}}, "inputs must be a list"),
    ("unknown field", {**features(), "extra": 1}, "unknown field"),
    ("id not a string", {**features(), "id": 5}, "id must be a string"),
    ("id too long", {**features(), "id": "x" * 5000}, "id must be a string"),
    ("nested parameter", {**features(), "parameters": {"a": {"b": 1}}}, "parameters"),
    ("missing name", {"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, "'name'"),
    (
        "missing data",
        {"inputs": [{"name": "features", "shape": [1, 6], "datatype": "FP32"}]},
        "'data'",
    ),
    ("unknown datatype", features(datatype="FLOAT"), "datatype must be one of"),
    ("negative dim", features(shape=[-1, 6]), "non-negative integers"),
    ("bool dim", features(shape=[True, 6]), "non-negative integers"),
    ("float dim", features(shape=[1.0, 6]), "non-negative integers"),
    ("shape not a list", features(shape="1,6"), "shape must be a list"),
    ("too many dims", features(shape=[1] * 40), "at most 32"),
    (
        "unknown input",
        {"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1], "data": [1]}]},
        "has no input 'nope'",
    ),
    ("wrong datatype", features(datatype="FP64"), "the model takes FP32"),
    ("wrong rank", features(shape=[6]), "the model takes [-1, 6]"),
    ("wrong fixed dim", features(shape=[1, 5], data=[0.0] * 5), "the model takes [-1, 6]"),
    ("too few elements", features(data=[0.5] * 5), "holds 5 elements"),
    ("too many elements", features(data=[0.5] * 7), "holds 7 elements"),
    ("ragged nesting", features(data=[[0.5] * 6, [0.5]], shape=[2, 6]), "rectangular"),
    ("wrong nesting", features(data=[[0.5, 0.5]] * 3), "laid out as [3, 2]"),
    ("strings as floats", features(data=["0.5"] * 6), "only numbers"),
    ("nulls", features(data=[None] * 6), "only numbers"),
    ("data not a list", features(data=0.5), "must be a JSON array"),
    ("huge shape", features(shape=[2**40, 6], data=[]), "elements in shape"),
    ("duplicate inputs", {"inputs": features()["inputs"] * 2}, "repeat a name"),
    ("unknown output", {**features(), "outputs": [{"name": "secret"}]}, "has no output 'secret'"),
    ("duplicate outputs", {**features(), "outputs": [{"name": "logits"}] * 2}, "repeat a name"),
    (
        "classification zero",
        {**features(), "outputs": [{"name": "logits", "parameters": {"classification": 0}}]},
        "positive integer",
    ),
    (
        "classification string",
        {**features(), "outputs": [{"name": "logits", "parameters": {"classification": "5"}}]},
        "positive integer",
    ),
    (
        "classification bool",
        {**features(), "outputs": [{"name": "logits", "parameters": {"classification": True}}]},
        "positive integer",
    ),
    (
        "binary_data not bool",
        {**features(), "outputs": [{"name": "logits", "parameters": {"binary_data": 1}}]},
        "true or false",
    ),
    (
        "binary size without header",
        {
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": [1, 6],
                    "parameters": {"binary_data_size": 24},
                }
            ]
        },
        "Inference-Header-Content-Length",
    ),
    ("binary size and data", features(parameters={"binary_data_size": 24}), "send one"),
    ("image not base64", image(["not base64!!"]), "base64"),
    (
        "image not an image",
        image([base64.b64encode(b"GIF89a-truncated").decode()]),
        "not a decodable image",
    ),
    ("image not a string", image([17]), "strings for BYTES"),
    ("zero images", image([], shape=[0]), "1 <= N <= 8"),
    ("too many images", image(["AAAA"] * 9), "1 <= N <= 8"),
    ("image rank 2", image(["AAAA"], shape=[1, 1]), "shape [N]"),
    ("image wrong datatype", image([1.0], datatype="FP32"), "must be BYTES"),
    ("image content type", image(["AAAA"], parameters={"content_type": "str"}), "content_type"),
]

TYPED_REQUESTS: list[tuple[str, str, Any, str]] = [
    ("UINT8 overflow", "u8", [300, 1, 2], "outside the UINT8 range"),
    ("INT8 underflow", "i8", [-129, 1, 2], "outside the INT8 range"),
    ("float for INT64", "i64", [1.5, 1, 2], "only integers"),
    ("number for BOOL", "flag", [1, 0, 1], "only true/false"),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_unparsable_bodies_are_400(
    client: httpx.Client, case: str, body: bytes, message: str
) -> None:
    del case
    error = assert_protocol_error(client.post(MLP, content=body), 400)
    assert message in error


@pytest.mark.parametrize(
    ("case", "body", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_malformed_requests_are_400(
    client: httpx.Client, case: str, body: dict[str, Any], message: str
) -> None:
    target = LITE0 if case.startswith("image") or "images" in case else MLP
    error = assert_protocol_error(client.post(target, json=body), 400)
    assert message in error, error


def _types_request(name: str, data: Any) -> dict[str, Any]:
    from serving_factories import TYPE_INPUTS, example_inputs
    from serving_helpers import tensor_input

    inputs = [
        tensor_input(key, tensor)
        for key, tensor in zip(TYPE_INPUTS, example_inputs(batch=1), strict=True)
    ]
    for spec in inputs:
        if spec["name"] == name:
            spec["data"] = data
    return {"inputs": inputs}


@pytest.mark.parametrize(
    ("case", "name", "data", "message"), TYPED_REQUESTS, ids=[c[0] for c in TYPED_REQUESTS]
)
def test_values_outside_their_datatype_are_400(
    client: httpx.Client, case: str, name: str, data: Any, message: str
) -> None:
    del case
    error = assert_protocol_error(client.post(TYPES, json=_types_request(name, data)), 400)
    assert message in error


def test_image_and_tensor_inputs_together_are_400(client: httpx.Client) -> None:
    body = image(["AAAA"])
    body["inputs"].append(
        {"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": [0.0] * 150528}
    )
    assert "not both" in assert_protocol_error(client.post(LITE0, json=body), 400)


def test_model_failures_do_not_leak_its_layers(client: httpx.Client) -> None:
    # Two batch sizes pass the per-input check but violate the exported graph's guards.
    body = _types_request("f32", [0.5] * 6)
    body["inputs"][0]["shape"] = [2, 3]
    error = assert_protocol_error(client.post(TYPES, json=body), 400)
    assert "could not run on this input" in error
    assert not re.search(r"guard|size\(\)|mat1|weight|Linear|s\d+", error)


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        ({"Inference-Header-Content-Length": "abc"}, b"{}", "not a number"),
        ({"Inference-Header-Content-Length": "0"}, b"{}", "between 1 and the body size"),
        ({"Inference-Header-Content-Length": "999"}, b"{}", "between 1 and the body size"),
    ],
)
def test_bad_binary_headers_are_400(
    client: httpx.Client, headers: dict[str, str], body: bytes, message: str
) -> None:
    assert message in assert_protocol_error(client.post(MLP, content=body, headers=headers), 400)


def _binary(
    parameters_size: int, payload: bytes, *, datatype: str = "FP32"
) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "datatype": datatype,
                    "shape": [1, 6],
                    "parameters": {"binary_data_size": parameters_size},
                }
            ]
        }
    ).encode()
    return header + payload, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize(
    ("size", "payload", "message"),
    [
        (24, bytes(23), "runs past the end"),
        (20, bytes(24), "bytes after the last binary input"),
        (20, bytes(20), "needs 24"),
    ],
)
def test_bad_binary_inputs_are_400(
    client: httpx.Client, size: int, payload: bytes, message: str
) -> None:
    body, headers = _binary(size, payload)
    assert message in assert_protocol_error(client.post(MLP, content=body, headers=headers), 400)


def test_binary_bool_must_be_zero_or_one(client: httpx.Client) -> None:
    body = _types_request("flag", None)
    raw = b""
    for spec in body["inputs"]:
        if spec["name"] == "flag":
            del spec["data"]
            spec["parameters"] = {"binary_data_size": 3}
            raw = b"\x00\x01\x02"
    header = json.dumps(body).encode()
    response = client.post(
        TYPES, content=header + raw, headers={"Inference-Header-Content-Length": str(len(header))}
    )
    assert "other than 0 and 1" in assert_protocol_error(response, 400)


def test_truncated_binary_bytes_elements_are_400(client: httpx.Client) -> None:
    payload = struct.pack("<I", 100) + b"short"
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(payload)},
                }
            ]
        }
    ).encode()
    response = client.post(
        LITE0,
        content=header + payload,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert "running past its data" in assert_protocol_error(response, 400)


# -- 404, 405, 413 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/models/no-such-model", 404),
        ("GET", "/v2/models/no-such-model/ready", 404),
        ("POST", "/v2/models/no-such-model/infer", 404),
        ("POST", "/v2/models/tiny-mlp/versions/9/infer", 404),
        ("GET", "/v2/models/tiny-mlp/versions/9", 404),
        ("GET", "/v2/no-such-endpoint", 404),
        ("GET", "/", 404),
        ("GET", "/v2/models/tiny-mlp/infer", 405),
        ("DELETE", "/v2/models/tiny-mlp", 405),
    ],
)
def test_unknown_models_versions_routes_and_methods(
    client: httpx.Client, method: str, path: str, status: int
) -> None:
    response = client.request(method, path, content=b"{}" if method == "POST" else None)
    assert_protocol_error(response, status)


def test_oversized_body_is_413_before_it_is_read(client: httpx.Client) -> None:
    response = client.post(MLP, content=b" " * (MAX_BODY + 1))
    assert "accepts at most" in assert_protocol_error(response, 413)


def test_oversized_chunked_body_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY // (1 << 20) + 1):
            yield b" " * (1 << 20)

    response = client.post(MLP, content=chunks())
    assert "exceeds" in assert_protocol_error(response, 413)


# -- property-based: nothing a client sends makes the server fail ------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)
_INPUT = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["features", "image", "input", "x", ""]),
        "datatype": st.sampled_from(["FP32", "FP16", "BYTES", "INT64", "BOOL", "X"]),
        "shape": st.lists(st.integers(min_value=-2, max_value=8), max_size=3),
        "data": st.lists(
            st.floats(allow_nan=False, width=32)
            | st.integers()
            | st.booleans()
            | st.text(max_size=4),
            max_size=12,
        ),
    },
    optional={"parameters": st.dictionaries(st.text(max_size=20), _JSON, max_size=3)},
)
_REQUEST = st.fixed_dictionaries(
    {"inputs": st.lists(_INPUT, max_size=3) | _JSON},
    optional={
        "id": _JSON,
        "parameters": st.dictionaries(st.text(max_size=20), _JSON, max_size=3),
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["logits", "probabilities", "output", "z"])},
                optional={
                    "parameters": st.dictionaries(
                        st.sampled_from(["classification", "binary_data", "other"]), _JSON
                    )
                },
            ),
            max_size=3,
        ),
    },
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=_REQUEST, target=st.sampled_from([MLP, LITE0, TYPES]))
def test_random_requests_never_fail_the_server(
    client: httpx.Client, body: dict[str, Any], target: str
) -> None:
    # json.dumps writes NaN/Infinity (httpx would refuse them): the server must cope.
    response = client.post(target, content=json.dumps(body).encode())
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert_protocol_error(response, 400)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.binary(max_size=256), header=st.none() | st.integers(min_value=-5, max_value=300))
def test_random_bytes_never_fail_the_server(
    client: httpx.Client, body: bytes, header: int | None
) -> None:
    headers = {} if header is None else {"Inference-Header-Content-Length": str(header)}
    response = client.post(MLP, content=body, headers=headers)
    assert_protocol_error(response, 400)
