"""Large JSON requests, read with bounded memory: the data arrays cut out of the text and parsed
a chunk at a time accept exactly what ``json.loads`` accepts (same values, same refusals, at
every chunk boundary), and the limits answer 413 before anything is parsed."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sealtorch.serving.errors import PayloadTooLargeError, RequestError
from sealtorch.serving.jsondata import MAX_STRUCTURE_VALUES, JsonArray, load_request_json
from sealtorch.serving.protocol import parse_inference_request
from sealtorch.serving.tensors import decode_tensor

#: Every array is cut out and read in tiny chunks, whatever its size.
TINY = {"small_body": 0, "small_array": 0}


def _body(data: bytes, shape: list[int], datatype: str) -> bytes:
    head = json.dumps({"name": "x", "datatype": datatype, "shape": shape})
    return b'{"inputs": [' + head[:-1].encode() + b', "data": ' + data + b"}]}"


def _through_chunks(body: bytes, chunk_bytes: int) -> torch.Tensor:
    document = load_request_json(body, max_elements=10**9, chunk_bytes=chunk_bytes, **TINY)
    item = document["inputs"][0]
    return decode_tensor(
        datatype=item["datatype"], shape=tuple(item["shape"]), data=item["data"], where="x"
    )


def _through_json_loads(body: bytes) -> torch.Tensor:
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise RequestError("not JSON") from exc
    item = document["inputs"][0]
    return decode_tensor(
        datatype=item["datatype"], shape=tuple(item["shape"]), data=item["data"], where="x"
    )


def _outcome(read: Any, *args: Any) -> tuple[str, bytes]:
    try:
        tensor = read(*args)
    except RequestError:
        return ("refused", b"")
    return (str(tensor.dtype) + str(tuple(tensor.shape)), tensor.contiguous().numpy().tobytes())


def _nest(values: list[Any], shape: list[int]) -> list[Any]:
    if len(shape) <= 1:
        return values
    step = math.prod(shape[1:])
    return [_nest(values[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


_VALUES = {
    "FP64": st.floats(allow_nan=False) | st.integers(-(2**60), 2**60),
    "FP32": st.floats(width=32, allow_nan=False),
    "INT64": st.integers(-(2**63), 2**63 - 1),
    "UINT8": st.integers(0, 255),
    "BOOL": st.booleans(),
}
_MUTATIONS = st.sampled_from(
    [b"", b",", b"[", b"]", b" ", b"0", b"-", b"+", b".", b"e", b"N", b'"', b"{", b"true", b"null"]
)


@given(data=st.data())
def test_chunked_reading_accepts_exactly_what_json_loads_accepts(data: st.DataObject) -> None:
    datatype = data.draw(st.sampled_from(sorted(_VALUES)), label="datatype")
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3), label="shape")
    values = data.draw(
        st.lists(_VALUES[datatype], min_size=math.prod(shape), max_size=math.prod(shape))
    )
    nested = data.draw(st.booleans(), label="nested")
    separator = data.draw(st.sampled_from([",", ", ", " ,\n"]), label="separator")
    text = json.dumps(_nest(values, shape) if nested else values, separators=(separator, ":"))
    encoded = text.encode()
    if data.draw(st.booleans(), label="mutate"):
        at = data.draw(st.integers(0, len(encoded)), label="at")
        cut = data.draw(st.integers(0, 2), label="cut")
        encoded = encoded[:at] + data.draw(_MUTATIONS, label="insert") + encoded[at + cut :]
    body = _body(encoded, shape, datatype)
    chunk_bytes = data.draw(st.integers(1, 48), label="chunk_bytes")
    assert _outcome(_through_chunks, body, chunk_bytes) == _outcome(_through_json_loads, body)


def test_a_large_array_is_cut_out_and_read_in_chunks() -> None:
    values = [float(i) / 7 for i in range(3000)]
    body = _body(json.dumps(values).encode(), [1000, 3], "FP64")
    document = load_request_json(body, max_elements=10**6, small_body=1024, chunk_bytes=4096)
    data = document["inputs"][0]["data"]
    assert isinstance(data, JsonArray)
    assert data.separators == 2999
    chunks = list(data.chunks("x"))
    assert len(chunks) > 1
    assert [v for chunk, _ in chunks for v in chunk] == values
    assert {kinds for _, kinds in chunks} == {frozenset({int, float})}  # told from the text


def test_small_arrays_and_small_bodies_are_parsed_whole() -> None:
    body = _body(json.dumps(list(range(10))).encode(), [10], "INT64")
    assert load_request_json(body, max_elements=100)["inputs"][0]["data"] == list(range(10))
    long = load_request_json(body + b" " * 100_000, max_elements=100)
    assert long["inputs"][0]["data"] == list(range(10))  # a large body, but a small array


def test_arrays_named_data_elsewhere_are_parsed_like_the_rest() -> None:
    big = json.dumps(list(range(2000))).encode()
    body = b'{"parameters": {"data": ' + big + b'}, "inputs": [{"data": ' + big + b"}]}"
    document = load_request_json(body, max_elements=10**6, **TINY)
    assert document["parameters"]["data"] == list(range(2000))
    assert isinstance(document["inputs"][0]["data"], JsonArray)


def test_a_data_key_inside_a_string_is_only_text() -> None:
    big = json.dumps(list(range(2000)))
    body = json.dumps({"id": f'"data": {big}', "inputs": [{"data": [1, 2]}]}).encode()
    document = load_request_json(body, max_elements=10**6, **TINY)
    assert document["id"] == f'"data": {big}'


def test_more_values_than_the_limit_get_413_before_parsing() -> None:
    body = _body(b"[" + b"0," * 999 + b"0]", [1000], "FP32")
    with pytest.raises(PayloadTooLargeError) as refused:
        parse_inference_request(body, max_json_elements=999)
    message = str(refused.value)
    assert "holds 1,003 values; the limit is 999 (--max-json-elements)" in message
    assert "binary tensor data extension" in message
    assert "Inference-Header-Content-Length" in message
    assert refused.value.status_code == 413
    parse_inference_request(body, max_json_elements=1003)


def test_values_outside_arrays_of_numbers_are_bounded() -> None:
    strings = json.dumps(["a"] * MAX_STRUCTURE_VALUES).encode()
    with pytest.raises(PayloadTooLargeError, match="outside arrays of numbers"):
        parse_inference_request(_body(strings, [MAX_STRUCTURE_VALUES], "BYTES"))
    numbers = b"[" + b"0," * MAX_STRUCTURE_VALUES + b"0]"  # cut out: no structure limit
    request = parse_inference_request(_body(numbers, [MAX_STRUCTURE_VALUES + 1], "FP32"))
    assert isinstance(request.inputs[0].data, JsonArray)


def test_the_json_must_be_utf8() -> None:
    document = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}
    text = json.dumps(document)
    parse_inference_request(b"\xef\xbb\xbf" + text.encode())  # a UTF-8 byte order mark is fine
    with pytest.raises(RequestError, match="not UTF-8"):
        parse_inference_request(text.encode("utf-16"))


@pytest.mark.parametrize(
    ("data", "shape", "message"),
    [
        (b"[" + b"[1,2]," * 999 + b"[1,2]]", [1000, 3], "nested, but not like its shape"),
        (b"[" + b"[1,2]," * 999 + b"[1,2]]", [2000], "nested, but not like its shape"),
        (b"[" + b"[]," * 999 + b"[1]]", [1000, 0], "holds values"),
        (b"[" + b"1," * 999 + b"1]", [1001], "holds 1,000 elements"),
    ],
)
def test_layouts_are_checked_before_values_are_read(
    data: bytes, shape: list[int], message: str
) -> None:
    with pytest.raises(RequestError, match=message):
        _through_chunks(_body(data, shape, "FP32"), 64)


def test_empty_rows_are_an_empty_tensor() -> None:
    tensor = _through_chunks(_body(b"[" + b"[]," * 999 + b"[]]", [1000, 0], "FP32"), 64)
    assert tensor.shape == (1000, 0)
