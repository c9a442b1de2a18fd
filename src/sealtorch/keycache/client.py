"""Reading a running key cache's status (``sealtorch keycache status``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from sealtorch._crypto.tls import untrusted_server_message
from sealtorch._uds import UnixSocketTransport
from sealtorch.errors import ConfigError, KeyReleaseError, ProtocolError
from sealtorch.keycache.app import STATUS_PATH
from sealtorch.keycache.status import CacheStatus

__all__ = ["fetch_status"]


def fetch_status(
    *,
    socket: str | os.PathLike[str] | None = None,
    url: str | None = None,
    ca: str | os.PathLike[str] | None = None,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """The status document of the cache at ``socket`` (Unix) or ``url`` (http/https), checked
    against :class:`~sealtorch.keycache.status.CacheStatus`."""
    if (socket is None) == (url is None):
        raise ConfigError("give the key cache's Unix socket or its URL (one of them)")
    where: str
    client: httpx.Client
    if socket is not None:
        where = f"unix://{Path(socket)}"
        client = httpx.Client(
            base_url="http://sealtorch.local",
            transport=UnixSocketTransport(str(socket)),
            timeout=timeout,
        )
    elif url is not None:
        where = url
        if url.startswith("unix://"):
            return fetch_status(socket=url[len("unix://") :], timeout=timeout)
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{url!r}: use http(s)://HOST:PORT or unix:///PATH")
        verify: Any = True
        if ca is not None:
            from sealtorch._crypto.tls import client_ssl_context

            verify = client_ssl_context(ca_path=ca)
        client = httpx.Client(base_url=url.rstrip("/"), verify=verify, timeout=timeout)
    with client:
        try:
            response = client.get(STATUS_PATH)
        except httpx.TransportError as exc:
            untrusted = untrusted_server_message(
                exc, server=f"the key cache at {where}", ca_option="--ca", key_server=False
            )
            raise KeyReleaseError(
                untrusted
                or f"cannot reach the key cache at {where} ({type(exc).__name__}); is it "
                "running, and may this user open its socket?"
            ) from exc
    if response.status_code != 200:
        raise KeyReleaseError(
            f"the key cache at {where} answered HTTP {response.status_code} for its status",
            status_code=response.status_code,
        )
    try:
        report = CacheStatus.model_validate_json(response.content)
    except ValidationError as exc:
        raise ProtocolError(
            f"{where} did not answer with a key cache status ({exc.error_count()} schema "
            "error(s)); is it a key cache of the same version?"
        ) from exc
    return report.model_dump(mode="json")
