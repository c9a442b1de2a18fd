"""An httpx transport over a Unix socket that closes the socket when ``connect()`` fails.

httpcore's synchronous backend leaves a Unix socket whose ``connect()`` failed (nobody listens,
permission denied) to the garbage collector, with a ``ResourceWarning``. The key release client
(``unix://`` key caches), the key cache (which retries an unreachable key server for as long as
it is down) and ``keycache status`` use this transport instead. Responses are small (protocol
JSON), so they are read whole.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from types import TracebackType

import httpcore
import httpx

__all__ = ["UnixSocketTransport"]


class _ClosingBackend(httpcore.SyncBackend):
    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            return super().connect_unix_socket(path, timeout, socket_options)
        except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
            _close_sockets(exc.__traceback__)
            raise


def _close_sockets(traceback: TracebackType | None) -> None:
    """Close the socket the failed connect left in its frame."""
    while traceback is not None:
        for value in traceback.tb_frame.f_locals.values():
            if isinstance(value, socket.socket):
                value.close()
        traceback = traceback.tb_next


class UnixSocketTransport(httpx.BaseTransport):
    """``httpx.HTTPTransport(uds=path)`` without the leaked socket (see module docstring)."""

    def __init__(self, path: str, *, max_connections: int = 8) -> None:
        self.path = path
        self._pool = httpcore.ConnectionPool(
            uds=path,
            network_backend=_ClosingBackend(),
            max_connections=max_connections,
            max_keepalive_connections=max(1, max_connections // 2),
        )

    def __repr__(self) -> str:
        return f"UnixSocketTransport({self.path!r})"

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=request.headers.raw,
            content=request.read(),
            extensions=request.extensions,
        )
        try:
            response = self._pool.handle_request(core)
            try:
                content = response.read()
            finally:
                response.close()
        except httpcore.TimeoutException as exc:
            raise _mapped(exc, request, httpx.TimeoutException) from exc
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.PoolTimeout) as exc:
            raise _mapped(exc, request, httpx.TransportError) from exc
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            content=content,
            extensions={"http_version": response.extensions.get("http_version", b"HTTP/1.1")},
            request=request,
        )

    def close(self) -> None:
        self._pool.close()


def _mapped(
    exc: Exception, request: httpx.Request, default: type[httpx.TransportError]
) -> httpx.TransportError:
    """The httpx exception of the same name (httpx mirrors httpcore's classes)."""
    kind = getattr(httpx, type(exc).__name__, default)
    if not (isinstance(kind, type) and issubclass(kind, httpx.TransportError)):
        kind = default
    return kind(str(exc) or type(exc).__name__, request=request)
