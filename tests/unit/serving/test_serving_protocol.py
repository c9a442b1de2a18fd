"""Parsing inference requests: structure only, every refusal a RequestError (HTTP 400)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sealtorch.serving.errors import RequestError, show
from sealtorch.serving.protocol import (
    classification_count,
    parse_inference_request,
    render_error,
    render_response,
    wants_binary,
)


def _body(document: Any) -> bytes:
    return json.dumps(document).encode()


def test_a_full_request() -> None:
    request = parse_inference_request(
        _body(
            {
                "id": "42",
                "parameters": {"a": 1, "b": "x", "c": True, "d": 1.5},
                "inputs": [
                    {"name": "in0", "shape": [2, 2], "datatype": "UINT32", "data": [1, 2, 3, 4]},
                    {
                        "name": "in1",
                        "shape": [3],
                        "datatype": "BOOL",
                        "data": [True],
                        "parameters": {"p": 1},
                    },
                ],
                "outputs": [
                    {"name": "out0"},
                    {"name": "out1", "parameters": {"classification": 3}},
                ],
            }
        )
    )
    assert request.id == "42"
    assert dict(request.parameters) == {"a": 1, "b": "x", "c": True, "d": 1.5}
    assert [i.name for i in request.inputs] == ["in0", "in1"]
    assert request.inputs[0].shape == (2, 2)
    assert request.inputs[0].element_count == 4
    assert request.inputs[1].parameters["p"] == 1
    assert request.outputs is not None
    assert classification_count(request.outputs[1].parameters, "o") == 3
    assert classification_count(request.outputs[0].parameters, "o") is None


def test_outputs_absent_means_all_outputs() -> None:
    request = parse_inference_request(
        _body({"inputs": [{"name": "x", "shape": [], "datatype": "FP32", "data": [1]}]})
    )
    assert request.outputs is None
    assert request.id is None
    assert dict(request.parameters) == {}


def test_binary_inputs_are_cut_from_the_body_in_order() -> None:
    header = _body(
        {
            "inputs": [
                {
                    "name": "a",
                    "shape": [2],
                    "datatype": "INT8",
                    "parameters": {"binary_data_size": 2},
                },
                {"name": "b", "shape": [1], "datatype": "FP32", "data": [1.0]},
                {
                    "name": "c",
                    "shape": [3],
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": 3},
                },
            ]
        }
    )
    request = parse_inference_request(header + b"\x01\x02xyz", json_length=len(header))
    assert request.inputs[0].raw == b"\x01\x02"
    assert request.inputs[1].raw is None
    assert request.inputs[2].raw == b"xyz"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1],
                        "datatype": "FP32",
                        "data": [1],
                        "parameters": {"p": float("nan")},
                    }
                ]
            },
            "finite number",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1],
                        "datatype": "FP32",
                        "data": [1],
                        "parameters": {"p": None},
                    }
                ]
            },
            "finite number",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "parameters": []}
                ]
            },
            "must be a JSON object",
        ),
        (
            {"inputs": [{"name": "", "shape": [1], "datatype": "FP32", "data": [1]}]},
            "non-empty string",
        ),
        (
            {"inputs": [{"name": "x" * 300, "shape": [1], "datatype": "FP32", "data": [1]}]},
            "longer than 256",
        ),
        (
            {"inputs": [{"name": "x", "shape": [2**64], "datatype": "FP32", "data": [1]}]},
            "non-negative integers",
        ),
        ({"inputs": ["x"]}, "inputs[0] must be a JSON object"),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 300},
            "1 to 256",
        ),
        (
            {
                "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                "outputs": "all",
            },
            "outputs must be a list",
        ),
        (
            {
                "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                "outputs": [{}],
            },
            "missing 'name'",
        ),
        (
            {
                "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                "outputs": [{"name": "o", "x": 1}],
            },
            "unknown field",
        ),
        (
            {
                "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                "parameters": {str(i): i for i in range(70)},
            },
            "more than 64",
        ),
    ],
)
def test_structural_errors(document: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError, match=message.replace("[", r"\[")) as info:
        parse_inference_request(json.dumps(document).encode())
    assert info.value.status_code == 400


def test_binary_size_checks() -> None:
    header = _body(
        {
            "inputs": [
                {
                    "name": "a",
                    "shape": [1],
                    "datatype": "INT8",
                    "parameters": {"binary_data_size": -1},
                }
            ]
        }
    )
    with pytest.raises(RequestError, match="non-negative integer"):
        parse_inference_request(header, json_length=len(header))


@pytest.mark.parametrize(
    ("parameters", "default", "expected"),
    [({}, False, False), ({}, True, True), ({"binary_data": True}, False, True)],
)
def test_binary_output_flag(parameters: dict[str, Any], default: bool, expected: bool) -> None:
    assert wants_binary(parameters, default, "o") is expected


def test_responses_and_errors_render_as_compact_json() -> None:
    body, length = render_response({"outputs": [{"data": [1.5, float("inf")]}]}, ())
    assert body == b'{"outputs":[{"data":[1.5,Infinity]}]}'
    assert length is None
    body, length = render_response({"a": 1}, (b"\x00\x01", b"\x02"))
    assert body == b'{"a":1}\x00\x01\x02'
    assert length == len(b'{"a":1}')
    assert json.loads(render_error('bad "x"\n')) == {"error": 'bad "x"\n'}


def test_client_values_in_messages_are_escaped_and_short() -> None:
    assert show("a\nb") == "'a\\nb'"
    assert len(show("x" * 1000)) == 64


def _parse_or_refuse(body: bytes, length: int | None) -> None:
    """Either a structurally valid request or a 400, never another exception."""
    try:
        request = parse_inference_request(body, json_length=length)
    except RequestError as exc:
        status = exc.status_code
    else:
        status = 200
        assert 1 <= len(request.inputs) <= 256
        assert all(isinstance(i.name, str) and i.name for i in request.inputs)
    assert status in (200, 400)


@given(st.binary(max_size=512), st.none() | st.integers(min_value=-3, max_value=600))
def test_random_bodies_only_ever_raise_request_errors(body: bytes, length: int | None) -> None:
    _parse_or_refuse(body, length)


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.dictionaries(st.sampled_from(["id", "inputs", "outputs", "parameters"]), _VALUES, max_size=4)
)
def test_random_documents_only_ever_raise_request_errors(document: dict[str, Any]) -> None:
    _parse_or_refuse(json.dumps(document).encode(), None)
