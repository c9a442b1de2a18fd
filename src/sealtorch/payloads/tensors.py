"""State dicts as safetensors byte streams: written tensor by tensor, read as zero-copy views.

Writing never builds the file in memory: :class:`SafetensorsPlan` computes the safetensors
header from tensor metadata alone, then :meth:`SafetensorsPlan.stream` yields the header and
each tensor's bytes in turn (a non-contiguous tensor is made contiguous on its own, one at a
time). The header is padded with spaces so the data starts 64-byte aligned. Two layouts:

* **aligned** (``align=64``, what sealing writes; payload layout 2): every tensor starts at a
  multiple of 64 bytes, the gaps are zero bytes. Viewed in a page-aligned buffer, every tensor
  is then 64-byte aligned like PyTorch's own allocations, so kernels (oneDNN, MKL) take the same
  paths - and give the same bits - as for the plain model.
* **packed** (``align=None``): a standard safetensors file, tensors by decreasing element size
  with no gaps (``sealtorch decrypt`` output; payload layout 1, what sealing wrote until 2026-12).

Reading (:func:`read_safetensors`) validates the safetensors header strictly - known dtypes,
shapes consistent with byte ranges, ranges in bounds, tiling the data in the declared layout,
aligned - and builds every tensor with ``torch.frombuffer`` as a view of the one decrypted
buffer. Packed payloads are copied into fresh (aligned) tensors, since their views would not
be 64-byte aligned.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from sealtorch.errors import PayloadError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPE_CODES",
    "TENSOR_ALIGNMENT",
    "SafetensorsPlan",
    "TensorEntry",
    "device_tensors",
    "parse_header",
    "plan_layout",
    "read_safetensors",
    "tensors_from_buffer",
]

#: safetensors dtype code -> element size in bytes.
ITEM_SIZES: Final[dict[str, int]] = {
    "F64": 8,
    "I64": 8,
    "F32": 4,
    "I32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
DTYPE_CODES: Final = tuple(ITEM_SIZES)
MAX_SAFETENSORS_HEADER: Final = 100 * 1024 * 1024
DATA_ALIGNMENT: Final = 64
#: Where every tensor of an aligned payload starts: PyTorch's CPU allocator aligns to 64 bytes.
TENSOR_ALIGNMENT: Final = 64
_U64 = struct.Struct("<Q")


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        "F64": torch.float64,
        "I64": torch.int64,
        "F32": torch.float32,
        "I32": torch.int32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }


def _check_byte_order() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise PayloadError("sealtorch's tensor payloads need a little-endian machine")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def plan_layout(
    items: Sequence[tuple[str, str, tuple[int, ...]]],
    *,
    metadata: Mapping[str, str] | None,
    align: int | None,
) -> tuple[bytes, list[TensorEntry], int]:
    """Lay out tensors ``(name, dtype code, shape)``: the padded header (``u64le N`` included),
    the entries in data order, and the data size.

    Aligned: the given order, each tensor at the next multiple of ``align``. Packed: largest
    elements first, which keeps every tensor aligned to its element size.
    """
    layout = list(items) if align else sorted(items, key=lambda item: -ITEM_SIZES[item[1]])
    position = 0
    entries: dict[str, TensorEntry] = {}
    for name, code, shape in layout:
        size = math.prod(shape) * ITEM_SIZES[code]
        if align:
            position += -position % align
        entries[name] = TensorEntry(name, code, tuple(shape), position, position + size)
        position += size
    header_obj: dict[str, Any] = {"__metadata__": {"format": "pt", **dict(metadata or {})}}
    for name, _, _ in items:  # the JSON keeps the given order
        entry = entries[name]
        header_obj[name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [entry.start, entry.end],
        }
    text = json.dumps(header_obj, separators=(",", ":"), ensure_ascii=False).encode()
    padded = len(text) + (-(8 + len(text)) % DATA_ALIGNMENT)
    header = _U64.pack(padded) + text.ljust(padded, b" ")
    return header, [entries[name] for name, _, _ in layout], position


class SafetensorsPlan:
    """The safetensors layout of a state dict, computed without touching tensor data."""

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        metadata: Mapping[str, str] | None = None,
        align: int | None = TENSOR_ALIGNMENT,
    ) -> None:
        import torch

        if align not in (None, TENSOR_ALIGNMENT):
            raise ValueError(f"align must be None or {TENSOR_ALIGNMENT}")

        _check_byte_order()
        codes = {dtype: code for code, dtype in _torch_dtypes().items()}
        items: list[tuple[str, torch.Tensor, str]] = []
        for name, tensor in state_dict.items():
            if not isinstance(name, str) or not name or name == "__metadata__":  # type: ignore[redundant-expr]
                raise PayloadError(f"invalid tensor name {name!r} in the state_dict")
            if not isinstance(tensor, torch.Tensor):
                raise PayloadError(
                    f"state_dict entry {name!r} is a {type(tensor).__name__}, not a tensor; "
                    "sealtorch seals plain state_dicts of tensors"
                )
            if tensor.layout != torch.strided or tensor.is_quantized:
                raise PayloadError(
                    f"tensor {name!r} is sparse or quantized; convert it to a dense tensor"
                )
            if tensor.device.type == "meta":
                raise PayloadError(f"tensor {name!r} is on the meta device and has no data")
            code = codes.get(tensor.dtype)
            if code is None:
                supported = ", ".join(str(d).removeprefix("torch.") for d in codes)
                raise PayloadError(
                    f"tensor {name!r} has dtype {tensor.dtype}, which sealtorch does not seal "
                    f"(supported: {supported})"
                )
            items.append((name, tensor, code))
        self.header, self.entries, self.data_size = plan_layout(
            [(name, code, tuple(tensor.shape)) for name, tensor, code in items],
            metadata=metadata,
            align=align,
        )
        by_name = {name: tensor for name, tensor, _ in items}
        self.align = align
        self._tensors = [by_name[entry.name] for entry in self.entries]
        self.size = len(self.header) + self.data_size

    @property
    def tensor_count(self) -> int:
        return len(self.entries)

    def stream(self) -> Iterator[memoryview]:
        """The safetensors file, piece by piece: header, then each tensor's bytes."""
        import torch

        yield memoryview(self.header)
        zeros = memoryview(bytes(TENSOR_ALIGNMENT))
        position = 0
        for entry, tensor in zip(self.entries, self._tensors, strict=True):
            if entry.start > position:
                yield zeros[: entry.start - position]
            position = entry.end
            if entry.end == entry.start:
                continue
            flat = tensor.detach()
            if flat.device.type != "cpu":
                flat = flat.cpu()
            flat = flat.contiguous().reshape(-1).view(torch.uint8)
            if flat.numel() != entry.end - entry.start:
                raise PayloadError(f"tensor {entry.name!r} changed while it was being sealed")
            yield memoryview(flat.numpy()).cast("B")  # type: ignore[arg-type]
            del flat


def parse_header(
    data: bytes | mmap.mmap,
    *,
    offset: int,
    size: int,
    align: int | None = None,
    check_padding: bool = True,
) -> tuple[dict[str, str], list[TensorEntry], int]:
    """Strictly validate the safetensors payload at ``data[offset:offset+size]``.

    ``align`` is the payload's layout: ``None`` for packed (a standard safetensors file: the
    tensors tile the data), ``64`` for aligned (each tensor at the next multiple of 64 after the
    previous one, zero bytes between). Returns (metadata, entries, data start relative to
    ``offset``). ``data`` is only sliced (copies for ``bytes``/``mmap``), so no view of it
    outlives this call. ``check_padding=False`` leaves the zero padding between tensors to the
    caller (whose tensor data is not in ``data``: :func:`device_tensors`).
    """
    if align not in (None, TENSOR_ALIGNMENT):
        raise PayloadError(f"unknown tensor alignment {align!r}")
    if size < 8:
        raise PayloadError("the safetensors payload is too short")
    (length,) = _U64.unpack(data[offset : offset + 8])
    if length > MAX_SAFETENSORS_HEADER or 8 + length > size:
        raise PayloadError("the safetensors header length is out of range")
    try:
        document = json.loads(
            bytes(data[offset + 8 : offset + 8 + length]).decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_float=_reject,
            parse_constant=_reject,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"the safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise PayloadError("the safetensors header must be a JSON object")
    metadata = document.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise PayloadError("safetensors __metadata__ must map strings to strings")
    data_start = 8 + length
    data_size = size - data_start
    if align and (offset + data_start) % align:
        raise PayloadError(f"the safetensors data does not start {align}-byte aligned")
    entries = []
    for name, info in document.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise PayloadError(f"safetensors entry {name!r} must have dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ITEM_SIZES:
            raise PayloadError(f"safetensors entry {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise PayloadError(f"safetensors entry {name!r} has an invalid shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise PayloadError(f"safetensors entry {name!r} has out-of-range data offsets")
        item = ITEM_SIZES[dtype]
        if math.prod(shape) * item != offsets[1] - offsets[0]:
            raise PayloadError(f"safetensors entry {name!r}: shape and byte range disagree")
        if (offset + data_start + offsets[0]) % item:
            raise PayloadError(f"safetensors entry {name!r} is not aligned to its element size")
        entries.append(TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1]))
    position = 0
    for entry in sorted(entries, key=lambda e: (e.start, e.end)):
        expected = position + (-position % align) if align else position
        if entry.start != expected:
            if align:
                raise PayloadError(
                    f"safetensors tensors overlap or do not start at the next multiple of {align}"
                )
            raise PayloadError("safetensors tensors overlap or leave gaps")
        gap = (
            data[offset + data_start + position : offset + data_start + entry.start]
            if check_padding
            else b""
        )
        if gap.strip(b"\x00"):
            raise PayloadError("the padding between safetensors tensors is not zero")
        position = entry.end
    if position != data_size:
        raise PayloadError("safetensors data does not end where the last tensor ends")
    return metadata, entries, data_start


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject(text: str) -> Any:
    raise ValueError(f"unexpected number {text}")


def read_safetensors(
    buffer: mmap.mmap, *, offset: int, size: int, align: int | None
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and state dict of the safetensors payload at ``buffer[offset:offset+size]``.

    An aligned payload (``align=64`` in a page-aligned ``buffer``) becomes views of ``buffer``,
    each 64-byte aligned, without a copy (the tensors keep ``buffer`` alive). A packed payload
    (``align=None``) is copied tensor by tensor into fresh storage from PyTorch's allocator,
    which is 64-byte aligned too; ``buffer`` is then no longer referenced. Zero-size tensors get
    their own empty storage. Tensors come in the header's order.
    """
    import torch

    _check_byte_order()
    dtypes = _torch_dtypes()
    metadata, entries, data_start = parse_header(buffer, offset=offset, size=size, align=align)
    base = offset + data_start
    result: dict[str, torch.Tensor] = {}
    for entry in entries:
        dtype = dtypes[entry.dtype]
        count = (entry.end - entry.start) // ITEM_SIZES[entry.dtype]
        if count == 0:
            result[entry.name] = torch.empty(entry.shape, dtype=dtype)
            continue
        tensor = torch.frombuffer(buffer, dtype=dtype, count=count, offset=base + entry.start)
        if dtype == torch.bool and bool((tensor.view(torch.uint8) > 1).any()):
            raise PayloadError(f"bool tensor {entry.name!r} holds values other than 0 and 1")
        if align is None:
            tensor = tensor.clone()
        result[entry.name] = tensor.view(entry.shape)
    return metadata, result


def device_tensors(
    header: mmap.mmap, data: torch.Tensor, *, offset: int, size: int, align: int | None
) -> dict[str, torch.Tensor]:
    """The state dict of the safetensors payload at ``[offset, offset+size)``, whose header is
    read from ``header`` (host memory) and whose tensors are views of ``data`` (a uint8
    tensor of the whole plaintext, on a device). Checks like :func:`read_safetensors`, the
    padding between tensors on the device; a packed payload is copied into aligned tensors."""
    import torch

    _check_byte_order()
    dtypes = _torch_dtypes()
    metadata, entries, data_start = parse_header(
        header, offset=offset, size=size, align=align, check_padding=False
    )
    del metadata
    base = offset + data_start
    gaps = []
    position = 0
    for entry in sorted(entries, key=lambda e: (e.start, e.end)):
        if entry.start > position:
            gaps.append(data[base + position : base + entry.start].any())
        position = entry.end
    if gaps and bool(torch.stack(gaps).any()):
        raise PayloadError("the padding between safetensors tensors is not zero")
    result: dict[str, torch.Tensor] = {}
    for entry in entries:
        dtype = dtypes[entry.dtype]
        raw = data[base + entry.start : base + entry.end]
        if align is None:
            raw = raw.clone()  # packed: element-aligned only, give it aligned storage
        tensor = raw.view(dtype)
        if dtype == torch.bool and bool((raw > 1).any()):
            raise PayloadError(f"bool tensor {entry.name!r} holds values other than 0 and 1")
        result[entry.name] = tensor.view(entry.shape)
    return result


def tensors_from_buffer(
    buffer: mmap.mmap, *, offset: int, size: int, align: int | None
) -> dict[str, torch.Tensor]:
    """The state dict of :func:`read_safetensors`."""
    return read_safetensors(buffer, offset=offset, size=size, align=align)[1]
