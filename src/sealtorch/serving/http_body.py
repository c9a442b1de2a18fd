"""Reading REST request bodies: size limit, Content-Encoding, bounded decompression.

Shared by the inference routes (:mod:`sealtorch.serving.app`) and the generate routes
(:mod:`sealtorch.serving.generate_routes`).
"""

from __future__ import annotations

import zlib
from typing import Final

from starlette.requests import Request

from sealtorch.serving.errors import (
    PayloadTooLargeError,
    RequestError,
    UnsupportedEncodingError,
    show,
)
from sealtorch.serving.jsondata import DEFAULT_MAX_JSON_ELEMENTS

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "HEADER_LENGTH",
    "AppLimits",
    "content_encoding",
    "decompress",
    "json_length",
    "read_body",
]

#: The server's default bound on ``max_tokens`` of a generate request (``--max-tokens``).
DEFAULT_MAX_NEW_TOKENS: Final = 512
#: The binary tensor data extension's header (length of the JSON part of the body).
HEADER_LENGTH: Final = "Inference-Header-Content-Length"


class AppLimits:
    """Request limits the app enforces (set from the server settings)."""

    def __init__(
        self,
        *,
        max_body_bytes: int,
        max_pending: int,
        max_json_elements: int = DEFAULT_MAX_JSON_ELEMENTS,
        max_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self.max_pending = max_pending
        self.max_json_elements = max_json_elements
        #: The most tokens one generate request may ask for (``max_tokens``).
        self.max_tokens = max_tokens


async def read_body(request: Request, limit: int) -> bytearray:
    """The body, in one buffer that grows in place (never copied once more at the end)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError("the Content-Length header is not a number")
        if int(declared) > limit:
            raise PayloadTooLargeError(
                f"the request body is {int(declared):,} bytes; this server accepts at most "
                f"{limit:,} (--max-body-size)"
            )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(
                f"the request body exceeds {limit:,} bytes, the most this server accepts "
                "(--max-body-size)"
            )
    return body


def json_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.isdigit():
        raise RequestError(f"the {HEADER_LENGTH} header is not a number")
    return int(value)


def content_encoding(request: Request) -> str | None:
    """``gzip`` or ``deflate`` for a compressed body, None for a plain one (415 otherwise)."""
    value = request.headers.get("content-encoding", "identity").strip().lower()
    if value in ("", "identity"):
        return None
    if value not in ("gzip", "deflate"):
        raise UnsupportedEncodingError(
            f"Content-Encoding {show(value)} is not supported; send gzip, deflate or identity"
        )
    return value


def decompress(body: bytearray, encoding: str, limit: int) -> bytearray:
    """The decompressed body, refused (413) as soon as it grows past ``limit`` bytes."""
    # gzip: a gzip member; deflate: a zlib stream (RFC 9110), or raw deflate as some send.
    wbits = 31 if encoding == "gzip" else (15 if body[:1] and body[0] & 0x0F == 8 else -15)
    inflater = zlib.decompressobj(wbits)
    out = bytearray()
    data: bytes | bytearray = body
    try:
        while data:
            out += inflater.decompress(data, limit + 1 - len(out))
            if len(out) > limit:
                raise PayloadTooLargeError(
                    f"the request body decompresses to more than {limit:,} bytes, the most this "
                    "server accepts (--max-body-size)"
                )
            data = inflater.unconsumed_tail
        out += inflater.flush()
    except zlib.error as exc:
        raise RequestError(f"the {encoding} request body is corrupt ({exc})") from exc
    if not inflater.eof or inflater.unused_data:
        raise RequestError(f"the {encoding} request body is truncated or has trailing bytes")
    if len(out) > limit:
        raise PayloadTooLargeError(
            f"the request body decompresses to more than {limit:,} bytes (--max-body-size)"
        )
    return out
