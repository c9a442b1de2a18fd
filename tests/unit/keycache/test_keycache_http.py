"""The key cache's small HTTP/1.1 server, driven with raw bytes on real sockets: framing,
keep-alive and pipelining, limits, malformed input, 100-continue, read timeouts (idle, slow
heads and bodies), graceful close, TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest

from _fixtures import slowclients
from sealtorch._http_fast import HttpServer, Request, Response
from sealtorch._listen import ReadTimeouts, listen_tcp, listen_unix
from sealtorch.keycache.app import error_response


class Echo:
    """A handler that answers ``/echo`` with the body and ``/slow`` from a thread."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.release = threading.Event()

    def __call__(self, request: Request) -> Response | Awaitable[Response]:
        self.seen.append(request)
        if request.path == "/slow":
            return asyncio.get_running_loop().run_in_executor(None, self._slow)
        return Response(
            200, request.method.encode() + b" " + request.body, [(b"x-path", request.path.encode())]
        )

    def _slow(self) -> Response:
        self.release.wait(10)
        return Response(200, b"slow")


class Running:
    def __init__(self, server: HttpServer, loop: asyncio.AbstractEventLoop, address: str) -> None:
        self.server = server
        self.loop = loop
        self.address = address

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(self.address)
        return sock

    def close(self, grace: float = 5.0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(grace=grace), self.loop).result(30)


def _serve(
    server: HttpServer, sock: socket.socket, **options: object
) -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.listen(sock, **options), loop).result(30)  # type: ignore[arg-type]
    return loop, thread


#: Short read timeouts (a whole head or body still arrives well within them on a slow machine).
TIMEOUTS = ReadTimeouts(header=2.0, body=2.0, keep_alive=1.0)


@pytest.fixture
def echo() -> Echo:
    return Echo()


@pytest.fixture
def running(tmp_path: Path, echo: Echo) -> Iterator[Running]:
    server = HttpServer(echo, refusal=error_response, max_body=1024, timeouts=TIMEOUTS)
    path = tmp_path / "http.sock"
    loop, thread = _serve(server, listen_unix(path))
    yield Running(server, loop, str(path))
    if not server.stopping:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[bytes, bytes], bytes]:
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    buffer[:] = rest[length:]
    return status, headers, rest[:length]


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_keep_alive_and_pipelining_answer_in_order(running: Running, echo: Echo) -> None:
    with running.connect() as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none"
            b"GET /two?q=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nfou\r\n1\r\nr\r\n0\r\n\r\n"
        )
        buffer = bytearray()
        assert _read_response(sock, buffer)[2] == b"POST one"
        _, headers, body = _read_response(sock, buffer)
        assert (body, headers[b"x-path"]) == (b"GET ", b"/two")
        echo.release.set()  # the thread-bound request blocks the ones behind it, in order
        assert _read_response(sock, buffer)[2] == b"slow"
        assert _read_response(sock, buffer)[2] == b"POST four"
    assert [r.path for r in echo.seen] == ["/echo", "/two", "/slow", "/echo"]


def test_connection_close_is_honoured(running: Running) -> None:
    with running.connect() as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        _, headers, _ = _read_response(sock, bytearray())
        assert headers[b"connection"] == b"close"
        assert _closed(sock)
    with running.connect() as sock:
        sock.sendall(b"GET /a HTTP/1.0\r\n\r\n")
        _read_response(sock, bytearray())
        assert _closed(sock)


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"POST /echo HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", 413, "request_too_large"),
        (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n500\r\n" + b"x" * 1280, 413,
         "request_too_large"),
        (b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\n\r\n", 431, "headers_too_large"),
        (b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 17000 + b"\r\n\r\n", 431, "headers_too_large"),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "invalid_request"),
        (b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n", 400, "invalid_request"),
        (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", 400,
         "invalid_request"),
    ],
    ids=["length", "chunked", "long-url", "long-header", "garbage", "bad-length", "upgrade"],
)  # fmt: skip
def test_refusals_answer_then_close(
    running: Running, echo: Echo, raw: bytes, status: int, code: str
) -> None:
    import json

    with running.connect() as sock:
        sock.sendall(raw)
        got, headers, body = _read_response(sock, bytearray())
        assert got == status
        assert json.loads(body)["error"]["code"] == code
        assert headers[b"connection"] == b"close"
        assert _closed(sock)
    assert echo.seen == []


def test_expect_100_continue(running: Running) -> None:
    with running.connect() as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        assert sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"body")
        assert _read_response(sock, bytearray())[2] == b"POST body"


def test_idle_connections_are_closed(running: Running) -> None:
    with running.connect() as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        _read_response(sock, bytearray())
        started = time.monotonic()
        assert _closed(sock)  # blocks until the 1 s keep-alive timeout closes it
        assert time.monotonic() - started < 5
    with running.connect() as sock:  # slowloris: a request that never completes
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n")
        assert _closed(sock)


def test_a_silent_connection_is_closed(running: Running) -> None:
    assert slowclients.silent(running.connect)


def test_a_head_sent_a_byte_at_a_time_is_cut_at_the_header_timeout(
    running: Running, echo: Echo
) -> None:
    # Every byte arrives well within the keep-alive time, but the head as a whole is late.
    sent = slowclients.slowloris(running.connect)
    assert sent < len(slowclients.SLOW_HEAD)
    assert echo.seen == []


def test_a_stalled_body_is_cut_and_a_steady_one_is_not(running: Running, echo: Echo) -> None:
    assert slowclients.stalled_body(running.connect, "/echo")
    assert echo.seen == []
    # A body that keeps coming is read, however long it takes in all (here longer than the
    # header timeout): the body timeout bounds each pause, not the total.
    with running.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n")
        assert slowclients.trickle(sock, b"x" * 30, interval=0.1) == 30
        assert _read_response(sock, bytearray())[2] == b"POST " + b"x" * 30


def test_a_header_that_never_ends_is_refused(running: Running, echo: Echo) -> None:
    sent, answer = slowclients.endless_header(running.connect)
    assert sent < slowclients.ENDLESS  # refused, not buffered without end
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 ")
    assert echo.seen == []


def test_keep_alive_clients_are_not_disturbed(running: Running, echo: Echo) -> None:
    with running.connect() as sock:
        buffer = bytearray()
        for _ in range(3):
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
            assert _read_response(sock, buffer)[2] == b"POST ok"
        # While the server takes longer than every timeout to answer, the client owes nothing.
        sock.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        release = threading.Timer(3.0, echo.release.set)
        release.start()
        assert _read_response(sock, buffer)[2] == b"slow"
        release.join()


def test_graceful_close_finishes_requests_in_progress(running: Running, echo: Echo) -> None:
    with running.connect() as busy, running.connect() as idle:
        idle.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        _read_response(idle, bytearray())
        busy.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        while not echo.seen or echo.seen[-1].path != "/slow":
            time.sleep(0.01)
        closing = threading.Thread(target=running.close)
        closing.start()
        assert _closed(idle)
        echo.release.set()
        status, headers, body = _read_response(busy, bytearray())
        assert (status, body) == (200, b"slow")
        assert headers[b"connection"] == b"close"
        closing.join(30)
    with socket.socket(socket.AF_UNIX) as late, pytest.raises(OSError):
        late.connect(running.address)  # no longer accepting


def test_tls_on_tcp(tmp_path: Path, echo: Echo) -> None:
    from sealtorch._crypto.tls import (
        client_ssl_context,
        create_dev_ca,
        create_server_certificate,
        server_ssl_context,
    )

    ca = create_dev_ca(cert_path=tmp_path / "ca.crt", key_path=tmp_path / "ca.key")
    cert = create_server_certificate(
        ca=ca, cert_path=tmp_path / "server.crt", key_path=tmp_path / "server.key"
    )
    server = HttpServer(echo, refusal=error_response)
    listener = listen_tcp("127.0.0.1", 0)
    port = listener.getsockname()[1]
    loop, thread = _serve(
        server,
        listener,
        ssl_context=server_ssl_context(cert_path=cert.cert, key_path=cert.key),
    )
    try:
        import httpx

        verify: ssl.SSLContext = client_ssl_context(ca_path=ca.cert)
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=verify) as client:
            response = client.post("/echo", content=b"over tls")
            assert response.content == b"POST over tls"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
            plain.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")  # no TLS: refused
            assert _closed(plain)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_tls_handshake_that_never_comes_is_cut(tmp_path: Path, echo: Echo) -> None:
    from sealtorch._crypto.tls import create_dev_ca, create_server_certificate, server_ssl_context

    ca = create_dev_ca(cert_path=tmp_path / "ca.crt", key_path=tmp_path / "ca.key")
    cert = create_server_certificate(
        ca=ca, cert_path=tmp_path / "server.crt", key_path=tmp_path / "server.key"
    )
    server = HttpServer(echo, refusal=error_response, timeouts=TIMEOUTS)
    listener = listen_tcp("127.0.0.1", 0)
    port = listener.getsockname()[1]
    context = server_ssl_context(cert_path=cert.cert, key_path=cert.key)
    loop, thread = _serve(server, listener, ssl_context=context)
    try:
        assert slowclients.silent(lambda: socket.create_connection(("127.0.0.1", port), 10))
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
