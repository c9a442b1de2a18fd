"""Tensor data of the Open Inference Protocol ↔ PyTorch tensors, exactly.

JSON numbers are IEEE doubles. Every floating-point input is parsed as a double and rounded
*once* to its target type, and every output is written as the shortest decimal that reads back
as the same double (Python's ``repr``), which is exact for FP16, BF16, FP32 and FP64 — so a
client that parses the JSON into doubles and casts to the output type gets the server's bits.
The binary tensor data extension carries raw little-endian bytes and is exact by construction.

Type rules for JSON data (the protocol lets the server coerce or refuse; sealtorch refuses
anything lossy or ambiguous): BOOL takes only ``true``/``false``; integer types take only
integers within range; floating-point types take numbers (integers included). Data may be
flat or nested in the tensor's natural shape.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Final

import numpy as np
import torch

from sealtorch.serving.errors import RequestError
from sealtorch.serving.jsondata import JsonArray
from sealtorch.serving.protocol import shape_text

__all__ = [
    "DTYPES",
    "MAX_ELEMENTS",
    "datatype_of",
    "decode_base64_elements",
    "decode_bytes_elements",
    "decode_tensor",
    "encode_binary",
    "encode_bytes_binary",
    "encode_json",
]

#: The largest tensor (in elements) a request may carry.
MAX_ELEMENTS: Final = 1 << 28

#: Protocol datatype → torch dtype (BYTES has no tensor type).
DTYPES: Final[dict[str, torch.dtype]] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
}
_DATATYPES: Final = {dtype: name for name, dtype in DTYPES.items()}
_NUMPY: Final[dict[str, Any]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
_FLOATS: Final = frozenset({"FP16", "FP32", "FP64", "BF16"})
_LENGTH: Final = struct.Struct("<I")

if sys.byteorder != "little":  # pragma: no cover - every TEE platform sealtorch targets is
    raise ImportError("sealtorch.serving needs a little-endian host (x86-64, arm64)")


def datatype_of(dtype: torch.dtype) -> str:
    """The protocol datatype of a torch dtype (``RequestError`` is not right here: a model
    producing an unsupported dtype is a load-time problem, reported as ``ValueError``)."""
    try:
        return _DATATYPES[dtype]
    except KeyError:
        raise ValueError(f"tensors of type {dtype} cannot be served") from None


def _count(shape: Sequence[int], where: str) -> int:
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise RequestError(
            f"{where} has {count:,} elements in shape {shape_text(shape)}; "
            f"the limit is {MAX_ELEMENTS:,}"
        )
    return count


def decode_tensor(
    *,
    datatype: str,
    shape: tuple[int, ...],
    data: object = None,
    raw: bytes | None = None,
    where: str,
) -> torch.Tensor:
    """Convert request data (JSON ``data`` or binary ``raw``) into a tensor of ``shape``.

    JSON data is checked against the shape (flat or nested) before any value is parsed, then
    converted a chunk at a time into the tensor: besides the tensor, memory holds one chunk's
    values (:data:`~sealtorch.serving.jsondata.CHUNK_BYTES` of text).
    """
    if datatype not in DTYPES:
        raise RequestError(f"{where} has datatype {datatype}, which is not a numeric tensor")
    count = _count(shape, where)
    if raw is not None:
        return _from_raw(raw, datatype=datatype, shape=shape, count=count, where=where)
    if isinstance(data, JsonArray):
        _check_layout(data, shape, count, where)
        if count == 0:
            return torch.empty(shape, dtype=DTYPES[datatype])
        return _fill(data.chunks(where), datatype=datatype, shape=shape, count=count, where=where)
    if not isinstance(data, list):
        raise RequestError(f"{where}.data must be a JSON array")
    values = _flat_values(data, shape, count, where)
    if count == 0:
        return torch.empty(shape, dtype=DTYPES[datatype])
    converted = _convert(values, datatype, where).reshape(shape)
    if datatype in _FLOATS:
        return _round_once(converted, datatype)
    return torch.from_numpy(converted.astype(_NUMPY[datatype], copy=False))


def _mismatch(where: str, shape: tuple[int, ...], count: int, found: str) -> RequestError:
    return RequestError(
        f"{where}.data holds {found}, but the shape is {shape_text(shape)} ({count:,} elements, "
        "flat or nested)"
    )


def _layout_length(shape: tuple[int, ...]) -> int:
    """Length of the brackets and commas of a JSON array nested like ``shape``."""
    length = 2 + max(shape[-1] - 1, 0)
    for dim in reversed(shape[:-1]):
        length = 2 + max(dim - 1, 0) + dim * length if dim else 2
    return length


def _layout(shape: tuple[int, ...]) -> bytes:
    """The brackets and commas of a JSON array nested like ``shape`` (``[[,],[,]]``)."""
    row = b"[" + b"," * max(shape[-1] - 1, 0) + b"]"
    for dim in reversed(shape[:-1]):
        row = b"[" + b",".join([row] * dim) + b"]"
    return row


def _check_layout(array: JsonArray, shape: tuple[int, ...], count: int, where: str) -> None:
    """A cut-out data array: flat with ``count`` values, or nested exactly like ``shape``
    (checked from its brackets and commas, before any value is parsed)."""
    if array.flat:
        values = array.separators + 1
        if values != count:
            raise _mismatch(where, shape, count, f"{values:,} elements")
        return
    layout = array.layout()
    if len(shape) < 2 or len(layout) != _layout_length(shape) or layout != _layout(shape):
        raise RequestError(
            f"{where}.data is nested, but not like its shape {shape_text(shape)} ({count:,} "
            "elements); send it flat (row-major) or nested exactly like the shape"
        )
    if count == 0 and array.holds_values():
        raise _mismatch(where, shape, count, "values")


def _flat_values(data: list[Any], shape: tuple[int, ...], count: int, where: str) -> list[Any]:
    """The values of data parsed with the request (small): flat, or nested like ``shape``."""
    if not data or type(data[0]) is not list:  # flat (a list among the values is refused later)
        if len(data) != count:
            raise _mismatch(where, shape, count, f"{len(data):,} elements")
        return data
    try:
        array = np.asarray(data, dtype=object)
        values: list[Any] = array.reshape(-1).tolist()
        if list in set(map(type, values)):  # NumPy keeps the rows of a ragged array as lists
            raise ValueError("ragged")
    except (ValueError, TypeError, RecursionError) as exc:
        raise RequestError(
            f"{where}.data is not a rectangular array of numbers in shape {shape_text(shape)}"
        ) from exc
    if array.size != count or (array.shape != shape and array.ndim != 1):
        raise _mismatch(
            where, shape, count, f"{array.size:,} elements laid out as {shape_text(array.shape)}"
        )
    return values


def _fill(
    chunks: Iterable[tuple[list[Any], frozenset[type] | None]],
    *,
    datatype: str,
    shape: tuple[int, ...],
    count: int,
    where: str,
) -> torch.Tensor:
    """Convert chunks of JSON values into one tensor (allocated once, at its final size, and
    written a chunk at a time: the doubles of one chunk are all that is held besides)."""
    bfloat16 = datatype == "BF16"
    target = torch.empty(count, dtype=torch.bfloat16) if bfloat16 else None
    array = None if bfloat16 else np.empty(count, dtype=_NUMPY[datatype])
    position = 0
    for values, kinds in chunks:
        stop = position + len(values)
        if stop > count:
            raise _mismatch(where, shape, count, f"more than {count:,} elements")
        converted = _convert(values, datatype, where, kinds=kinds)
        if array is not None:
            with np.errstate(over="ignore"):  # beyond the range of FP16/FP32: infinity
                array[position:stop] = converted  # rounds doubles once to FP16/FP32
        elif target is not None:
            target[position:stop] = _round_once(converted, "BF16")
        position = stop
    if position != count:
        raise _mismatch(where, shape, count, f"{position:,} elements")
    if array is not None:
        return torch.from_numpy(array.reshape(shape))
    assert target is not None  # noqa: S101 - one of the two is set
    return target.reshape(shape)


def _convert(
    values: list[Any], datatype: str, where: str, *, kinds: frozenset[type] | None = None
) -> np.ndarray[Any, Any]:
    """JSON values → a NumPy array (doubles for floating-point types), strictly typed: BOOL
    takes only ``true``/``false``, integer types only integers in range, floating-point types
    only numbers (never booleans). ``kinds``: the values' Python types, if already known."""
    if kinds is None:
        kinds = frozenset(map(type, values))
    if datatype == "BOOL":
        if kinds - {bool}:
            raise RequestError(f"{where}.data must hold only true/false for BOOL")
        return np.array(values, dtype=np.bool_)
    if datatype in _FLOATS:
        if kinds - {int, float}:
            raise RequestError(f"{where}.data must hold only numbers for {datatype}")
        try:
            return np.array(values, dtype=np.float64)
        except OverflowError as exc:
            raise RequestError(f"{where}.data holds an integer too large for {datatype}") from exc
    if kinds - {int}:
        raise RequestError(f"{where}.data must hold only integers for {datatype}")
    info = np.iinfo(_NUMPY[datatype])
    exact: np.ndarray[Any, Any] | None
    try:
        exact = np.array(values, dtype=np.int64)
        low, high = int(exact.min()), int(exact.max())
    except OverflowError:  # beyond int64: compare as Python integers
        exact = None
        low, high = min(values), max(values)
    if low < info.min or high > info.max:
        raise RequestError(
            f"{where}.data holds values outside the {datatype} range {info.min}..{info.max}"
        )
    return exact if exact is not None else np.array(values, dtype=_NUMPY[datatype])


def _round_once(doubles: np.ndarray[Any, Any], datatype: str) -> torch.Tensor:
    """Round doubles to ``datatype`` exactly once (round to nearest, ties to even).

    PyTorch converts float64 to float16/bfloat16 through float32, which can round twice
    (1 + 2**-8 + 2**-30 would become 1.0 in bfloat16 instead of 1 + 2**-7). NumPy's float16
    conversion rounds once; bfloat16 goes through float32 rounded *to odd*, which makes the
    second rounding exact. Values beyond the type's range round to infinity, as IEEE rounding
    does (without NumPy's overflow warning).
    """
    if datatype == "FP64":
        return torch.from_numpy(doubles)
    if datatype in ("FP32", "FP16"):
        with np.errstate(over="ignore"):
            return torch.from_numpy(doubles.astype(_NUMPY[datatype]))
    with np.errstate(over="ignore", invalid="ignore"):
        single = doubles.astype(np.float32)
        widened = single.astype(np.float64)
        inexact = (widened != doubles) & np.isfinite(doubles)
        bits = single.view(np.uint32)
        bits -= (inexact & (np.abs(widened) > np.abs(doubles))).astype(np.uint32)  # truncate
        bits |= inexact.astype(np.uint32)  # ... and make the last bit sticky (odd)
    return torch.from_numpy(single).to(torch.bfloat16)


def _from_raw(
    raw: bytes, *, datatype: str, shape: tuple[int, ...], count: int, where: str
) -> torch.Tensor:
    dtype = DTYPES[datatype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != count * itemsize:
        raise RequestError(
            f"{where} has {len(raw)} bytes of binary data, but {datatype} "
            f"{shape_text(shape)} needs {count * itemsize}"
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    buffer = bytearray(raw)  # writable and owned, so the tensor may keep it
    if datatype == "BOOL" and buffer.translate(None, b"\x00\x01"):
        raise RequestError(f"{where} has BOOL bytes other than 0 and 1")
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def decode_bytes_elements(
    *, shape: tuple[int, ...], data: object = None, raw: bytes | None = None, where: str
) -> list[bytes]:
    """The elements of a BYTES tensor: JSON strings (UTF-8 encoded) or binary elements."""
    count = _count(shape, where)
    if raw is not None:
        elements: list[bytes] = []
        offset = 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise RequestError(f"{where} has a truncated BYTES length prefix")
            (length,) = _LENGTH.unpack_from(raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise RequestError(f"{where} has a BYTES element running past its data")
            elements.append(raw[offset : offset + length])
            offset += length
    else:
        if isinstance(data, JsonArray):
            raise RequestError(f"{where}.data must hold strings for BYTES")
        if not isinstance(data, list):
            raise RequestError(f"{where}.data must be a JSON array")
        flat = data
        if len(shape) > 1 and all(isinstance(item, list) for item in data):
            flat = _flatten(data, len(shape), where)
        if not all(isinstance(item, str) for item in flat):
            raise RequestError(f"{where}.data must hold strings for BYTES")
        elements = [item.encode("utf-8", "surrogatepass") for item in flat]
    if len(elements) != count:
        raise RequestError(
            f"{where} holds {len(elements)} BYTES elements, but the shape "
            f"{shape_text(shape)} has {count}"
        )
    return elements


def _flatten(data: list[Any], depth: int, where: str) -> list[Any]:
    items: list[Any] = data
    for _ in range(depth - 1):
        if not all(isinstance(item, list) for item in items):
            raise RequestError(f"{where}.data is not nested like its shape")
        items = [element for item in items for element in item]
    return items


def decode_base64_elements(elements: Sequence[bytes], where: str) -> list[bytes]:
    """Decode base64 text elements (standard alphabet, padding required)."""
    try:
        return [base64.b64decode(element, validate=True) for element in elements]
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{where} must hold base64-encoded images") from exc


def encode_json(tensor: torch.Tensor) -> list[Any]:
    """Flat row-major JSON data of a tensor (booleans, integers or exact floats)."""
    if tensor.dtype in (torch.uint16, torch.uint32, torch.uint64):
        # tolist() does not support every unsigned type; numpy does, exactly.
        return tensor.contiguous().view(-1).numpy().tolist()  # type: ignore[no-any-return]
    return tensor.reshape(-1).tolist()


def encode_binary(tensor: torch.Tensor) -> bytes:
    """Raw little-endian row-major bytes of a tensor (binary tensor data extension)."""
    return tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def encode_bytes_binary(elements: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)
