"""The public part of a sealed file: preamble and canonical JSON header (``docs/format.md``).

Layout::

    magic "SEALTRCH" (8) | version u16be (=1) | reserved u16be (=0) | header length u32be
    header (canonical JSON, at most 64 KiB)
    body (chunked AES-256-GCM)

Only the fields needed to obtain the key and decrypt are public. A bad magic or an unknown
version is a :class:`~sealtorch.errors.FormatError` (nothing has been authenticated yet, but
nothing secret depends on it either); every other defect is the one uninformative
:class:`~sealtorch.errors.IntegrityError`.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass
from typing import Any, Final

from sealtorch._crypto.stream import MAX_CHUNKS, TAG_SIZE, sha256
from sealtorch._crypto.wrap import WRAP_NONCE_SIZE, WRAP_SALT_SIZE, WRAPPED_CEK_SIZE
from sealtorch.errors import ConfigError, FormatError, IntegrityError
from sealtorch.sealed import canonical

__all__ = [
    "BODY_SALT_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MAX_HEADER_SIZE",
    "MAX_PLAINTEXT_SIZE",
    "MIN_CHUNK_SIZE",
    "PREAMBLE_SIZE",
    "SUITE",
    "BodyHeader",
    "Header",
    "KeyBlock",
    "b64url_decode",
    "b64url_encode",
    "check_chunk_size",
    "check_key_version",
    "check_model_id",
    "parse_preamble",
    "wrap_aad",
]

MAGIC: Final = b"SEALTRCH"
FORMAT_VERSION: Final = 1
PREAMBLE: Final = struct.Struct(">8sHHI")
PREAMBLE_SIZE: Final = PREAMBLE.size  # 16
MAX_HEADER_SIZE: Final = 64 * 1024
SUITE: Final = "AES-256-GCM/HKDF-SHA256/v1"
BODY_SALT_SIZE: Final = 32
MIN_CHUNK_SIZE: Final = 64
MAX_CHUNK_SIZE: Final = 64 * 1024 * 1024
#: Chosen by ``benchmarks/bench_sealed.py`` (see docs/format.md § Chunk size).
DEFAULT_CHUNK_SIZE: Final = 1024 * 1024
#: Largest integer every JSON implementation represents exactly.
MAX_PLAINTEXT_SIZE: Final = 2**53 - 1
MAX_KEY_VERSION: Final = 2**31 - 1

BODY_DIGEST_TAG: Final = b"sealtorch/v1/header-body\x00"
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def check_model_id(model_id: object) -> str:
    """Return ``model_id`` if valid, else raise :class:`ConfigError` (for user input)."""
    if not isinstance(model_id, str) or _MODEL_ID.fullmatch(model_id) is None:
        raise ConfigError(
            f"invalid model id {model_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit (e.g. resnet50 or fraud-detector.v2)"
        )
    return model_id


def check_key_version(key_version: object) -> int:
    if (
        not isinstance(key_version, int)
        or isinstance(key_version, bool)
        or not 1 <= key_version <= MAX_KEY_VERSION
    ):
        raise ConfigError(f"invalid key version {key_version!r}: use an integer >= 1")
    return key_version


def check_chunk_size(chunk_size: object) -> int:
    if (
        not isinstance(chunk_size, int)
        or isinstance(chunk_size, bool)
        or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE
        or chunk_size & (chunk_size - 1)
    ):
        raise ConfigError(
            f"invalid chunk size {chunk_size!r}: use a power of two from 64 bytes to 64 MiB "
            f"(default {DEFAULT_CHUNK_SIZE // 1024} KiB)"
        )
    return chunk_size


def b64url_encode(data: bytes) -> str:
    """URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def b64url_decode(text: str, *, size: int) -> bytes:
    """Strictly decode unpadded URL-safe base64 of exactly ``size`` bytes (ValueError otherwise)."""
    if _B64URL.fullmatch(text) is None:
        raise ValueError("not unpadded base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc
    if len(data) != size or b64url_encode(data) != text:
        raise ValueError("wrong length or non-canonical base64url")
    return data


def _field(obj: dict[str, Any], name: str, kind: type) -> Any:
    value = obj[name]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{name} must be an integer")
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    if kind is dict and not isinstance(value, dict):
        raise ValueError(f"{name} must be an object")
    return value


def _exact_keys(obj: dict[str, Any], keys: set[str]) -> None:
    if set(obj) != keys:
        raise ValueError("unknown or missing fields")


@dataclass(frozen=True)
class BodyHeader:
    """The public description of the body; all of it is bound into the body key derivation."""

    model_id: str
    plaintext_size: int
    chunk_size: int
    salt: bytes
    suite: str = SUITE

    def __post_init__(self) -> None:
        check_model_id(self.model_id)
        check_chunk_size(self.chunk_size)
        if isinstance(self.plaintext_size, bool) or not (
            0 <= self.plaintext_size <= MAX_PLAINTEXT_SIZE
        ):
            raise ConfigError(f"plaintext size {self.plaintext_size!r} is out of range")
        if self.chunk_count > MAX_CHUNKS:
            raise ConfigError(
                "the model is too large for this chunk size (more than 2**32 chunks); "
                "use a larger --chunk-size"
            )
        if len(self.salt) != BODY_SALT_SIZE:
            raise ConfigError("the body salt must be 32 bytes")
        if self.suite != SUITE:
            raise ConfigError(f"unsupported cipher suite {self.suite!r}")

    @property
    def chunk_count(self) -> int:
        """``max(1, ceil(plaintext_size / chunk_size))``."""
        return max(1, -(-self.plaintext_size // self.chunk_size))

    @property
    def sealed_size(self) -> int:
        """Size of the encrypted body: the plaintext plus one tag per chunk."""
        return self.plaintext_size + TAG_SIZE * self.chunk_count

    def to_json(self) -> dict[str, Any]:
        return {
            "chunk_size": self.chunk_size,
            "model_id": self.model_id,
            "plaintext_size": self.plaintext_size,
            "salt": b64url_encode(self.salt),
            "suite": self.suite,
        }

    @property
    def digest(self) -> bytes:
        """``SHA-256(BODY_DIGEST_TAG ‖ canonical(body))``; binds every field into the body key."""
        return sha256(BODY_DIGEST_TAG + canonical.dumps(self.to_json()))

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> BodyHeader:
        _exact_keys(obj, {"chunk_size", "model_id", "plaintext_size", "salt", "suite"})
        return cls(
            model_id=_field(obj, "model_id", str),
            plaintext_size=_field(obj, "plaintext_size", int),
            chunk_size=_field(obj, "chunk_size", int),
            salt=b64url_decode(_field(obj, "salt", str), size=BODY_SALT_SIZE),
            suite=_field(obj, "suite", str),
        )


@dataclass(frozen=True)
class KeyBlock:
    """The content key wrapped under the data key of ``key_version`` (not secret)."""

    key_version: int
    salt: bytes
    nonce: bytes
    wrapped_cek: bytes

    def __post_init__(self) -> None:
        check_key_version(self.key_version)
        if (
            len(self.salt) != WRAP_SALT_SIZE
            or len(self.nonce) != WRAP_NONCE_SIZE
            or len(self.wrapped_cek) != WRAPPED_CEK_SIZE
        ):
            raise ConfigError("malformed key block (salt, nonce or wrapped key length)")

    def to_json(self) -> dict[str, Any]:
        return {
            "key_version": self.key_version,
            "nonce": b64url_encode(self.nonce),
            "salt": b64url_encode(self.salt),
            "wrapped_cek": b64url_encode(self.wrapped_cek),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> KeyBlock:
        _exact_keys(obj, {"key_version", "nonce", "salt", "wrapped_cek"})
        return cls(
            key_version=_field(obj, "key_version", int),
            salt=b64url_decode(_field(obj, "salt", str), size=WRAP_SALT_SIZE),
            nonce=b64url_decode(_field(obj, "nonce", str), size=WRAP_NONCE_SIZE),
            wrapped_cek=b64url_decode(_field(obj, "wrapped_cek", str), size=WRAPPED_CEK_SIZE),
        )

    def __repr__(self) -> str:
        return f"KeyBlock(key_version={self.key_version}, wrapped_cek=<{len(self.wrapped_cek)} B>)"


def wrap_aad(*, model_id: str, key_version: int, body_digest: bytes) -> bytes:
    """Associated data of the CEK wrap: ties it to the body, the model id and the key version."""
    return canonical.dumps(
        {"body_digest": body_digest.hex(), "key_version": key_version, "model_id": model_id}
    )


@dataclass(frozen=True)
class Header:
    """A sealed file's public header."""

    body: BodyHeader
    key: KeyBlock

    @property
    def model_id(self) -> str:
        return self.body.model_id

    @property
    def key_version(self) -> int:
        return self.key.key_version

    def encode(self) -> bytes:
        """Preamble plus canonical header: the first bytes of the file."""
        text = canonical.dumps({"body": self.body.to_json(), "key": self.key.to_json()})
        if len(text) > MAX_HEADER_SIZE:  # pragma: no cover - fixed fields are far below 64 KiB
            raise ConfigError("header too large")
        return PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(text)) + text

    @classmethod
    def decode(cls, data: bytes) -> Header:
        """Parse the canonical header JSON (without preamble); IntegrityError on any defect."""
        try:
            obj = canonical.loads(data)
            _exact_keys(obj, {"body", "key"})
            return cls(
                body=BodyHeader.from_json(_field(obj, "body", dict)),
                key=KeyBlock.from_json(_field(obj, "key", dict)),
            )
        except (ValueError, ConfigError) as exc:
            raise IntegrityError() from exc

    def public_fields(self) -> dict[str, Any]:
        """What ``sealtorch inspect`` shows: the header fields, decoded, plus derived sizes."""
        return {
            "format_version": FORMAT_VERSION,
            "model_id": self.body.model_id,
            "key_version": self.key.key_version,
            "suite": self.body.suite,
            "chunk_size": self.body.chunk_size,
            "chunk_count": self.body.chunk_count,
            "plaintext_size": self.body.plaintext_size,
            "sealed_body_size": self.body.sealed_size,
        }


def parse_preamble(data: bytes) -> int:
    """Check the 16-byte preamble; return the header length.

    Bad magic and unknown versions are :class:`FormatError` (specific); a nonzero reserved field
    or an oversized header length is :class:`IntegrityError`.
    """
    if len(data) < PREAMBLE_SIZE:
        if MAGIC.startswith(data[: len(MAGIC)]) and data:
            raise IntegrityError()
        raise FormatError("not a sealtorch sealed model (the file is too short to be one)")
    magic, version, reserved, header_length = PREAMBLE.unpack(data[:PREAMBLE_SIZE])
    if magic != MAGIC:
        raise FormatError(
            "not a sealtorch sealed model (bad magic bytes); "
            "seal a model with `sealtorch encrypt` first"
        )
    if version != FORMAT_VERSION:
        if version > FORMAT_VERSION:
            raise FormatError(
                f"this sealed model was written by a newer sealtorch (format v{version}); "
                f"this sealtorch reads format v{FORMAT_VERSION}: upgrade sealtorch"
            )
        raise FormatError(
            f"unknown sealed format version {version}; this sealtorch reads format "
            f"v{FORMAT_VERSION}"
        )
    if reserved != 0 or not 0 < header_length <= MAX_HEADER_SIZE:
        raise IntegrityError()
    return int(header_length)
