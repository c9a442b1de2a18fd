from __future__ import annotations

import json
import mmap
import struct
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load

from sealtorch.errors import PayloadError
from sealtorch.payloads.tensors import (
    SafetensorsPlan,
    device_tensors,
    parse_header,
    read_safetensors,
    tensors_from_buffer,
)

ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]


def _random(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, dtype=dtype)


def _sample() -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(ALL_DTYPES):
        sd[f"t{i}.matrix"] = _random((3, 5), dtype)
        sd[f"t{i}.scalar"] = _random((), dtype)
        sd[f"t{i}.empty"] = _random((0, 4), dtype)
    sd["transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    sd["strided"] = torch.arange(20, dtype=torch.int16)[::3]
    sd["param"] = torch.nn.Parameter(torch.ones(2, 2))
    # odd byte sizes: each would leave the next tensor misaligned in a packed layout
    sd["bf16_row_of_3"] = torch.randn(1, 3).to(torch.bfloat16)
    sd["one_int8"] = torch.tensor([7], dtype=torch.int8)
    sd["one_bool"] = torch.tensor([True])
    sd["after_odd"] = torch.randn(5, 7)
    sd["num_batches_tracked"] = torch.tensor(3, dtype=torch.int64)
    return sd


def _serialise(plan: SafetensorsPlan) -> bytes:
    return b"".join(bytes(piece) for piece in plan.stream())


def _to_buffer(data: bytes, prefix: int = 64) -> mmap.mmap:
    buffer = mmap.mmap(-1, prefix + len(data))
    buffer[prefix:] = data
    return buffer


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name].detach(), b[name].detach()), name


def test_packed_stream_is_a_valid_safetensors_file_for_the_official_library() -> None:
    sd = _sample()
    plan = SafetensorsPlan(sd, align=None)
    data = _serialise(plan)
    assert len(data) == plan.size
    theirs = st_load(data)
    assert set(theirs) == set(sd)
    for name, tensor in sd.items():
        assert torch.equal(theirs[name], tensor.detach()), name


@pytest.mark.parametrize("align", [64, None])
def test_round_trip_through_one_buffer_keeps_order_and_values(align: int | None) -> None:
    sd = _sample()
    data = _serialise(SafetensorsPlan(sd, align=align))
    buffer = _to_buffer(data)
    loaded = tensors_from_buffer(buffer, offset=64, size=len(data), align=align)
    _assert_same(loaded, sd)


@pytest.mark.parametrize("align", [64, None])
def test_every_loaded_tensor_is_64_byte_aligned(align: int | None) -> None:
    data = _serialise(SafetensorsPlan(_sample(), align=align))
    loaded = tensors_from_buffer(_to_buffer(data), offset=64, size=len(data), align=align)
    misaligned = [name for name, t in loaded.items() if t.data_ptr() % 64]
    assert misaligned == []


def test_aligned_tensors_are_views_of_the_one_buffer() -> None:
    sd = _sample()
    plan = SafetensorsPlan(sd)
    data = _serialise(plan)
    assert all(entry.start % 64 == 0 for entry in plan.entries)
    buffer = _to_buffer(data)
    loaded = tensors_from_buffer(buffer, offset=64, size=len(data), align=64)
    base = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    for name, tensor in loaded.items():
        if tensor.numel() == 0:
            continue
        offset = tensor.data_ptr() - base
        assert 0 <= offset < len(buffer), name
    # writes through a tensor land in the buffer: no copy was made
    first = next(t for t in loaded.values() if t.dtype == torch.float32 and t.numel())
    position = first.data_ptr() - base
    first.view(-1)[0] = 1.5
    assert struct.unpack("<f", buffer[position : position + 4])[0] == 1.5


def test_packed_layout_puts_largest_elements_first() -> None:
    plan = SafetensorsPlan({"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(3)}, align=None)
    assert len(plan.header) % 64 == 0
    assert [e.name for e in plan.entries] == ["b", "a"]
    assert plan.entries[0].start == 0
    assert plan.entries[1].start == 12


def test_aligned_layout_keeps_order_and_pads_with_zeros() -> None:
    plan = SafetensorsPlan({"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(3)})
    assert len(plan.header) % 64 == 0
    assert [(e.name, e.start, e.end) for e in plan.entries] == [("a", 0, 3), ("b", 64, 76)]
    data = _serialise(plan)
    assert data[len(plan.header) + 3 : len(plan.header) + 64] == bytes(61)
    assert plan.size == len(data)


def test_packed_payloads_are_copied_aligned_views_are_not() -> None:
    sd = {"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(3)}
    for align, shares in ((64, True), (None, False)):
        data = _serialise(SafetensorsPlan(sd, align=align))
        buffer = _to_buffer(data)
        loaded = tensors_from_buffer(buffer, offset=64, size=len(data), align=align)
        base = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
        inside = base <= loaded["b"].data_ptr() < base + len(buffer)
        assert inside is shares


def test_metadata_is_kept_and_format_is_pt() -> None:
    data = _serialise(SafetensorsPlan({"a": torch.ones(1)}, metadata={"k": "v"}))
    metadata, _, _ = parse_header(data, offset=0, size=len(data), align=64)
    assert metadata == {"format": "pt", "k": "v"}
    buffer = _to_buffer(data)
    assert read_safetensors(buffer, offset=64, size=len(data), align=64)[0] == metadata


@pytest.mark.parametrize(
    ("state_dict", "message"),
    [
        ({"a": torch.ones(2, dtype=torch.complex64)}, "dtype"),
        ({"a": torch.ones(2, dtype=torch.float8_e4m3fn)}, "dtype"),
        ({"a": torch.ones(2).to_sparse()}, "sparse"),
        ({"a": torch.empty(2, device="meta")}, "meta"),
        ({"a": 3}, "not a tensor"),
        ({"__metadata__": torch.ones(1)}, "invalid tensor name"),
        ({"": torch.ones(1)}, "invalid tensor name"),
    ],
)
def test_unsupported_state_dicts(state_dict: dict[str, Any], message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        SafetensorsPlan(state_dict)


def _payload(header: dict[str, Any], data: bytes, *, misalign: int = 0) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * ((-(8 + len(text)) % 8) + misalign)
    return struct.pack("<Q", len(text)) + text + data


def _entry(dtype: str, shape: list[int], start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x01\x00", "too short"),
        (struct.pack("<Q", 10**9) + b"{}", "header length"),
        (struct.pack("<Q", 2) + b"[]", "JSON object"),
        (struct.pack("<Q", 4) + b"{,,}", "not valid JSON"),
        (
            _payload({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, bytes(12)),
            "overlap",
        ),
        (
            _payload({"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)}, bytes(12)),
            "gaps",
        ),
        (_payload({"a": _entry("F32", [2], 0, 8)}, bytes(12)), "does not end"),
        (_payload({"a": _entry("F32", [4], 0, 16)}, bytes(8)), "out-of-range"),
        (_payload({"a": _entry("F32", [3], 0, 8)}, bytes(8)), "disagree"),
        (_payload({"a": _entry("C64", [1], 0, 8)}, bytes(8)), "unsupported dtype"),
        (_payload({"a": _entry("F32", [-2], 0, 8)}, bytes(8)), "invalid shape"),
        (_payload({"a": _entry("F32", [2.0], 0, 8)}, bytes(8)), "not valid JSON"),
        (_payload({"a": _entry("F32", [True], 0, 8)}, bytes(8)), "invalid shape"),
        (_payload({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)), "must have"),
        (_payload({"a": {**_entry("F32", [1], 0, 4), "x": 1}}, bytes(4)), "must have"),
        (_payload({"__metadata__": {"k": 1}}, b""), "__metadata__"),
        (_payload({"a": _entry("F32", [1], 0, 4)}, bytes(4), misalign=1), "aligned"),
    ],
)
def test_strict_inner_header_validation(payload: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        parse_header(payload, offset=0, size=len(payload))


def _aligned(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 64)
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (  # packed, where the aligned layout puts b at 64
            _aligned({"a": _entry("U8", [1], 0, 1), "b": _entry("U8", [4], 1, 5)}, bytes(5)),
            "next multiple of 64",
        ),
        (  # a gap of a whole extra block
            _aligned({"a": _entry("U8", [1], 0, 1), "b": _entry("U8", [1], 128, 129)}, bytes(129)),
            "next multiple of 64",
        ),
        (
            _aligned(
                {"a": _entry("U8", [1], 0, 1), "b": _entry("U8", [1], 64, 65)},
                b"\x01" + b"\x00" * 10 + b"\x07" + bytes(52) + b"\x01",
            ),
            "padding between",
        ),
        (_aligned({"a": _entry("U8", [1], 0, 1)}, bytes(64)), "does not end"),
        (_payload({"a": _entry("F32", [1], 0, 4)}, bytes(4)), "start 64-byte aligned"),
    ],
)
def test_strict_aligned_layout_validation(payload: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        parse_header(payload, offset=0, size=len(payload), align=64)


def test_unknown_alignment_is_refused() -> None:
    payload = _aligned({"a": _entry("U8", [1], 0, 1)}, bytes(1))
    with pytest.raises(PayloadError, match="alignment"):
        parse_header(payload, offset=0, size=len(payload), align=32)


def test_duplicate_tensor_names_are_refused() -> None:
    entry = b'{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    text = b'{"a":' + entry + b',"a":' + entry + b"}"
    payload = struct.pack("<Q", len(text)) + text + b"\x00\x00"
    with pytest.raises(PayloadError, match="duplicate"):
        parse_header(payload, offset=0, size=len(payload))


def test_bool_tensors_must_hold_zero_or_one() -> None:
    payload = _payload({"flags": _entry("BOOL", [3], 0, 3)}, b"\x00\x01\x02")
    buffer = _to_buffer(payload)
    with pytest.raises(PayloadError, match="other than 0 and 1"):
        tensors_from_buffer(buffer, offset=64, size=len(payload), align=None)


def test_tensor_changing_size_while_streaming_is_caught() -> None:
    tensor = torch.ones(4)
    plan = SafetensorsPlan({"a": tensor})
    tensor.resize_(8)
    with pytest.raises(PayloadError, match="changed while"):
        _serialise(plan)


def _on_device(payload: bytes, align: int | None) -> dict[str, torch.Tensor]:
    """The device path: the header read from a host copy, the tensors views of a uint8 tensor
    (on the CPU here; a GPU buffer in use)."""
    host = _to_buffer(payload)
    data = torch.empty(len(host), dtype=torch.uint8)  # aligned, as a device allocation is
    data.copy_(torch.frombuffer(bytearray(bytes(host)), dtype=torch.uint8))
    return device_tensors(host, data, offset=64, size=len(payload), align=align)


@pytest.mark.parametrize("align", [None, 64])
def test_device_tensors_match_the_host_path(align: int | None) -> None:
    payload = _serialise(SafetensorsPlan(_sample(), align=align))
    expected = tensors_from_buffer(_to_buffer(payload), offset=64, size=len(payload), align=align)
    found = _on_device(payload, align)
    _assert_same(found, expected)
    assert all(t.data_ptr() % 64 == 0 for t in found.values() if t.numel())


def test_device_tensors_check_the_padding_and_bools_on_the_device() -> None:
    padded = _aligned(
        {"a": _entry("U8", [1], 0, 1), "b": _entry("U8", [1], 64, 65)},
        b"\x01" + b"\x00" * 10 + b"\x07" + bytes(52) + b"\x01",
    )
    with pytest.raises(PayloadError, match="padding between"):
        _on_device(padded, 64)
    flags = _payload({"flags": _entry("BOOL", [3], 0, 3)}, b"\x00\x01\x02")
    with pytest.raises(PayloadError, match="other than 0 and 1"):
        _on_device(flags, None)
