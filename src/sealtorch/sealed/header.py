"""The public part of a sealed file: preamble and canonical JSON header (``docs/format.md``).

Layout::

    magic "SEALTRCH" (8) | version u16be (1 or 2) | reserved u16be (=0) | header length u32be
    header (canonical JSON, at most 64 KiB)
    body (chunked AES-256-GCM)

Version 1 is one file. Version 2 is one file of a *sealed set* (a model split over several
files): ``body.set`` names the set (random id), the file's index and the file count, and the
first file (index 0, the one that holds the wrapped content key) lists the body digests of all
the others, so the set's files cannot be swapped, dropped, duplicated or mixed between sets.

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
    "SET_FORMAT_VERSION",
    "SUITE",
    "BodyHeader",
    "Header",
    "KeyBlock",
    "SetBlock",
    "ShardHeader",
    "b64url_decode",
    "b64url_encode",
    "check_chunk_size",
    "check_key_version",
    "check_model_id",
    "parse_preamble",
    "parse_preamble_version",
    "wrap_aad",
]

MAGIC: Final = b"SEALTRCH"
FORMAT_VERSION: Final = 1
#: The format version of the files of a sealed set (docs/format.md § Sealed sets).
SET_FORMAT_VERSION: Final = 2
#: Most files in one sealed set (the first file's digest list must fit its 64 KiB header).
MAX_SET_FILES: Final = 512
SET_ID_SIZE: Final = 16
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
_HEX64 = re.compile(r"[0-9a-f]{64}")


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
class SetBlock:
    """Where a file sits in a sealed set; bound into its body digest (and so its body key).

    The first file (``index`` 0) lists the body digests of files ``1 … count - 1`` in order.
    """

    set_id: bytes
    index: int
    count: int
    digests: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if len(self.set_id) != SET_ID_SIZE:
            raise ConfigError("a sealed set id is 16 bytes")
        for name, value in (("index", self.index), ("count", self.count)):
            if isinstance(value, bool):
                raise ConfigError(f"set {name} must be an integer")
        if not 2 <= self.count <= MAX_SET_FILES or not 0 <= self.index < self.count:
            raise ConfigError(
                f"a sealed set has 2 to {MAX_SET_FILES} files; index {self.index} of "
                f"{self.count} is out of range"
            )
        expected = self.count - 1 if self.index == 0 else 0
        if len(self.digests) != expected or any(len(d) != 32 for d in self.digests):
            raise ConfigError("the first file of a sealed set lists every other file's digest")

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "count": self.count,
            "id": b64url_encode(self.set_id),
            "index": self.index,
        }
        if self.index == 0:
            document["digests"] = [digest.hex() for digest in self.digests]
        return document

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SetBlock:
        if "index" not in obj:
            raise ValueError("unknown or missing fields")
        index = _field(obj, "index", int)
        _exact_keys(obj, {"count", "id", "index"} | ({"digests"} if index == 0 else set()))
        digests: tuple[bytes, ...] = ()
        if index == 0:
            listed = obj["digests"]
            if not isinstance(listed, list) or not all(
                isinstance(d, str) and _HEX64.fullmatch(d) for d in listed
            ):
                raise ValueError("digests must be lowercase hex SHA-256 digests")
            digests = tuple(bytes.fromhex(d) for d in listed)
        return cls(
            set_id=b64url_decode(_field(obj, "id", str), size=SET_ID_SIZE),
            index=index,
            count=_field(obj, "count", int),
            digests=digests,
        )


@dataclass(frozen=True)
class BodyHeader:
    """The public description of the body; all of it is bound into the body key derivation."""

    model_id: str
    plaintext_size: int
    chunk_size: int
    salt: bytes
    suite: str = SUITE
    #: Set only in the files of a sealed set (format version 2).
    set: SetBlock | None = None

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
        document: dict[str, Any] = {
            "chunk_size": self.chunk_size,
            "model_id": self.model_id,
            "plaintext_size": self.plaintext_size,
            "salt": b64url_encode(self.salt),
            "suite": self.suite,
        }
        if self.set is not None:
            document["set"] = self.set.to_json()
        return document

    @property
    def digest(self) -> bytes:
        """``SHA-256(BODY_DIGEST_TAG ‖ canonical(body))``; binds every field into the body key."""
        return sha256(BODY_DIGEST_TAG + canonical.dumps(self.to_json()))

    @classmethod
    def from_json(cls, obj: dict[str, Any], *, in_set: bool = False) -> BodyHeader:
        fields = {"chunk_size", "model_id", "plaintext_size", "salt", "suite"}
        _exact_keys(obj, fields | {"set"} if in_set else fields)
        return cls(
            set=SetBlock.from_json(_field(obj, "set", dict)) if in_set else None,
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

    def __post_init__(self) -> None:
        if self.body.set is not None and self.body.set.index != 0:
            raise ConfigError("only the first file of a sealed set holds the key block")

    @property
    def version(self) -> int:
        return FORMAT_VERSION if self.body.set is None else SET_FORMAT_VERSION

    def encode(self) -> bytes:
        """Preamble plus canonical header: the first bytes of the file."""
        text = canonical.dumps({"body": self.body.to_json(), "key": self.key.to_json()})
        if len(text) > MAX_HEADER_SIZE:  # pragma: no cover - MAX_SET_FILES keeps it below
            raise ConfigError("header too large")
        return PREAMBLE.pack(MAGIC, self.version, 0, len(text)) + text

    @classmethod
    def decode(cls, data: bytes, *, version: int = FORMAT_VERSION) -> Header:
        """Parse the canonical header JSON (without preamble); IntegrityError on any defect.

        ``version`` 2 (a sealed set's first file) requires ``body.set`` with index 0.
        """
        try:
            obj = canonical.loads(data)
            _exact_keys(obj, {"body", "key"})
            return cls(
                body=BodyHeader.from_json(
                    _field(obj, "body", dict), in_set=version == SET_FORMAT_VERSION
                ),
                key=KeyBlock.from_json(_field(obj, "key", dict)),
            )
        except (ValueError, ConfigError) as exc:
            raise IntegrityError() from exc

    def public_fields(self) -> dict[str, Any]:
        """What ``sealtorch inspect`` shows: the header fields, decoded, plus derived sizes."""
        return {
            "format_version": self.version,
            "model_id": self.body.model_id,
            "key_version": self.key.key_version,
            "suite": self.body.suite,
            "chunk_size": self.body.chunk_size,
            "chunk_count": self.body.chunk_count,
            "plaintext_size": self.body.plaintext_size,
            "sealed_body_size": self.body.sealed_size,
        }


@dataclass(frozen=True)
class ShardHeader:
    """The header of a sealed set's file ``1 … count - 1``: the body only (format version 2).

    Its content key is the set's, wrapped in the first file; its body digest is listed there.
    """

    body: BodyHeader

    def __post_init__(self) -> None:
        if self.body.set is None or self.body.set.index == 0:
            raise ConfigError("a shard header belongs to file 1 or later of a sealed set")

    def encode(self) -> bytes:
        text = canonical.dumps({"body": self.body.to_json()})
        return PREAMBLE.pack(MAGIC, SET_FORMAT_VERSION, 0, len(text)) + text

    @classmethod
    def decode(cls, data: bytes) -> ShardHeader:
        try:
            obj = canonical.loads(data)
            _exact_keys(obj, {"body"})
            return cls(body=BodyHeader.from_json(_field(obj, "body", dict), in_set=True))
        except (ValueError, ConfigError) as exc:
            raise IntegrityError() from exc


def parse_preamble(data: bytes) -> int:
    """Check the 16-byte preamble; return the header length (see :func:`parse_preamble_version`)."""
    return parse_preamble_version(data)[1]


def parse_preamble_version(data: bytes) -> tuple[int, int]:
    """Check the 16-byte preamble; return the format version (1 or 2) and the header length.

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
    if version not in (FORMAT_VERSION, SET_FORMAT_VERSION):
        if version > SET_FORMAT_VERSION:
            raise FormatError(
                f"this sealed model was written by a newer sealtorch (format v{version}); "
                f"this sealtorch reads formats v{FORMAT_VERSION} and v{SET_FORMAT_VERSION}: "
                "upgrade sealtorch"
            )
        raise FormatError(
            f"unknown sealed format version {version}; this sealtorch reads formats "
            f"v{FORMAT_VERSION} and v{SET_FORMAT_VERSION}"
        )
    if reserved != 0 or not 0 < header_length <= MAX_HEADER_SIZE:
        raise IntegrityError()
    return int(version), int(header_length)
