"""Protocol tensor data ↔ torch: exact in both directions, strict about types and shapes."""

from __future__ import annotations

import base64
import json
import math
import struct
from fractions import Fraction
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sealtorch.serving.errors import RequestError
from sealtorch.serving.tensors import (
    DTYPES,
    MAX_ELEMENTS,
    datatype_of,
    decode_base64_elements,
    decode_bytes_elements,
    decode_tensor,
    encode_binary,
    encode_bytes_binary,
    encode_json,
)


def _through_json(tensor: torch.Tensor) -> torch.Tensor:
    """Encode as the server does, parse as a client does, decode as the server does."""
    data = json.loads(json.dumps(encode_json(tensor)))
    return decode_tensor(
        datatype=datatype_of(tensor.dtype), shape=tuple(tensor.shape), data=data, where="t"
    )


@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64))
def test_fp32_values_survive_json_bit_for_bit(values: list[float]) -> None:
    tensor = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(_through_json(tensor), tensor)


@given(st.lists(st.floats(width=16, allow_nan=False), min_size=1, max_size=64))
def test_fp16_values_survive_json_bit_for_bit(values: list[float]) -> None:
    tensor = torch.tensor(values, dtype=torch.float16)
    assert torch.equal(_through_json(tensor), tensor)


@given(st.lists(st.floats(allow_nan=False), min_size=1, max_size=64))
def test_bf16_and_fp64_values_survive_json_bit_for_bit(values: list[float]) -> None:
    for dtype in (torch.bfloat16, torch.float64):
        tensor = torch.tensor(values, dtype=torch.float64).to(dtype)
        assert torch.equal(_through_json(tensor), tensor)


@pytest.mark.parametrize(
    ("datatype", "value", "expected"),
    [
        # Each value lies just above a midpoint of the target type; rounding through float32
        # first would lose the tail and round the midpoint to even (down) instead of up.
        ("BF16", 1 + 2**-8 + 2**-30, 1 + 2**-7),
        ("BF16", -(1 + 2**-8 + 2**-30), -(1 + 2**-7)),
        ("FP16", 1 + 2**-11 + 2**-40, 1 + 2**-10),
        ("BF16", 1 + 2**-8, 1.0),  # an exact midpoint: ties to even
        ("BF16", 1 + 3 * 2**-8, 1 + 2**-6),
        ("FP32", 1 + 2**-24, 1.0),
        ("BF16", 1e39, float("inf")),
        ("BF16", 2.0**-130, 2.0**-130),  # a subnormal
        ("BF16", 2.0**-140, 0.0),
    ],
)
def test_doubles_are_rounded_once_to_the_target_type(
    datatype: str, value: float, expected: float
) -> None:
    tensor = decode_tensor(datatype=datatype, shape=(1,), data=[value], where="t")
    assert tensor.dtype == DTYPES[datatype]
    assert tensor.item() == expected


def _bf16_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0] >> 16  # exact for bf16 values


def _bf16_value(bits: int) -> float:
    return float(struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0])


def _bf16_neighbours(value: float) -> list[float]:
    """A bfloat16 value near ``value`` and the ones next to it (same sign)."""
    approx = _bf16_bits(torch.tensor([value], dtype=torch.float64).to(torch.bfloat16).item())
    values = [_bf16_value(approx + step) for step in (-1, 0, 1)]
    return [v for v in values if math.isfinite(v)]


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-3e38, max_value=3e38))
def test_bfloat16_rounding_matches_exact_arithmetic(value: float) -> None:
    decoded = decode_tensor(datatype="BF16", shape=(1,), data=[value], where="t").item()

    def key(candidate: float) -> tuple[Fraction, int]:
        return (abs(Fraction(candidate) - Fraction(value)), _bf16_bits(candidate) & 1)

    assert decoded == min(_bf16_neighbours(value), key=key)


@pytest.mark.parametrize("datatype", ["INT8", "INT16", "INT32", "INT64", "UINT8"])
def test_integer_extremes_round_trip(datatype: str) -> None:
    info = torch.iinfo(DTYPES[datatype])
    tensor = torch.tensor([info.min, 0, info.max], dtype=DTYPES[datatype])
    assert torch.equal(_through_json(tensor), tensor)


@pytest.mark.parametrize("datatype", ["UINT16", "UINT32", "UINT64"])
def test_wide_unsigned_types_round_trip(datatype: str) -> None:
    dtype = DTYPES[datatype]
    high = {"UINT16": 2**16 - 1, "UINT32": 2**32 - 1, "UINT64": 2**64 - 1}[datatype]
    decoded = decode_tensor(datatype=datatype, shape=(3,), data=[0, 7, high], where="t")
    assert decoded.dtype == dtype
    assert encode_json(decoded) == [0, 7, high]


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("UINT8", [256], "outside the UINT8 range"),
        ("UINT8", [-1], "outside the UINT8 range"),
        ("INT8", [128], "outside the INT8 range"),
        ("INT64", [2**63], "outside the INT64 range"),
        ("INT64", [2**70], "outside the INT64 range"),
        ("INT64", [2**70 + 0.5], "only integers"),
        ("INT32", [1.0], "only integers"),
        ("INT32", ["1"], "only integers"),
        ("BOOL", [1], "only true/false"),
        ("BOOL", ["true"], "only true/false"),
        ("FP32", ["1.0"], "only numbers"),
        ("FP32", [None], "only numbers"),
        ("FP32", [{"a": 1}], "only numbers"),
        ("FP16", [True], "only numbers"),
    ],
)
def test_values_of_the_wrong_kind_are_refused(datatype: str, data: list[Any], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        decode_tensor(datatype=datatype, shape=(1,), data=data, where="t")


def test_flat_and_nested_data_are_both_accepted() -> None:
    expected = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    flat = decode_tensor(datatype="INT32", shape=(2, 3), data=list(range(6)), where="t")
    nested = decode_tensor(datatype="INT32", shape=(2, 3), data=[[0, 1, 2], [3, 4, 5]], where="t")
    assert torch.equal(flat, expected)
    assert torch.equal(nested, expected)


@pytest.mark.parametrize(
    ("shape", "data", "message"),
    [
        ((2, 3), [[0, 1, 2], [3, 4]], "rectangular"),
        ((2, 3), [[0, 1], [2, 3], [4, 5]], "laid out as [3, 2]"),
        ((2, 3), [0, 1, 2, 3, 4], "holds 5 elements"),
        ((2, 3), [[[0, 1, 2], [3, 4, 5]]], "laid out as [1, 2, 3]"),
        ((3,), 5, "must be a JSON array"),
    ],
)
def test_layouts_that_do_not_match_the_shape_are_refused(
    shape: tuple[int, ...], data: Any, message: str
) -> None:
    with pytest.raises(RequestError, match=message.replace("[", r"\[")):
        decode_tensor(datatype="INT32", shape=shape, data=data, where="t")


def test_empty_and_scalar_tensors() -> None:
    empty = decode_tensor(datatype="FP16", shape=(0, 3), data=[], where="t")
    assert empty.shape == (0, 3)
    assert empty.dtype == torch.float16
    scalar = decode_tensor(datatype="INT64", shape=(), data=[7], where="t")
    assert scalar.shape == ()
    assert scalar.item() == 7


def test_non_finite_floats_pass_through() -> None:
    tensor = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=torch.float32)
    text = json.dumps(encode_json(tensor))
    assert text == "[Infinity, -Infinity, NaN]"
    decoded = decode_tensor(datatype="FP32", shape=(3,), data=json.loads(text), where="t")
    assert torch.equal(decoded[:2], tensor[:2])
    assert decoded[2].isnan()


def test_element_count_is_bounded_before_anything_is_allocated() -> None:
    with pytest.raises(RequestError, match="the limit is"):
        decode_tensor(datatype="FP32", shape=(MAX_ELEMENTS + 1,), data=[], where="t")
    with pytest.raises(RequestError, match="the limit is"):
        decode_tensor(datatype="FP32", shape=(2**32, 2**32), raw=b"", where="t")


def test_bytes_is_not_a_numeric_tensor() -> None:
    with pytest.raises(RequestError, match="not a numeric tensor"):
        decode_tensor(datatype="BYTES", shape=(1,), data=["x"], where="t")


@pytest.mark.parametrize("datatype", sorted(DTYPES))
def test_binary_data_round_trips_every_datatype(datatype: str) -> None:
    dtype = DTYPES[datatype]
    if dtype == torch.bool:
        tensor = torch.tensor([[True, False, True], [False, False, True]])
    elif dtype.is_floating_point:
        tensor = torch.randn(2, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    else:
        tensor = torch.tensor([[0, 1, 2], [3, 4, 100]], dtype=torch.int64).to(dtype)
    raw = encode_binary(tensor)
    assert len(raw) == tensor.numel() * tensor.element_size()
    decoded = decode_tensor(datatype=datatype, shape=(2, 3), raw=raw, where="t")
    assert decoded.dtype == dtype
    assert torch.equal(decoded.view(torch.uint8), tensor.contiguous().view(torch.uint8))
    # The decoded tensor owns writable memory (no aliasing of the request body).
    decoded.view(-1)[0] = decoded.view(-1)[1]


def test_binary_data_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(RequestError, match="needs 12"):
        decode_tensor(datatype="INT32", shape=(3,), raw=bytes(11), where="t")
    with pytest.raises(RequestError, match="other than 0 and 1"):
        decode_tensor(datatype="BOOL", shape=(2,), raw=b"\x01\xff", where="t")


def test_bytes_elements_from_json_and_binary() -> None:
    assert decode_bytes_elements(shape=(2,), data=["a", "é"], where="t") == [b"a", "é".encode()]
    assert decode_bytes_elements(shape=(2, 1), data=[["a"], ["b"]], where="t") == [b"a", b"b"]
    raw = encode_bytes_binary([b"", b"\x00\xff", b"xyz"])
    assert raw == struct.pack("<I", 0) + struct.pack("<I", 2) + b"\x00\xff" + b"\x03\x00\x00\x00xyz"
    assert decode_bytes_elements(shape=(3,), raw=raw, where="t") == [b"", b"\x00\xff", b"xyz"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": (2,), "data": ["a"]}, "holds 1 BYTES elements"),
        ({"shape": (1,), "data": [b"a".hex(), 1][1:]}, "strings for BYTES"),
        ({"shape": (1,), "data": "abc"}, "must be a JSON array"),
        ({"shape": (1,), "raw": b"\x05\x00\x00"}, "truncated"),
        ({"shape": (1,), "raw": b"\x05\x00\x00\x00ab"}, "running past"),
        ({"shape": (2,), "raw": encode_bytes_binary([b"a"])}, "holds 1 BYTES elements"),
    ],
)
def test_bad_bytes_elements_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        decode_bytes_elements(where="t", **kwargs)


def test_base64_elements_are_strict() -> None:
    assert decode_base64_elements([base64.b64encode(b"\x00img").decode().encode()], "t") == [
        b"\x00img"
    ]
    for bad in (b"not base64!", b"abc", "é".encode()):
        with pytest.raises(RequestError, match="base64"):
            decode_base64_elements([bad], "t")


def test_unsupported_output_dtypes_are_a_load_problem() -> None:
    with pytest.raises(ValueError, match="cannot be served"):
        datatype_of(torch.complex64)
    assert {datatype_of(dtype) for dtype in DTYPES.values()} == set(DTYPES)


@pytest.mark.parametrize("datatype", ["FP16", "FP32"])
def test_doubles_beyond_the_range_round_to_infinity(datatype: str) -> None:
    tensor = decode_tensor(datatype=datatype, shape=(2,), data=[1e300, -1e300], where="t")
    assert tensor.tolist() == [float("inf"), float("-inf")]
