"""One strict reader: ``decrypt`` refuses every state_dict payload that loading refuses.

Each payload here authenticates (it is sealed under the right key), so only the payload checks
stand between it and the output; ``decrypt_model`` and ``load_state_dict`` must agree, and a
refused ``decrypt`` leaves no output file.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest

import sealtorch
from sealtorch.errors import PayloadError
from sealtorch.keys import DataKey
from sealtorch.payloads.manifest import Manifest
from sealtorch.sealed.keywrap import LocalKeyWrapper
from sealtorch.sealed.writer import SealedWriter

KEY = DataKey(bytes(range(32)))


def _safetensors(header: dict[str, Any] | bytes, data: bytes, *, pad_to: int = 64) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % pad_to)
    return struct.pack("<Q", len(text)) + text + data


def _entry(dtype: str, shape: list[int], start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def _seal(path: Path, payload: bytes, *, align: int | None) -> Path:
    manifest = Manifest.build(kind="safetensors", payload_size=len(payload), payload_align=align)
    plaintext = manifest.encode_prefix() + payload
    out = io.BytesIO()
    with SealedWriter(
        out,
        model_id="strict",
        plaintext_size=len(plaintext),
        wrapper=LocalKeyWrapper(KEY, key_version=1),
    ) as writer:
        writer.write(plaintext)
    path.write_bytes(out.getvalue())
    return path


_U8_AT_0 = b'{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
_DUPLICATE = b'{"a":' + _U8_AT_0 + b',"a":' + _U8_AT_0 + b"}"

MALFORMED = {
    "misaligned F32": (
        _safetensors({"a": _entry("U8", [1], 0, 1), "b": _entry("F32", [1], 1, 5)}, bytes(5)),
        None,
        "aligned to its element size",
    ),
    "dtype U16": (_safetensors({"a": _entry("U16", [1], 0, 2)}, bytes(2)), None, "dtype"),
    "BOOL byte of 2": (
        _safetensors({"a": _entry("BOOL", [2], 0, 2)}, b"\x01\x02"),
        None,
        "other than 0 and 1",
    ),
    "duplicate keys": (_safetensors(_DUPLICATE, b"\x00"), None, "duplicate"),
    "trailing data": (_safetensors({"a": _entry("U8", [1], 0, 1)}, b"\x00\x00"), None, "end"),
    "aligned payload packed": (
        _safetensors({"a": _entry("U8", [1], 0, 1), "b": _entry("U8", [1], 1, 2)}, bytes(2)),
        64,
        "next multiple of 64",
    ),
    "non-zero alignment padding": (
        _safetensors(
            {"a": _entry("U8", [1], 0, 1), "b": _entry("U8", [1], 64, 65)},
            b"\x00" + b"\x05" * 63 + b"\x00",
        ),
        64,
        "padding",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_decrypt_and_load_refuse_the_same_payloads(tmp_path: Path, case: str) -> None:
    payload, align, message = MALFORMED[case]
    sealed = _seal(tmp_path / "bad.sealed", payload, align=align)
    with pytest.raises(PayloadError, match=message):
        sealtorch.load_state_dict(sealed, key=KEY)
    out = tmp_path / "plain.safetensors"
    with pytest.raises(PayloadError, match=message):
        sealtorch.decrypt_model(sealed, out, key=KEY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.sealed"]


def test_a_well_formed_packed_payload_still_decrypts(tmp_path: Path) -> None:
    payload = _safetensors(
        {"a": _entry("U8", [1], 0, 1), "b": _entry("U8", [2], 1, 3)}, b"\x07\x08\x09"
    )
    sealed = _seal(tmp_path / "good.sealed", payload, align=None)
    out = tmp_path / "plain.safetensors"
    sealtorch.decrypt_model(sealed, out, key=KEY)
    from safetensors.torch import load_file

    loaded = load_file(out)
    assert loaded["a"].tolist() == [7]
    assert loaded["b"].tolist() == [8, 9]
