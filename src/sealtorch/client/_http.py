"""The HTTP side every key server client shares: connections (HTTPS, Unix sockets), error
bodies, bounded and schema-checked responses."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ValidationError

from sealtorch._uds import UnixSocketTransport
from sealtorch.errors import (
    ConfigError,
    KeyReleaseError,
    ProtocolError,
)
from sealtorch.protocol import (
    ErrorBody,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "CA_OPTIONS",
    "MAX_RESPONSE",
    "RETRYABLE",
    "UNIX_BASE",
    "UNIX_SCHEME",
    "error_from",
    "make_http_client",
    "parse_response",
    "policy_digest",
    "split_urls",
]

_T = TypeVar("_T", bound=BaseModel)
UNIX_SCHEME: Final = "unix://"
UNIX_BASE: Final = "http://sealtorch.local"
MAX_RESPONSE: Final = 4 * 1024 * 1024
#: Network failures worth retrying: nothing was decided, or the connection broke.
RETRYABLE = (httpx.TransportError,)
#: How each caller passes the CA of a key source (in messages about an untrusted certificate).
CA_OPTIONS: Final = "--ca (`sealtorch serve`: --keys-ca; Python: ca=)"


# -- transport ---------------------------------------------------------------------------------


def split_urls(urls: str | Sequence[str]) -> tuple[str, ...]:
    """Key source URLs from a sequence and/or comma-separated strings, without repeats (at
    least one: ConfigError)."""
    parts = [urls] if isinstance(urls, str) else list(urls)
    found = [piece.strip() for part in parts for piece in str(part).split(",") if piece.strip()]
    if not found:
        raise ConfigError("no key source URL given (https://HOST:PORT or unix:///PATH)")
    return tuple(dict.fromkeys(found))


def make_http_client(
    url: str,
    *,
    ca: str | os.PathLike[str] | None,
    timeout: float,
    transport: httpx.BaseTransport | None,
    allow_insecure_http: bool,
) -> httpx.Client:
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=4)
    if url.startswith(UNIX_SCHEME):
        path = url[len(UNIX_SCHEME) :]
        if not path.startswith("/"):
            raise ConfigError(f"{url!r}: a Unix socket URL is unix:///absolute/path")
        return httpx.Client(
            base_url=UNIX_BASE,
            transport=transport or UnixSocketTransport(path),
            timeout=timeout,
            limits=limits,
        )
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(
            f"{url!r} is not a key server URL: use https://HOST:PORT, or unix:///PATH for a "
            "local key cache"
        )
    if parts.scheme == "http" and not allow_insecure_http:
        raise ConfigError(
            f"{url!r} uses plain HTTP; key servers are reached over HTTPS (pass "
            "allow_insecure_http=True only for tests on loopback)"
        )
    verify: Any = True
    if ca is not None:
        from sealtorch._crypto.tls import client_ssl_context

        verify = client_ssl_context(ca_path=ca)
    return httpx.Client(
        base_url=url.rstrip("/"),
        verify=verify,
        transport=transport,
        timeout=timeout,
        limits=limits,
    )


def error_from(response: httpx.Response, what: str) -> KeyReleaseError:
    reasons: tuple[str, ...] = ()
    message = f"{what} failed with HTTP {response.status_code}"
    try:
        body = ErrorBody.model_validate_json(response.content)
    except ValidationError:
        pass
    else:
        reasons = body.error.reasons or (body.error.code,)
        message = f"{what} refused ({body.error.code}): {body.error.message}"
    return KeyReleaseError(message, reasons=reasons, status_code=response.status_code)


def parse_response(model: type[_T], response: httpx.Response, what: str) -> _T:
    if len(response.content) > MAX_RESPONSE:
        raise ProtocolError(f"the {what} response is larger than {MAX_RESPONSE} bytes")
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise ProtocolError(
            f"the server's {what} response does not follow the protocol "
            f"({exc.error_count()} schema error(s))"
        ) from exc


def policy_digest(policy: Mapping[str, Any]) -> str:
    canonical = json.dumps(policy, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
