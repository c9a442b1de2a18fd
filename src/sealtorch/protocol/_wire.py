"""Building blocks shared by every wire schema: strict models, base64url, UTC times, model ids.

Every schema forbids unknown fields, so a typo in a request is an error, never a silently
ignored option; binary values are base64url without padding; times are RFC 3339 UTC.
"""

from __future__ import annotations

import binascii
import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

__all__ = [
    "MODEL_ID_PATTERN",
    "MODEL_ID_RE",
    "B64Bytes",
    "ModelId",
    "UtcDatetime",
    "WireModel",
    "as_utc",
    "b64decode",
    "b64encode",
    "rfc3339",
    "utc_now",
]

#: Model ids: letters, digits, '.', '_' and '-'; start with a letter or digit; at most 128.
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MODEL_ID_RE = re.compile(MODEL_ID_PATTERN)


# binascii directly, as base64.urlsafe_b64encode/decode do under two layers of Python calls
# (several binary values on every release request and response).
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def b64encode(data: bytes) -> str:
    """base64url without padding (the protocol's encoding of binary values)."""
    return (
        binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).decode("ascii").rstrip("=")
    )


_B64URL_TEXT = re.compile(r"[A-Za-z0-9_-]*")
_B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: By ``len(text) % 4``: the bits of the last character that must be zero (they encode no data).
_UNUSED_BITS = {0: 0, 2: 0x0F, 3: 0x03}


def b64decode(text: str) -> bytes:
    """Strict inverse of :func:`b64encode`; raises ``ValueError`` on anything else."""
    if not _B64URL_TEXT.fullmatch(text):
        raise ValueError("must be base64url without padding")
    tail = len(text) % 4
    if tail == 1:
        raise ValueError("is not valid base64url (impossible length)")
    # Canonical: the last character's unused low bits are zero (else two texts would decode
    # to the same bytes), which is what re-encoding would check, without re-encoding.
    if tail and _B64URL_ALPHABET.index(text[-1]) & _UNUSED_BITS[tail]:
        raise ValueError("is not canonical base64url")
    try:
        padded = (text + "=" * (-len(text) % 4)).encode("ascii")  # ASCII: checked above
        return binascii.a2b_base64(padded.translate(_FROM_URLSAFE))
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - the checks above
        raise ValueError("is not valid base64url") from exc


def _decode_b64(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a base64url string")  # pydantic reports ValueError only
    return b64decode(value)


B64Bytes = Annotated[
    bytes,
    BeforeValidator(_decode_b64),
    PlainSerializer(b64encode, return_type=str, when_used="json"),
]


def as_utc(value: datetime) -> datetime:
    """``value`` in UTC; refuses naive times."""
    if value.tzinfo is None:
        raise ValueError("times must carry a timezone (UTC, 'Z')")
    return value.astimezone(UTC)


def rfc3339(value: datetime) -> str:
    """``value`` (aware) as the protocol writes times: RFC 3339 UTC with microseconds and 'Z'.

    Same text as ``strftime("%Y-%m-%dT%H:%M:%S.%fZ")`` (the year unpadded, as glibc writes
    ``%Y``); formatted by hand because strftime is several times slower, on the release path.
    """
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return (
        f"{value.year}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:{value.minute:02d}:"
        f"{value.second:02d}.{value.microsecond:06d}Z"
    )


UtcDatetime = Annotated[
    datetime,
    AfterValidator(as_utc),
    PlainSerializer(rfc3339, return_type=str, when_used="json"),
]

ModelId = Annotated[str, Field(pattern=MODEL_ID_PATTERN, max_length=128)]


def utc_now() -> datetime:
    return datetime.now(UTC)


class WireModel(BaseModel):
    """A wire schema: unknown fields refused, immutable, strings bounded."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=65536)
