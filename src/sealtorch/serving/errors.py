"""Errors of the inference server that become HTTP responses.

A :class:`RequestError` is a refusal of one request, never a server malfunction: the app turns
it into the Open Inference Protocol error body ``{"error": "..."}`` with its
:attr:`~RequestError.status_code`. Messages may quote what the client sent (shortened and
escaped with :func:`show`), but never anything about the model beyond its declared interface.
"""

from __future__ import annotations

from sealtorch.errors import Error

__all__ = [
    "ModelNotFoundError",
    "ModelNotReadyError",
    "PayloadTooLargeError",
    "RequestError",
    "ServerBusyError",
    "UnsupportedEncodingError",
    "show",
]


class RequestError(Error):
    """The request is malformed or does not fit the model (HTTP 400)."""

    status_code: int = 400


class ModelNotFoundError(RequestError):
    """No model (or no such version of it) is served under this name (HTTP 404)."""

    status_code = 404


class PayloadTooLargeError(RequestError):
    """The request body is larger than the server accepts (HTTP 413)."""

    status_code = 413


class UnsupportedEncodingError(RequestError):
    """The request body uses a Content-Encoding the server does not read (HTTP 415)."""

    status_code = 415


class ModelNotReadyError(RequestError):
    """The model is still being decrypted and warmed up (HTTP 503, retry later)."""

    status_code = 503


class ServerBusyError(RequestError):
    """Too many requests are already queued (HTTP 503, retry later)."""

    status_code = 503


def show(value: object, limit: int = 64) -> str:
    """A client-supplied value for an error message: ``repr`` (escapes newlines), shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
