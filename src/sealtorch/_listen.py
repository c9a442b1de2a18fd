"""What the three servers share about listening and reading requests.

The key server, the key cache and the inference server bind their sockets here: TCP
(:func:`listen_tcp`: IPv4 or IPv6, optionally ``SO_REUSEPORT`` for the key server's workers)
and Unix sockets (:func:`listen_unix`: born with a restrictive mode, a stale socket file is
replaced but a live one or any other file is not), all with one :data:`BACKLOG`, and TLS
contexts from one place (:func:`tls_context`). A failure is worded the same way by
:func:`listen_error`, and a port that is already taken also says how to get a free one (each
server's option for port 0).

Each reads HTTP/1.1 with httptools (uvicorn's protocol for the inference server,
:mod:`sealtorch._http_fast` for the key cache and the key server), and every connection of all
three is held to the same :class:`ReadTimeouts` by a :class:`ReadWatch`: a client that opens
connections and sends nothing, or sends its headers a byte at a time (slowloris), or stalls in
the middle of a body, is disconnected instead of holding the connection (and its buffers) forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import math
import os
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from sealtorch.errors import ConfigError

if TYPE_CHECKING:
    import ssl

__all__ = [
    "BACKLOG",
    "MAX_HEAD_BYTES",
    "ReadTimeouts",
    "ReadWatch",
    "host_port",
    "listen_error",
    "listen_tcp",
    "listen_unix",
    "socket_url",
    "tls_context",
]

#: Largest request line plus headers a server reads (431 beyond; uvicorn's h11 default).
MAX_HEAD_BYTES: Final = 16 * 1024
#: Connections the kernel queues for every listening socket before the server accepts them.
BACKLOG: Final = 2048
_LONGEST: Final = 3600.0


def listen_error(where: str, exc: OSError, *, free_port: str | None = None) -> ConfigError:
    """``cannot listen on WHERE: REASON``, with what to do when the address is in use.

    ``free_port`` is how to ask this server for a free port (e.g. ``--port 0``); ``None`` for a
    Unix socket.
    """
    message = f"cannot listen on {where}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        message += "; another process is listening there: stop it or choose another "
        message += f"port ({free_port} picks a free one and prints it)" if free_port else "address"
    return ConfigError(message)


def host_port(host: str, port: int) -> str:
    """``HOST:PORT``, an IPv6 address in brackets (``[::1]:8443``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_tcp(
    host: str,
    port: int,
    *,
    free_port: str | None = "--port 0",
    reuse_port: bool = False,
    listen: bool = True,
) -> socket.socket:
    """A TCP socket bound to ``host`` (an IPv6 address if it has a colon, else IPv4 or a name)
    and ``port`` (0: a free one), listening unless ``listen`` is false (a port only held).

    ``reuse_port``: ``SO_REUSEPORT``, so several processes of the same user each listen on the
    port. ``free_port`` is how to ask the server for a free port, for the error when the port
    is taken. Failures are :class:`ConfigError` (:func:`listen_error`).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise listen_error(host_port(host, port), exc, free_port=free_port) from exc
    return sock


def listen_unix(
    path: Path, *, mode: int = 0o600, group: str | None = None, group_option: str = "--socket-group"
) -> socket.socket:
    """A listening Unix socket at ``path`` with exactly ``mode`` (and ``group``, named in
    errors as ``group_option``). A socket file nobody listens on is replaced; a live socket or
    any other file is refused (:class:`ConfigError`)."""
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError as exc:
            raise ConfigError(f"{group_option} {group!r}: no such group on this host") from exc
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _umask(0o177):  # the socket file is born 0600: never open to everyone
            sock.bind(str(path))
        if gid != -1:
            os.chown(path, -1, gid)
        path.chmod(mode)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise listen_error(str(path), exc) from exc
    return sock


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _remove_stale_socket(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"cannot check the existing socket {path}: {exc.strerror}") from exc
        path.unlink(missing_ok=True)  # stale: nobody listens
    else:
        raise ConfigError(f"another process is listening on {path}; stop it or pick another path")
    finally:
        probe.close()


def socket_url(sock: socket.socket, *, scheme: str) -> str:
    """Where a bound socket answers: ``unix:///path`` or ``SCHEME://HOST:PORT``."""
    if sock.family == socket.AF_UNIX:
        return f"unix://{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"{scheme}://{host_port(host, port)}"


def tls_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """The servers' TLS context (TLS >= 1.2, :func:`sealtorch._crypto.tls.server_ssl_context`)
    for a certificate chain and its key; :class:`ConfigError` when they cannot be loaded."""
    from sealtorch._crypto.tls import server_ssl_context

    return server_ssl_context(cert_path=cert, key_path=key)


@dataclass(frozen=True)
class ReadTimeouts:
    """How long a client may take to send its request, in seconds."""

    #: From a new connection, or the first byte of a request, to the end of its headers: a
    #: fixed deadline, not extended by each byte that arrives.
    header: float = 10.0
    #: Longest pause while a request body arrives.
    body: float = 30.0
    #: From the end of a response to the first byte of the next request on the connection.
    keep_alive: float = 30.0

    def __post_init__(self) -> None:
        for name, value in (
            ("header", self.header),
            ("body", self.body),
            ("keep-alive", self.keep_alive),
        ):
            if not 0 < value <= _LONGEST:
                raise ConfigError(
                    f"the {name} timeout is {value} s; give more than 0 and at most "
                    f"{_LONGEST:.0f} seconds"
                )


# What a connection is waiting for.
_IDLE: Final = "idle"  # the next request (keep-alive)
_HEAD: Final = "head"  # the rest of a request's line and headers
_BODY: Final = "body"  # the rest of a request's body
_BUSY: Final = "busy"  # the server's own answer: the client owes nothing meanwhile


class ReadWatch:
    """The read deadlines of one HTTP/1.1 connection, fed by its parser's events.

    A new connection owes the head of a request within ``header`` seconds; once the head is
    read, the body may pause at most ``body`` seconds at a time; once every request read so far
    is answered, the next one must start within ``keep_alive`` seconds, and its head must be
    complete ``header`` seconds after its first byte. While the server is still answering
    (pipelined requests included) no clock runs. When a deadline passes, ``on_timeout(what)``
    is called once (``what``: ``"head"``, ``"body"`` or ``"idle"``); the owner closes the
    connection. Request heads are also counted: :meth:`head_too_large` says when one exceeds
    ``max_head`` bytes (the owner answers 431).

    One timer per connection, moved only when a deadline comes earlier; a timer that fires
    early re-arms itself, so bytes arriving cost no timer operation.
    """

    __slots__ = (
        "_answers",
        "_closed",
        "_deadline",
        "_head_bytes",
        "_heads",
        "_last_read",
        "_loop",
        "_max_head",
        "_on_timeout",
        "_phase",
        "_reading",
        "_timeouts",
        "_timer",
        "_timer_at",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeouts: ReadTimeouts,
        on_timeout: Callable[[str], None],
        *,
        max_head: int = MAX_HEAD_BYTES,
    ) -> None:
        self._loop = loop
        self._timeouts = timeouts
        self._on_timeout = on_timeout
        self._max_head = max_head
        self._reading = _HEAD  # where the parser is: between requests, in a head, in a body
        self._heads = 0  # requests whose head was read
        self._answers = 0  # responses sent
        self._head_bytes = 0
        self._phase = ""
        self._deadline = math.inf
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._closed = False
        self._update()

    # -- events ------------------------------------------------------------------------------

    def received(self, size: int) -> None:
        """Bytes arrived (call before handing them to the parser)."""
        if self._reading == _BODY:
            self._last_read = self._loop.time()
        else:
            self._head_bytes += size

    def head_too_large(self) -> bool:
        """Whether the request head being read is over the limit (call after parsing)."""
        return self._reading != _BODY and self._head_bytes > self._max_head

    def message_begun(self) -> None:
        """The parser saw the first byte of a request."""
        if self._reading == _IDLE:
            self._reading = _HEAD
            self._update()

    def head_complete(self) -> None:
        self._heads += 1
        self._head_bytes = 0
        self._reading = _BODY
        self._update()

    def message_complete(self) -> None:
        self._reading = _IDLE
        self._update()

    def answered(self) -> None:
        """A response was sent in full."""
        self._answers += 1
        self._update()

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the clock ----------------------------------------------------------------------------

    def _update(self) -> None:
        waiting = self._heads - self._answers - (1 if self._reading == _BODY else 0)
        phase = _BUSY if waiting > 0 else self._reading
        if phase == self._phase:
            return
        self._phase = phase
        now = self._loop.time()
        if phase == _BUSY:
            self._deadline = math.inf
            return
        if phase == _BODY:
            self._last_read = now  # the deadline follows the last read
        elif phase == _HEAD:
            self._deadline = now + self._timeouts.header
        else:
            self._deadline = now + self._timeouts.keep_alive
        self._arm()

    def _due(self) -> float:
        if self._phase == _BODY:
            return self._last_read + self._timeouts.body
        return self._deadline

    def _arm(self) -> None:
        due = self._due()
        if self._closed or due == math.inf or self._timer_at <= due:
            return  # the timer that is set fires early enough, and re-arms then
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(due, self._fire)
        self._timer_at = due

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self._closed:
            return
        if self._loop.time() < self._due():
            self._arm()
            return
        self._closed = True
        self._on_timeout(self._phase)
