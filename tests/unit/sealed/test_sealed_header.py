from __future__ import annotations

import struct
from pathlib import Path

import pytest

from conftest import KEY, seal
from sealtorch.errors import INTEGRITY_MESSAGE, ConfigError, FormatError, IntegrityError
from sealtorch.sealed import canonical
from sealtorch.sealed.header import (
    MAX_HEADER_SIZE,
    PREAMBLE_SIZE,
    SUITE,
    BodyHeader,
    Header,
    b64url_decode,
    b64url_encode,
    check_chunk_size,
    check_key_version,
    check_model_id,
    parse_preamble,
)
from sealtorch.sealed.reader import read_header


def _header_json(blob: bytes) -> dict[str, object]:
    (length,) = struct.unpack(">I", blob[12:16])
    return canonical.loads(blob[PREAMBLE_SIZE : PREAMBLE_SIZE + length])


def _with_header(blob: bytes, header: dict[str, object]) -> bytes:
    """Replace the header of ``blob`` by the canonical encoding of ``header``."""
    (length,) = struct.unpack(">I", blob[12:16])
    text = canonical.dumps(header)
    return blob[:12] + struct.pack(">I", len(text)) + text + blob[PREAMBLE_SIZE + length :]


def test_header_layout_and_only_public_fields() -> None:
    blob = seal(b"x" * 100, model_id="resnet50", key_version=3)
    assert blob[:8] == b"SEALTRCH"
    assert blob[8:12] == b"\x00\x01\x00\x00"
    header = _header_json(blob)
    assert set(header) == {"body", "key"}
    body, key = header["body"], header["key"]
    assert isinstance(body, dict)
    assert isinstance(key, dict)
    assert set(body) == {"chunk_size", "model_id", "plaintext_size", "salt", "suite"}
    assert set(key) == {"key_version", "nonce", "salt", "wrapped_cek"}
    assert body["model_id"] == "resnet50"
    assert body["plaintext_size"] == 100
    assert body["suite"] == SUITE
    assert key["key_version"] == 3


def test_encode_decode_round_trip(tmp_path: Path) -> None:
    blob = seal(b"abc")
    path = tmp_path / "f.sealed"
    path.write_bytes(blob)
    header = read_header(path)
    assert header.encode() == blob[: len(header.encode())]
    assert header.body.chunk_count == 1
    assert header.public_fields()["sealed_body_size"] == 3 + 16
    assert "<48 B>" in repr(header.key)


@pytest.mark.parametrize(
    ("preamble", "message"),
    [
        (b"NOTSEALD" + bytes(8), "bad magic"),
        (b"SEALTRCH\x00\x03\x00\x00\x00\x00\x01\x00", r"newer sealtorch \(format v3\)"),
        (b"SEALTRCH\x00\x00\x00\x00\x00\x00\x01\x00", "unknown sealed format version 0"),
        (b"PK\x03\x04" + bytes(12), "bad magic"),
        (b"", "too short"),
    ],
)
def test_preamble_format_errors_are_specific(preamble: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_preamble(preamble)


@pytest.mark.parametrize(
    "preamble",
    [
        b"SEALTRCH\x00\x01\x00\x01\x00\x00\x01\x00",  # reserved must be 0
        b"SEALTRCH\x00\x01\x00\x00\x00\x00\x00\x00",  # empty header
        b"SEALTRCH\x00\x01\x00\x00" + struct.pack(">I", MAX_HEADER_SIZE + 1),  # over the cap
        b"SEALTRCH\x00\x01\x00\x00\xff\xff\xff\xff",
        b"SEALTRCH\x00\x01",  # truncated preamble
    ],
)
def test_preamble_integrity_errors(preamble: bytes) -> None:
    with pytest.raises(IntegrityError) as info:
        parse_preamble(preamble)
    assert str(info.value) == INTEGRITY_MESSAGE


def test_header_length_larger_than_file(tmp_path: Path) -> None:
    blob = seal(b"abc")
    path = tmp_path / "f.sealed"
    path.write_bytes(blob[:12] + struct.pack(">I", len(blob)) + blob[16:])
    with pytest.raises(IntegrityError):
        read_header(path)


def test_header_length_over_cap_even_if_file_is_large(tmp_path: Path) -> None:
    blob = seal(b"abc")
    path = tmp_path / "f.sealed"
    padded = blob[:12] + struct.pack(">I", MAX_HEADER_SIZE + 1) + blob[16:] + bytes(MAX_HEADER_SIZE)
    path.write_bytes(padded)
    with pytest.raises(IntegrityError):
        read_header(path)


def _mutations() -> list[tuple[str, object]]:
    return [
        ("body.extra", 1),  # unknown field
        ("key.extra", "x"),
        ("extra", {}),
        ("-body.suite", None),  # missing field
        ("-key.nonce", None),
        ("body.chunk_size", "64"),  # wrong types
        ("body.chunk_size", True),
        ("body.chunk_size", 96),  # not a power of two
        ("body.chunk_size", 32),  # too small
        ("body.chunk_size", 128 * 1024 * 1024),  # too large
        ("body.plaintext_size", -1),
        ("body.plaintext_size", 2**53),
        ("body.plaintext_size", 64 * 2**32 + 1),  # more than 2**32 chunks
        ("body.model_id", ""),
        ("body.model_id", "-bad"),
        ("body.model_id", "a" * 129),
        ("body.model_id", "a b"),
        ("body.model_id", 5),
        ("body.suite", "AES-128-GCM"),
        ("body.salt", b64url_encode(bytes(31))),
        ("body.salt", b64url_encode(bytes(32)) + "="),
        ("key.key_version", 0),
        ("key.key_version", 2**31),
        ("key.key_version", False),
        ("key.nonce", b64url_encode(bytes(11))),
        ("key.wrapped_cek", "!" * 64),
        ("key", []),
        ("body", "x"),
    ]


@pytest.mark.parametrize(("path", "value"), _mutations())
def test_malformed_headers_are_integrity_errors(path: str, value: object) -> None:
    blob = seal(b"abc")
    header = _header_json(blob)
    remove = path.startswith("-")
    parts = path.lstrip("-").split(".")
    target: dict[str, object] = header
    for part in parts[:-1]:
        inner = target[part]
        assert isinstance(inner, dict)
        target = inner
    if remove:
        del target[parts[-1]]
    else:
        target[parts[-1]] = value
    with pytest.raises(IntegrityError) as info:
        Header.decode(canonical.dumps(header))
    assert str(info.value) == INTEGRITY_MESSAGE


def test_non_canonical_header_is_an_integrity_error() -> None:
    blob = seal(b"abc")
    header = _header_json(blob)
    spaced = canonical.dumps(header).replace(b":", b": ", 1)
    with pytest.raises(IntegrityError):
        Header.decode(spaced)
    with pytest.raises(IntegrityError):
        Header.decode(canonical.dumps(header) + b" ")


def test_b64url_is_strict() -> None:
    data = bytes(range(32))
    text = b64url_encode(data)
    assert b64url_decode(text, size=32) == data
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # the last character of 32 bytes carries 2 unused bits: setting one is non-canonical
    sloppy = text[:-1] + alphabet[alphabet.index(text[-1]) + 1]
    for bad in (text + "=", sloppy, text[:-1] + "/", text[:-2], " " + text, text + "AA"):
        with pytest.raises(ValueError, match=r"base64url|length"):
            b64url_decode(bad, size=32)


@pytest.mark.parametrize("model_id", ["resnet50", "a", "A.b-c_d", "9" * 128])
def test_valid_model_ids(model_id: str) -> None:
    assert check_model_id(model_id) == model_id


@pytest.mark.parametrize("model_id", ["", ".a", "a/b", "a" * 129, "ü", "a\n"])
def test_invalid_model_ids_explain_the_rule(model_id: str) -> None:
    with pytest.raises(ConfigError, match="1-128 characters"):
        check_model_id(model_id)


def test_chunk_size_and_key_version_checks() -> None:
    assert check_chunk_size(64) == 64
    assert check_chunk_size(64 * 1024 * 1024) == 64 * 1024 * 1024
    for bad in (0, 63, 65, 100, 2**27, -64):
        with pytest.raises(ConfigError, match="power of two"):
            check_chunk_size(bad)
    assert check_key_version(1) == 1
    for bad in (0, -1, True, "1"):
        with pytest.raises(ConfigError, match=r"key version"):
            check_key_version(bad)


def test_body_header_rejects_too_many_chunks() -> None:
    with pytest.raises(ConfigError, match="2\\*\\*32 chunks"):
        BodyHeader(model_id="m", plaintext_size=64 * 2**32 + 1, chunk_size=64, salt=bytes(32))
    assert (
        BodyHeader(model_id="m", plaintext_size=0, chunk_size=64, salt=bytes(32)).chunk_count == 1
    )


def test_key_is_not_needed_to_read_the_header(tmp_path: Path) -> None:
    path = tmp_path / "f.sealed"
    path.write_bytes(seal(b"abc", key=KEY, model_id="visible"))
    assert read_header(path).model_id == "visible"
