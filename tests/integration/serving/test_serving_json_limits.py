"""Large JSON requests over real HTTP: tensors parsed a chunk at a time are exact and strictly
typed, too many values get 413 with the way out (the binary extension), and malformed large
data — nesting, layouts, counts, shapes — gets 400 before it is parsed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import serving_factories
import torch
from serving_helpers import assert_protocol_error, by_name, output_tensor, tensor_input

from sealtorch.serving.jsondata import DEFAULT_MAX_JSON_ELEMENTS

MLP = "/v2/models/tiny-mlp/infer"
TYPES = "/v2/models/types/infer"
#: Rows of six features that make a body well past the size parsed in one piece.
ROWS = 20_000


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=300) as c:
        yield c


def _features(data: bytes, shape: tuple[int, ...] = (ROWS, 6), datatype: str = "FP32") -> bytes:
    """A tiny-mlp request with ``data`` (JSON text) spliced in as is."""
    head = json.dumps({"name": "features", "datatype": datatype, "shape": list(shape)})
    return b'{"inputs": [' + head[:-1].encode() + b', "data": ' + data + b"}]}"


def _flat(count: int, value: bytes = b"0.5") -> bytes:
    return b"[" + b",".join([value] * count) + b"]"


def test_large_tensors_of_every_datatype_are_exact(client: httpx.Client) -> None:
    inputs = serving_factories.example_inputs(batch=1024)
    for nested in (False, True):
        body = json.dumps(
            {
                "inputs": [
                    tensor_input(name, tensor, nested=nested)
                    for name, tensor in zip(serving_factories.TYPE_INPUTS, inputs, strict=True)
                ]
            }
        ).encode()
        assert len(body) > 64 * 1024  # large: its data arrays are read apart from the rest
        response = client.post(TYPES, content=body)
        assert response.status_code == 200, response.text
        with torch.inference_mode():
            expected = serving_factories.AllTypes().eval()(*inputs)
        outputs = by_name(response.json())
        for name, tensor in expected.items():
            assert torch.equal(output_tensor(outputs[name]), tensor), (name, nested)


def test_too_many_values_get_413_with_the_way_out(client: httpx.Client) -> None:
    rows = DEFAULT_MAX_JSON_ELEMENTS // 6 + 1
    body = _features(_flat(rows * 6, b"0"), (rows, 6))
    message = assert_protocol_error(client.post(MLP, content=body), 413)
    assert f"the limit is {DEFAULT_MAX_JSON_ELEMENTS:,} (--max-json-elements)" in message
    assert "binary tensor data extension" in message
    assert "Inference-Header-Content-Length" in message


def test_strings_beyond_the_structure_limit_get_413(client: httpx.Client) -> None:
    data = json.dumps(["a"] * 70_000).encode()
    body = b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [70000], "data": '
    message = assert_protocol_error(client.post(MLP, content=body + data + b"}]}"), 413)
    assert "outside arrays of numbers" in message


def _rows(count: int) -> list[bytes]:
    return [b"[" + b",".join([b"0.25"] * 6) + b"]"] * count


BAD_LARGE_DATA: list[tuple[str, bytes, tuple[int, ...], str, str]] = [
    ("one value too few", _flat(ROWS * 6 - 1), (ROWS, 6), "FP32", "holds 119,999 elements"),
    ("one value too many", _flat(ROWS * 6 + 1), (ROWS, 6), "FP32", "holds 120,001 elements"),
    ("a huge shape", _flat(ROWS * 6), (2**40, 6), "FP32", "the limit is"),
    (
        "nested unlike the shape",
        b"[" + b",".join(_rows(ROWS // 2)) + b"]",
        (ROWS, 6),
        "FP32",
        "nested, but not like its shape",
    ),
    (
        "a missing row",
        b"[" + b",".join(_rows(ROWS - 1)) + b",[]]",
        (ROWS, 6),
        "FP32",
        "nested, but not like its shape",
    ),
    ("deep nesting", b"[" * 100_000 + b"1,2" + b"]" * 100_000, (ROWS, 6), "FP32", "nested"),
    ("an empty value", _flat(ROWS * 6 - 1)[:-5] + b",,0.5]", (ROWS, 6), "FP32", "not valid"),
    ("a trailing comma", _flat(ROWS * 6 - 1)[:-1] + b",]", (ROWS, 6), "FP32", "not valid JSON"),
    ("a boolean among floats", _flat(ROWS * 6)[:-4] + b"true]", (ROWS, 6), "FP32", "only numbers"),
    ("booleans for floats", _flat(ROWS * 6, b"true"), (ROWS, 6), "FP32", "only numbers"),
    ("a word", _flat(ROWS * 6)[:-4] + b"x.5]", (ROWS, 6), "FP32", "not valid JSON"),
    ("a leading plus", _flat(ROWS * 6)[:-4] + b"+0.5]", (ROWS, 6), "FP32", "not valid JSON"),
    ("null", _flat(ROWS * 6)[:-4] + b"null]", (ROWS, 6), "FP32", "only numbers"),
]


@pytest.mark.parametrize(
    ("data", "shape", "datatype", "message"),
    [case[1:] for case in BAD_LARGE_DATA],
    ids=[case[0] for case in BAD_LARGE_DATA],
)
def test_malformed_large_data_gets_400(
    client: httpx.Client, data: bytes, shape: tuple[int, ...], datatype: str, message: str
) -> None:
    body = _features(data, shape, datatype)
    assert len(body) > 64 * 1024
    assert message in assert_protocol_error(client.post(MLP, content=body), 400)


def test_a_string_among_many_numbers_gets_413(client: httpx.Client) -> None:
    body = _features(_flat(ROWS * 6)[:-4] + b'"0"]')
    message = assert_protocol_error(client.post(MLP, content=body), 413)
    assert "outside arrays of numbers" in message  # no longer a tensor's data array


WRONG_VALUES: list[tuple[str, Any, str]] = [
    ("flag", 1, "only true/false for BOOL"),
    ("i64", 1.0, "only integers for INT64"),
    ("i64", True, "only integers for INT64"),
    ("u8", 256, "outside the UINT8 range"),
    ("i8", -129, "outside the INT8 range"),
    ("i64", 2**63, "outside the INT64 range"),
    ("f16", False, "only numbers for FP16"),
]


@pytest.mark.parametrize(("name", "value", "message"), WRONG_VALUES, ids=repr)
def test_values_are_typed_strictly_in_large_data(
    client: httpx.Client, name: str, value: Any, message: str
) -> None:
    inputs = serving_factories.example_inputs(batch=1024)
    document: dict[str, Any] = {
        "inputs": [
            tensor_input(input_name, tensor)
            for input_name, tensor in zip(serving_factories.TYPE_INPUTS, inputs, strict=True)
        ]
    }
    target = next(item for item in document["inputs"] if item["name"] == name)
    target["data"][-1] = value
    body = json.dumps(document).encode()
    assert len(body) > 64 * 1024
    assert message in assert_protocol_error(client.post(TYPES, content=body), 400)
