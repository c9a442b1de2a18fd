"""The real ``sealtorch keyserver serve`` process behind its HTTP front (``keyserver/_front``):
the release requests on the shared HTTP/1.1 server, everything else through the FastAPI app,
on one TLS port, with the same limits and error shape for both.

Raw sockets send what no library client would (oversized bodies and heads, garbage, pipelined
requests); the answers are read as bytes.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from _fixtures.keyserver import init_dir, start_serve
from sealtorch._crypto.tls import client_ssl_context
from sealtorch.attestation import SimAttester
from sealtorch.client import AdminClient, KeyReleaseClient, read_token

pytestmark = pytest.mark.e2e

_MAX_BODY = 8192


def _read_response(reader: Any) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed) from a socket's ``makefile("rb")``; a
    second call reads the next pipelined one."""
    status = int(reader.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := reader.readline().decode("latin-1").strip()) != "":
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, reader.read(int(headers["content-length"]))


def _error(body: bytes) -> str:
    document = json.loads(body)
    assert set(document) == {"error"}
    assert set(document["error"]) == {"code", "message", "reasons"}
    return str(document["error"]["code"])


def test_one_port_serves_releases_and_the_app_with_the_same_limits(tmp_path: Path) -> None:
    data, _ = init_dir(tmp_path, SimAttester(role="app", key_path=tmp_path / "sim.key"))
    server = start_serve(
        data,
        env={"SEALTORCH_KEYSERVER_RELEASE_MAX_REQUEST_BYTES": str(_MAX_BODY)},
        log_dir=tmp_path / "logs",
    )
    try:
        context = client_ssl_context(ca_path=data / "tls" / "ca.crt")
        address = urlsplit(server.url)
        host, port = str(address.hostname), int(address.port or 0)

        def connect() -> ssl.SSLSocket:
            raw = socket.create_connection((host, port), timeout=30)
            return context.wrap_socket(raw, server_hostname=host)

        # Pipelined on one connection: a release request (fast path), a health check (the
        # app), a challenge (fast path): answered in order.
        with connect() as sock:
            sock.sendall(
                b"POST /v1/attestation/challenge HTTP/1.1\r\nHost: k\r\nContent-Length: 2\r\n\r\n{}"
                b"GET /healthz HTTP/1.1\r\nHost: k\r\n\r\n"
                b"POST /v1/keys/release HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2\r\n\r\n{}"
            )
            reader = sock.makefile("rb")
            answers = [_read_response(reader) for _ in range(3)]
            (s1, h1, b1), (s2, _, _), (s3, _, b3) = answers
            assert (s1, s2, s3) == (200, 200, 400)
            assert h1["content-type"] == "application/json"
            assert "nonce" in json.loads(b1)
            assert _error(b3) == "invalid_request"

        # A body over the cap: 413 in the protocol's shape, from the fast path and the app alike.
        for path in ("/v1/keys/release", "/v1/admin/models"):
            with connect() as sock:
                sock.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {_MAX_BODY + 1}\r\n\r\n".encode()
                )
                status, headers, body = _read_response(sock.makefile("rb"))
                assert (status, _error(body)) == (413, "request_too_large"), path
                assert headers.get("connection") == "close"

        # A head over 16 KiB: 431; not HTTP at all: 400; both in the error shape.
        with connect() as sock:
            sock.sendall(
                b"GET /healthz HTTP/1.1\r\nHost: k\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
            )
            status, _, body = _read_response(sock.makefile("rb"))
            assert (status, _error(body)) == (431, "headers_too_large")
        with connect() as sock:
            sock.sendall(b"HELLO THERE\r\n\r\n")
            status, _, body = _read_response(sock.makefile("rb"))
            assert (status, _error(body)) == (400, "invalid_request")

        with httpx.Client(base_url=server.url, verify=context, timeout=30) as client:
            missing = client.get("/v1/no/such/path")  # the app's 404, in the error shape
            assert (missing.status_code, _error(missing.content)) == (404, "not_found")
            wrong = client.get("/v1/keys/release")  # a fast path's path, another method: the app
            assert (wrong.status_code, _error(wrong.content)) == (405, "method_not_allowed")
            assert client.get("/openapi.json").json()["paths"]["/v1/keys/release"]
            metrics = client.get("/metrics").text
            assert 'route="/v1/attestation/challenge"' in metrics  # fast path requests counted
    finally:
        server.stop()


def test_workers_share_a_unix_socket_and_release_over_it(tmp_path: Path) -> None:
    """``--unix-socket`` with two workers: plain HTTP on one shared socket, releases and the app
    both answered, a graceful stop of both workers, the socket file removed."""
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    data, token_file = init_dir(tmp_path, attester)
    path = tmp_path / "ks.sock"
    server = start_serve(
        data, "--unix-socket", str(path), "--workers", "2", log_dir=tmp_path / "logs"
    )
    try:
        assert server.url == f"unix://{path}"
        with AdminClient(server.url, token=read_token(token_file=token_file)) as admin:
            admin.create_model("m")
            admin.set_policy(
                "m", {"allowed_tees": ["sim"], "sim": {"mrenclave": [attester.mrenclave]}}
            )
        for _ in range(4):
            with KeyReleaseClient(
                server.url, attester=attester, trusted_release_keys=[server.release_key]
            ) as client:
                assert [k.model_id for k in client.release(["m"]).keys] == ["m"]
    finally:
        assert server.stop() in (0, -signal.SIGTERM)
    assert server.logs().count("shutdown complete") == 2
    assert not path.exists()
