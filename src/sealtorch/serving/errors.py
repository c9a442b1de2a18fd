"""Errors of the inference server that become HTTP responses.

A :class:`RequestError` (a :class:`sealtorch.errors.RequestError`) is a refusal of one request,
never a server malfunction: the app turns it into the Open Inference Protocol error body
``{"error": "..."}`` with the HTTP status of its :class:`~sealtorch.errors.ErrorKind`. Messages
may quote what the client sent (shortened and escaped with :func:`show`), but never anything
about the model beyond its declared interface.
"""

from __future__ import annotations

from typing import ClassVar

from sealtorch import errors
from sealtorch.errors import ErrorKind

__all__ = [
    "ModelNotFoundError",
    "ModelNotReadyError",
    "PayloadTooLargeError",
    "RequestError",
    "ServerBusyError",
    "UnsupportedEncodingError",
    "show",
]


class RequestError(errors.RequestError):
    """The request is malformed or does not fit the model (HTTP 400).

    A :class:`sealtorch.errors.RequestError` whose kind and code come from its class, so it is
    raised with the message alone; the HTTP status is the kind's (:attr:`status`).
    """

    #: The kind (and so the HTTP status) and the stable code of this class of refusal.
    default_kind: ClassVar[ErrorKind] = ErrorKind.INVALID
    default_code: ClassVar[str] = "invalid_request"

    def __init__(self, message: str) -> None:
        super().__init__(self.default_kind, self.default_code, message)

    @property
    def status_code(self) -> int:
        """The HTTP status (the same as :attr:`status`)."""
        return self.status


class ModelNotFoundError(RequestError):
    """No model (or no such version of it) is served under this name (HTTP 404)."""

    default_kind = ErrorKind.NOT_FOUND
    default_code = "model_not_found"


class PayloadTooLargeError(RequestError):
    """The request body is larger than the server accepts (HTTP 413)."""

    default_kind = ErrorKind.TOO_LARGE
    default_code = "payload_too_large"


class UnsupportedEncodingError(RequestError):
    """The request body uses a Content-Encoding the server does not read (HTTP 415)."""

    default_kind = ErrorKind.UNSUPPORTED_MEDIA
    default_code = "unsupported_encoding"


class ModelNotReadyError(RequestError):
    """The model is still being decrypted and warmed up (HTTP 503, retry later)."""

    default_kind = ErrorKind.UNAVAILABLE
    default_code = "model_not_ready"


class ServerBusyError(RequestError):
    """Too many requests are already queued (HTTP 503, retry later)."""

    default_kind = ErrorKind.UNAVAILABLE
    default_code = "server_busy"


def show(value: object, limit: int = 64) -> str:
    """A client-supplied value for an error message: ``repr`` (escapes newlines), shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
