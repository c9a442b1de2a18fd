"""Decrypting a sealed state dict straight onto an accelerator (``device="cuda"``).

Each decryption thread opens its chunks into its own small pinned host buffer and copies each
one, once authenticated, into one device buffer as large as the plaintext, on its own CUDA
stream: host memory stays at a chunk per thread whatever the model's size, and the copies run
while the next chunks decrypt. Only what the host needs - the manifest and the safetensors
header at the front, the carried files (config, tokenizer...) at the end - is also written into
a host buffer, which stays sparse (pages never written cost no memory). The tensors are then
views of the device buffer, 64-byte aligned like the host path's.

Security is the host path's (:mod:`sealtorch.sealed.parallel`): every chunk is authenticated
before it is copied anywhere, and nothing is returned before every chunk of every file has
authenticated; on failure the device buffer, which then holds unauthenticated bytes, is dropped.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from sealtorch.errors import ConfigError, PayloadError
from sealtorch.payloads.manifest import Manifest, parse_prefix
from sealtorch.sealed.parallel import decrypt_parts, decrypt_threads

if TYPE_CHECKING:
    import torch

    from sealtorch.sealed.reader import SealedReader

__all__ = [
    "DevicePlaintext",
    "decrypt_to_device",
    "resolve_device",
    "tensors_on_device",
]

_U32 = struct.Struct(">I")  # the manifest length (docs/format.md)
_U64 = struct.Struct("<Q")  # the safetensors header length
#: What a device may be named, for messages.
DEVICES: Final = "cpu, cuda or cuda:N"


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """The accelerator to load onto, or None for host memory (``None`` or ``"cpu"``).

    Refuses, with a one-line error, a device this machine does not have.
    """
    if device is None:
        return None
    import torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"unknown device {device!r} (use {DEVICES})") from exc
    if resolved.type == "cpu":
        return None
    if resolved.type != "cuda":
        raise ConfigError(f"sealtorch loads models onto {DEVICES}, not {device!r}")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} asked for, but no CUDA device is available here "
            "(torch.cuda.is_available() is False)"
        )
    count = torch.cuda.device_count()
    if (resolved.index or 0) >= count:
        raise ConfigError(f"device {device!r} asked for, but this machine has {count} CUDA devices")
    return resolved


@dataclass
class DevicePlaintext:
    """A decrypted model whose tensor data lies on a device."""

    manifest: Manifest
    #: The whole plaintext's size; only the manifest, the safetensors header and the carried
    #: files are written (the rest reads as zeros and costs no memory).
    host: mmap.mmap
    #: The whole plaintext on the device (uint8).
    data: torch.Tensor


class _StagingSink:
    """One worker's pinned staging buffer and CUDA stream (a plain buffer for ``cpu``)."""

    def __init__(
        self,
        size: int,
        data: torch.Tensor,
        host: memoryview,
        host_ranges: list[tuple[int, int]],
    ) -> None:
        import torch

        device = data.device
        cuda = device.type == "cuda"
        self._torch = torch
        self._buffer = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=cuda)
        self._view = memoryview(cast(Any, self._buffer.numpy()))
        self._data = data
        self._host = host
        self._host_ranges = host_ranges
        self._stream: Any = torch.cuda.Stream(device) if cuda else None  # type: ignore[no-untyped-call]

    def staging(self, size: int) -> memoryview:
        return self._view[:size]

    def deliver(self, start: int, end: int) -> None:
        for low, high in self._host_ranges:
            a, b = max(low, start), min(high, end)
            if a < b:
                self._host[a:b] = self._view[a - start : b - start]
        if start == end:
            return
        source = self._buffer[: end - start]
        if self._stream is None:
            self._data[start:end].copy_(source)
            return
        with self._torch.cuda.stream(self._stream):
            self._data[start:end].copy_(source, non_blocking=True)
        self._stream.synchronize()  # the staging buffer is reused for the next chunk

    def close(self) -> None:
        self._view.release()


def decrypt_to_device(
    reader: SealedReader,
    cek: bytes,
    device: torch.device,
    *,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DevicePlaintext | None:
    """Authenticate and decrypt a sealed state dict onto ``device``.

    Returns None, having decrypted only its first chunks, for a model that is not a state dict
    (a program: the caller loads it on the host and moves it). ``device`` may be ``cpu`` too
    (the same staged path, which is how it is tested without a GPU).
    """
    import torch

    parts = reader.fd_parts()
    if parts is None:
        raise ConfigError("loading onto a device needs the sealed model as a file")
    total = reader.plaintext_size
    count = decrypt_threads(threads)
    host = mmap.mmap(-1, max(total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    host_view = memoryview(host)
    placed = torch.empty(total, dtype=torch.uint8, device=device)
    data: torch.Tensor | None = placed
    largest = max(min(p.body.chunk_size, p.body.plaintext_size) for p in parts)
    try:
        front = [(0, total)]  # until the header is known, every chunk also goes to the host

        def sink(ranges: list[tuple[int, int]]) -> Callable[[], _StagingSink]:
            return lambda: _StagingSink(largest, placed, host_view, ranges)

        # The front, one chunk at a time, until the manifest and the safetensors header are in.
        position = 0
        manifest: Manifest | None = None
        header_end = None
        while header_end is None or position < header_end:
            if position >= total:
                raise PayloadError("the body is too short to hold its manifest")
            position = decrypt_parts(
                parts,
                cek,
                None,
                threads=1,
                sink=sink(front),
                start=position,
                end=position + 1,
                progress=progress,
            )
            manifest, header_end = _front(host, position, total)
            if manifest is not None and manifest.kind != "safetensors":
                return None
        if manifest is None:  # pragma: no cover - header_end is only set with a manifest
            raise PayloadError("the body is too short to hold its manifest")
        tail = [(manifest.payload_offset + manifest.payload_size, total)]
        decrypt_parts(
            parts, cek, None, threads=count, sink=sink(tail), start=position, progress=progress
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        data = None
        return DevicePlaintext(manifest=manifest, host=host, data=placed)
    finally:
        host_view.release()
        if data is not None:  # failed or not a state dict: drop what was decrypted
            del data, placed
            host.close()


def _front(host: mmap.mmap, position: int, total: int) -> tuple[Manifest | None, int | None]:
    """The manifest and where the safetensors header ends, once ``host[:position]`` holds
    them (else None: decrypt further)."""
    if position < 4:
        return None, None
    (length,) = _U32.unpack(host[:4])
    if position < 4 + length:
        return None, None
    manifest = parse_prefix(host, plaintext_size=total)
    if manifest.kind != "safetensors":
        return manifest, None
    if position < manifest.payload_offset + 8:
        return manifest, None
    (header,) = _U64.unpack(host[manifest.payload_offset : manifest.payload_offset + 8])
    return manifest, manifest.payload_offset + 8 + min(header, manifest.payload_size)


def tensors_on_device(plaintext: DevicePlaintext) -> dict[str, torch.Tensor]:
    """The state dict, as views of the device buffer (header read from the host copy)."""
    from sealtorch.payloads.tensors import device_tensors

    manifest = plaintext.manifest
    tensors = device_tensors(
        plaintext.host,
        plaintext.data,
        offset=manifest.payload_offset,
        size=manifest.payload_size,
        align=manifest.payload_align,
    )
    plaintext.host.close()
    return tensors
