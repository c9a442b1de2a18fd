"""The HTTP side of the key release protocol, shared by the key server and key cache apps.

Both answer the protocol's requests with the same statuses and the same error shape
(``docs/protocol.md``): ``{"error": {"code", "message", "reasons"}}``, compact UTF-8 JSON. This
module holds that shape, the status of each :class:`~sealtorch._release.ErrorKind`, how a bad
request body is described, and how an ASGI request body is read under a size cap. It imports no
web framework.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any, Final

from sealtorch.errors import ErrorKind

__all__ = [
    "BEARER_CHALLENGE",
    "HTTP_STATUS",
    "error_body",
    "error_document",
    "read_body",
    "validation_message",
]

#: The HTTP status of each kind of refused request (:attr:`ErrorKind.status`).
HTTP_STATUS: Final[Mapping[ErrorKind, int]] = {kind: kind.status for kind in ErrorKind}
#: The header sent with every 401: the protocol's tokens are bearer tokens.
BEARER_CHALLENGE: Final = (b"www-authenticate", b'Bearer realm="sealtorch"')


def error_document(code: str, message: str, reasons: Iterable[str] = ()) -> dict[str, Any]:
    """The protocol's one error shape: ``{"error": {"code", "message", "reasons"}}``."""
    return {"error": {"code": code, "message": message, "reasons": list(reasons)}}


def error_body(code: str, message: str, reasons: Iterable[str] = ()) -> bytes:
    """:func:`error_document` as the response body (the bytes a ``JSONResponse`` would send)."""
    return json.dumps(
        error_document(code, message, reasons), ensure_ascii=False, separators=(",", ":")
    ).encode()


def validation_message(errors: Iterable[Mapping[str, Any]]) -> str:
    """Where and what was wrong with a request body (pydantic's error list), never the offending
    input (it may be a token or a key)."""
    parts = []
    for error in list(errors)[:5]:
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return "the request is not valid: " + "; ".join(parts)[:1000]


async def read_body(
    scope: Mapping[str, Any],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    cap: int,
) -> bytes | None:
    """An ASGI request's whole body, or ``None`` when it is (announced as) larger than ``cap``."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                if int(value) > cap:
                    return None
            except ValueError:
                return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
