"""uvicorn as the key server and the inference server run it: its httptools HTTP/1.1 protocol,
held to the read deadlines and head limit every sealtorch server keeps (:mod:`sealtorch._listen`).

uvicorn itself only closes a connection that stays idle after a response: it starts no clock
for a new connection that sends nothing, none while a request's headers or body trickle in
(each byte re-arms nothing and cancels its keep-alive timer), and reads headers of any size. A
client could hold any number of connections open forever with a header byte every few seconds.
:func:`http_options` gives uvicorn a protocol that adds the shared :class:`ReadWatch` to each
connection; the rest — parsing, the ASGI cycle, pipelining, flow control — is uvicorn's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import ssl
from typing import Any, Final, cast

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from sealtorch._listen import MAX_HEAD_BYTES, ReadTimeouts, ReadWatch, tls_context

__all__ = ["TimedHttpToolsProtocol", "http_options", "tls_options"]

_log = logging.getLogger("sealtorch.http")

_TOO_LARGE: Final = f"request headers are limited to {MAX_HEAD_BYTES} bytes".encode()
_431: Final = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TOO_LARGE), _TOO_LARGE)
)


class TimedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a :class:`ReadWatch` on each connection."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        timeouts: ReadTimeouts,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.read_timeouts = timeouts
        self._watch: ReadWatch | None = None

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        self._watch = ReadWatch(self.loop, self.read_timeouts, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watch is not None:
            self._watch.close()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        watch = self._watch
        if watch is None:  # pragma: no cover - uvicorn calls connection_made first
            super().data_received(data)
            return
        watch.received(len(data))
        super().data_received(data)
        if watch.head_too_large() and not self.transport.is_closing():
            watch.close()
            cycle = cast("RequestResponseCycle | None", self.cycle)  # None before a request
            if cycle is None or cycle.response_complete:  # never inside another response
                self.transport.write(_431)
            self.transport.close()

    def handle_websocket_upgrade(self) -> None:
        if self._watch is not None:
            self._watch.close()  # the WebSocket protocol keeps its own time
        super().handle_websocket_upgrade()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._watch is not None:
            self._watch.message_begun()

    def on_headers_complete(self) -> None:
        if self._watch is not None:
            self._watch.head_complete()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._watch is not None:
            self._watch.message_complete()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._watch is not None:
            self._watch.answered()
        super().on_response_complete()

    def _timed_out(self, what: str) -> None:
        _log.debug("closing a connection that kept the server waiting (%s)", what)
        if not self.transport.is_closing():
            self.transport.close()


def http_options(timeouts: ReadTimeouts) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments for the protocol (picklable, for worker processes).

    uvicorn's own keep-alive timer is set no earlier than the watch's, which closes first.
    """
    protocol = functools.partial(TimedHttpToolsProtocol, timeouts=timeouts)
    return {
        "http": cast("type[asyncio.Protocol]", protocol),
        "timeout_keep_alive": max(1, math.ceil(timeouts.keep_alive)),
    }


def tls_options(cert: str, key: str) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments that serve TLS with :func:`sealtorch._listen.
    tls_context` (picklable, for worker processes). The context is built once here, so a bad
    certificate or key fails at start, in this process."""
    tls_context(cert, key)
    return {"ssl_context_factory": functools.partial(_tls_factory, cert, key)}


def _tls_factory(cert: str, key: str, config: Any, default: Any) -> ssl.SSLContext:
    """uvicorn's ``ssl_context_factory`` (a module-level function, so the config pickles)."""
    del config, default
    return tls_context(cert, key)
