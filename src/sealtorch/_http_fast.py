"""The small HTTP/1.1 server of the key release protocol (asyncio + the httptools parser).

The key cache serves all its listeners with it, the key server its two release requests
(challenge and release; everything else it hands to its ASGI app through :func:`asgi_handler`).
Release requests are tiny and are answered in well under a millisecond of work, so a general
ASGI server's per-request machinery (message dicts, header re-validation, a second ``write`` for
the body) would cost as much as the release itself. This server does only what the key release
protocol needs:

* HTTP/1.1 with keep-alive and pipelining (requests on one connection are answered in order),
  ``Expect: 100-continue``, ``Connection: close``; no upgrades, no chunked *responses*;
* limits: request line and headers ≤ 16 KiB (431), body ≤ ``max_body`` (413, then close);
  the read deadlines every sealtorch server keeps (:class:`~sealtorch._listen.ReadWatch`:
  headers within ``timeouts.header`` of a connection or of a request's first byte, no pause
  longer than ``timeouts.body`` in a body, the next request within ``timeouts.keep_alive``),
  and the TLS handshake within ``timeouts.header``;
* one ``write`` per response; TLS when the listener is given an ``ssl`` context;
* graceful shutdown: stop accepting, finish the requests in progress, close.

The application is a :data:`Handler`: it gets a :class:`Request` and returns a :class:`Response`
(or an awaitable of one, for work done in a thread or awaited). :func:`asgi_handler` makes one of
an ASGI application (whole responses: nothing the key server serves through it streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final, NoReturn
from urllib.parse import unquote

import httptools

from sealtorch._listen import MAX_HEAD_BYTES, ReadTimeouts, ReadWatch

__all__ = ["Handler", "HttpServer", "Refusal", "Request", "Response", "asgi_handler", "run_server"]

_log = logging.getLogger("sealtorch.http")

_MAX_PIPELINE: Final = 16
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    #: The raw query string (after ``?``), the peer's address (None on a Unix socket) and
    #: whether the connection is TLS.
    query: bytes = b""
    client: tuple[str, int] | None = None
    tls: bool = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


Handler = Callable[[Request], "Response | Awaitable[Response]"]
#: Builds the response for a request the server refuses itself (status, code, message).
Refusal = Callable[[int, str, str], Response]

_STATUS_LINES: dict[int, bytes] = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode() for status in HTTPStatus
}


def _encode(response: Response, *, keep_alive: bool) -> bytes:
    parts = [
        _STATUS_LINES.get(response.status, f"HTTP/1.1 {response.status} \r\n".encode()),
        b"content-length: %d\r\n" % len(response.body),
    ]
    for name, value in response.headers:
        parts += (name, b": ", value, b"\r\n")
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts += (b"\r\n", response.body)
    return b"".join(parts)


class _Connection(asyncio.Protocol):
    """One client connection: parse, queue, answer in order."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = server.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[tuple[Request, bool]] = deque()
        self._busy = False
        self._closing = False
        self._write_paused = False
        self._reading_paused = False
        self._watch: ReadWatch | None = None
        self._refused = False
        self._client: tuple[str, int] | None = None
        self._tls = False
        self._reset_message()

    # -- transport events -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport
        peer = transport.get_extra_info("peername")
        self._client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
        self._tls = transport.get_extra_info("sslcontext") is not None
        self._server.connections.add(self)
        self._watch = ReadWatch(self._loop, self._server.timeouts, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        del exc
        self._server.connections.discard(self)
        self._closing = True
        if self._watch is not None:
            self._watch.close()
        self._queue.clear()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._drain()

    def data_received(self, data: bytes) -> None:
        if self._refused or self._watch is None:
            return
        self._watch.received(len(data))
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._send_refusal(400, "invalid_request", "protocol upgrades are not supported")
        except httptools.HttpParserError:
            # Also raised when a callback refused the request (its answer is written already).
            if not self._refused:
                self._send_refusal(400, "invalid_request", "the request is not valid HTTP/1.1")
        if self._watch.head_too_large():
            self._send_refusal(
                431, "headers_too_large", f"request headers are limited to {MAX_HEAD_BYTES} bytes"
            )

    def eof_received(self) -> bool | None:
        # Answer what was received, then close.
        self._closing = True
        if not self._busy and not self._queue:
            self._close()
        return True

    # -- parser callbacks -----------------------------------------------------------------------

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._body: list[bytes] = []
        self._body_size = 0

    def on_message_begin(self) -> None:
        self._reset_message()
        if self._watch is not None:
            self._watch.message_begun()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        self._headers.append((name.lower(), value))

    def _count_head(self, size: int) -> None:
        """Refuse a head over the limit as soon as the parser hands over its parts (a head
        still arriving is bounded by the watch's count of raw bytes)."""
        self._head_size += size
        if self._head_size > MAX_HEAD_BYTES:
            self._refuse(
                431, "headers_too_large", f"request headers are limited to {MAX_HEAD_BYTES} bytes"
            )

    def on_headers_complete(self) -> None:
        if self._watch is not None:
            self._watch.head_complete()
        if self._parser.should_upgrade():
            self._refuse(400, "invalid_request", "protocol upgrades are not supported")
        cap = self._server.max_body
        for name, value in self._headers:
            if name == b"content-length":
                try:
                    too_large = int(value) > cap
                except ValueError:
                    too_large = True
                if too_large:
                    self._refuse(
                        413, "request_too_large", f"request bodies are limited to {cap} bytes"
                    )
            elif name == b"expect" and value.lower() == b"100-continue" and self._transport:
                self._transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._server.max_body:
            cap = self._server.max_body
            self._refuse(413, "request_too_large", f"request bodies are limited to {cap} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._watch is not None:
            self._watch.message_complete()
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            self._refuse(400, "invalid_request", "the request target is not a valid URL")
        request = Request(
            method=self._parser.get_method().decode("latin-1"),
            path=url.path.decode("latin-1"),
            headers=self._headers,
            body=self._body[0] if len(self._body) == 1 else b"".join(self._body),
            query=url.query or b"",
            client=self._client,
            tls=self._tls,
        )
        self._queue.append((request, self._parser.should_keep_alive()))
        if len(self._queue) >= _MAX_PIPELINE and self._transport and not self._reading_paused:
            self._transport.pause_reading()
            self._reading_paused = True
        self._drain()

    # -- answering ------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Answer queued requests in order; stop at one that needs a thread."""
        while self._queue and not self._busy and not self._write_paused:
            request, keep_alive = self._queue.popleft()
            outcome = self._server.dispatch(request)
            if isinstance(outcome, Response):
                self._write(outcome, keep_alive)
                continue
            self._busy = True
            task = self._loop.create_task(self._await(outcome, keep_alive))
            self._server.tasks.add(task)
            task.add_done_callback(self._server.tasks.discard)
        if self._reading_paused and len(self._queue) < _MAX_PIPELINE // 2 and self._transport:
            self._reading_paused = False
            self._transport.resume_reading()

    async def _await(self, pending: Awaitable[Response], keep_alive: bool) -> None:
        try:
            response = await pending
        finally:
            self._busy = False
        self._write(response, keep_alive)
        self._drain()

    def _write(self, response: Response, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        keep = keep_alive and not self._server.stopping
        transport.write(_encode(response, keep_alive=keep))
        if self._watch is not None:
            self._watch.answered()
        if not keep or (self._closing and not self._queue):
            self._close()

    def _send_refusal(self, status: int, code: str, message: str) -> None:
        """Answer a request the server will not read to the end, then close."""
        if self._refused:
            return
        self._refused = True
        response = self._server.refusal(status, code, message)
        self._server.observe("unmatched", status)
        self._queue.clear()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_encode(response, keep_alive=False))
        self._close()

    def _refuse(self, status: int, code: str, message: str) -> NoReturn:
        """:meth:`_send_refusal` from inside a parser callback (stops the parser)."""
        self._send_refusal(status, code, message)
        raise _Refused

    # -- timers and closing ------------------------------------------------------------------------

    def _timed_out(self, what: str) -> None:
        _log.debug("closing a connection that kept the server waiting (%s)", what)
        self._close()

    def _close(self) -> None:
        self._closing = True
        if self._watch is not None:
            self._watch.close()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else after the response in progress."""
        self._closing = True
        if not self._busy and not self._queue:
            self._close()


class _Refused(Exception):  # noqa: N818 - internal control flow out of the parser callbacks
    pass


class HttpServer:
    """Serves one :data:`Handler` on listening sockets (see module docstring)."""

    def __init__(
        self,
        handler: Handler,
        *,
        refusal: Refusal,
        observe: Callable[[str, int], None] | None = None,
        max_body: int = 64 * 1024,
        timeouts: ReadTimeouts | None = None,
    ) -> None:
        self.dispatch = handler
        self.refusal = refusal
        self.observe = observe or (lambda route, status: None)
        self.max_body = max_body
        self.timeouts = timeouts or ReadTimeouts()
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self._servers: list[asyncio.AbstractServer] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the server is not started")
        return self._loop

    async def listen(
        self, sock: socket.socket, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """Start serving on an already bound and listening socket."""
        self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        handshake = self.timeouts.header if ssl_context is not None else None
        if sock.family == socket.AF_UNIX:
            server = await self._loop.create_unix_server(
                lambda: _Connection(self),
                sock=sock,
                ssl=ssl_context,
                backlog=1024,
                ssl_handshake_timeout=handshake,
            )
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server = await self._loop.create_server(
                lambda: _Connection(self),
                sock=sock,
                ssl=ssl_context,
                backlog=1024,
                ssl_handshake_timeout=handshake,
            )
        self._servers.append(server)

    async def close(self, *, grace: float = 5.0) -> None:
        """Stop accepting, let requests in progress finish (up to ``grace`` s), close all."""
        self.stopping = True
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.shutdown()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=grace)
        for connection in list(self.connections):
            connection._close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=grace)
        self._servers.clear()


# -- an ASGI application as a handler ------------------------------------------------------------

_ASGI: Final = {"version": "3.0", "spec_version": "2.3"}
#: Response headers the server writes itself.
_OWN_HEADERS: Final = frozenset({b"content-length", b"connection", b"transfer-encoding"})


def asgi_handler(app: Any, *, refusal: Refusal, server: tuple[str, int] | None = None) -> Handler:
    """A :data:`Handler` that answers with the ASGI application ``app`` (HTTP only): the
    request's body in one ``http.request`` message, the response gathered whole (a streaming
    response is sent once it ends). An exception out of ``app`` before it answered is a 500 made
    by ``refusal``. ``server``: the listening address, for the scope."""

    async def handle(request: Request) -> Response:
        raw_path = request.path.encode("latin-1")
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": "1.1",
            "method": request.method,
            "scheme": "https" if request.tls else "http",
            "path": unquote(request.path),
            "raw_path": raw_path,
            "query_string": request.query,
            "root_path": "",
            "headers": request.headers,
            "client": request.client,
            "server": server,
            "state": {},
        }
        delivered = False
        gone = asyncio.Event()  # never set while the handler runs: the request is whole

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        status = 0
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [
                    (bytes(name).lower(), bytes(value))
                    for name, value in message.get("headers", ())
                    if bytes(name).lower() not in _OWN_HEADERS
                ]
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))

        try:
            await app(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - answered, never a hung connection
            _log.error(
                "internal error in %s %s: %s", request.method, request.path, type(exc).__name__
            )
            if not status:
                return refusal(500, "internal_error", "internal error; see the server log")
        if not status:
            return refusal(500, "internal_error", "internal error; see the server log")
        body = b"" if request.method == "HEAD" else b"".join(chunks)
        return Response(status, body, headers)

    return handle


def run_server(main: Coroutine[Any, Any, None]) -> None:
    """Run a server's ``main`` to completion on a new event loop: uvloop when installed."""
    factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)
