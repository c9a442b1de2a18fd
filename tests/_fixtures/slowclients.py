"""Clients that keep a server waiting, on real sockets, for the read-timeout tests of all three
servers (the key server, the key cache and the inference server).

Each takes ``connect``, a function returning a new connected socket (plain, Unix or TLS). The
checks wait for events (the server closing the connection), never for a time: a server that
does not cut a slow client makes the check fail after ``patience`` seconds, far beyond any
timeout under test.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Callable

Connect = Callable[[], socket.socket]

#: How long a check waits for the server to act (the timeouts under test are a few seconds).
PATIENCE = 120.0
#: What :func:`endless_header` sends at most: a server that buffers it all has no head limit.
ENDLESS = 16 << 20
#: A request head long enough to take minutes when sent a byte at a time.
SLOW_HEAD = b"GET / HTTP/1.1\r\nHost: slow\r\nX-Padding: " + b"p" * 4000 + b"\r\n\r\n"
_GONE = (ConnectionError, ssl.SSLError, OSError)


def closed_by_server(sock: socket.socket, *, patience: float = PATIENCE) -> bool:
    """Read until the server closes the connection (True), or ``patience`` runs out (False).
    Whatever the server sends first (an error response) is read and ignored."""
    sock.settimeout(patience)
    deadline = time.monotonic() + patience
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except _GONE:
        return True
    return False


def silent(connect: Connect) -> bool:
    """Connect and send nothing: whether the server hangs up."""
    with connect() as sock:
        return closed_by_server(sock)


def trickle(sock: socket.socket, data: bytes, *, interval: float = 0.05) -> int:
    """Send ``data`` a byte at a time, ``interval`` seconds apart, until the server closes the
    connection; the number of bytes sent (``len(data)`` if it never did)."""
    for index in range(len(data)):
        try:
            sock.sendall(data[index : index + 1])
        except _GONE:
            return index
        time.sleep(interval)
    return len(data)


def slowloris(connect: Connect, head: bytes = SLOW_HEAD, *, interval: float = 0.05) -> int:
    """Send a request head a byte at a time; the bytes sent before the server hung up."""
    with connect() as sock:
        sent = trickle(sock, head, interval=interval)
        if sent == len(head):
            return sent
        assert closed_by_server(sock)
        return sent


def stalled_body(connect: Connect, path: str = "/", *, host: str = "slow") -> bool:
    """Send a complete head announcing a 1000-byte body, 10 bytes of it, then nothing: whether
    the server hangs up (it may answer first, e.g. 4xx)."""
    with connect() as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n".encode()
            + b"0123456789"
        )
        return closed_by_server(sock)


def endless_header(
    connect: Connect, *, piece: int = 4096, limit: int = ENDLESS
) -> tuple[int, bytes]:
    """Stream one header that never ends, ``piece`` bytes at a time, until the server hangs up
    (at most ``limit`` bytes): the bytes sent, and the start of the server's answer if it could
    be read (a server closing a socket with unread input resets it, which may drop the answer)."""
    with connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: big\r\nX-Endless: ")
        sent = 0
        while sent < limit:
            try:
                sock.sendall(b"a" * piece)
            except _GONE:
                break
            sent += piece
            if select.select([sock], [], [], 0.001)[0]:
                break  # the server answered (or hung up)
        answer = b""
        sock.settimeout(PATIENCE)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except _GONE:
            pass
        return sent, answer
