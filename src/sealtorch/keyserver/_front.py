"""The key server's HTTP front: one listener, the shared HTTP/1.1 server
(:mod:`sealtorch._http_fast`, the key cache's), with the app's lifespan.

The two requests of every key release (challenge and release) are answered here, by the same
endpoint functions and error mapping as the app's short path
(:func:`sealtorch.keyserver.app.answer`), with the same metrics and access log; every other
request (health, metrics, admin, OpenAPI, errors for unknown paths) goes to the FastAPI app
whole, through :func:`~sealtorch._http_fast.asgi_handler`. The server keeps the limits every
sealtorch server keeps: the body cap (413 in the protocol's error shape), the 16 KiB head limit
(431), the read deadlines and the TLS handshake deadline.

:func:`serve` runs it on one socket until SIGTERM/SIGINT: the app's lifespan (open the store
and keys, background tasks), listen, then on the signal stop accepting, let the requests in
progress finish (``graceful_timeout``) and close the lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable
from typing import Any

from sealtorch._http_fast import HttpServer, Request, Response, asgi_handler, run_server
from sealtorch._release_http import error_body
from sealtorch.keyserver.app import answer, observe
from sealtorch.keyserver.runtime import Endpoint, Runtime

__all__ = ["KeyServerFront", "serve"]

_log = logging.getLogger("sealtorch.keyserver")
_JSON = (b"content-type", b"application/json")


class KeyServerFront:
    """The handler of the key server's listener (see the module docstring)."""

    def __init__(self, app: Any, *, server: tuple[str, int] | None = None) -> None:
        self.runtime: Runtime = app.runtime
        self._routes: dict[tuple[str, str], Endpoint] = app.fast_routes
        self._other = asgi_handler(app, refusal=self.refusal, server=server)

    def dispatch(self, request: Request) -> Response | Awaitable[Response]:
        handler = self._routes.get((request.method, request.path))
        if handler is None:
            return self._other(request)
        return self._answer(handler, request)

    async def _answer(self, handler: Endpoint, request: Request) -> Response:
        started = time.perf_counter()
        scope = {
            "type": "http",
            "method": request.method,
            "path": request.path,
            "headers": request.headers,
            "client": request.client,
        }
        status, headers, content = await answer(self.runtime, handler, scope, request.body)
        observe(self.runtime, scope, request.path, status, time.perf_counter() - started)
        return Response(status, content, [h for h in headers if h[0] != b"content-length"])

    @staticmethod
    def refusal(status: int, code: str, message: str) -> Response:
        """A request the HTTP server refuses itself (malformed, too large), in the protocol's
        error shape."""
        return Response(status, error_body(code, message), [_JSON])

    def observe(self, route: str, status: int) -> None:
        self.runtime.metrics.observe_request(route, "", status, 0.0)


def serve(app: Any, sock: socket.socket, *, ssl_context: ssl.SSLContext | None) -> None:
    """Serve ``app`` (:func:`~sealtorch.keyserver.app.create_app`) on the listening ``sock``
    until SIGTERM/SIGINT (see the module docstring); uvloop when installed."""
    run_server(_serve(app, sock, ssl_context))


async def _serve(app: Any, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
    settings = app.runtime.settings
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    address = sock.getsockname()
    front = KeyServerFront(app, server=address[:2] if isinstance(address, tuple) else None)
    async with app.router.lifespan_context(app):
        server = HttpServer(
            front.dispatch,
            refusal=front.refusal,
            observe=front.observe,
            max_body=settings.max_request_bytes,
            timeouts=settings.read_timeouts,
        )
        await server.listen(sock, ssl_context=ssl_context)
        _log.info("key server process [%d] serving", os.getpid())
        await stop.wait()
        _log.info("key server process [%d] stopping: finishing requests in progress", os.getpid())
        await server.close(grace=settings.graceful_timeout)
    _log.info("key server process [%d]: shutdown complete", os.getpid())
