"""The real ``sealtorch keyserver serve`` process cuts slow clients (read timeouts from its
configuration, here the environment), over TLS, and keeps serving normal ones."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from _fixtures import slowclients
from _fixtures.keyserver import init_dir, start_serve
from sealtorch._crypto.tls import client_ssl_context
from sealtorch.attestation import SimAttester

pytestmark = pytest.mark.e2e

TIMEOUTS = {
    "SEALTORCH_KEYSERVER_SERVER_HEADER_TIMEOUT": "2",
    "SEALTORCH_KEYSERVER_SERVER_BODY_TIMEOUT": "2",
    "SEALTORCH_KEYSERVER_SERVER_KEEP_ALIVE_TIMEOUT": "2",
}


def test_slow_clients_are_cut_and_normal_ones_served(tmp_path: Path) -> None:
    data, _ = init_dir(tmp_path, SimAttester(role="app", key_path=tmp_path / "sim.key"))
    server = start_serve(data, env=TIMEOUTS, log_dir=tmp_path / "logs")
    try:
        context = client_ssl_context(ca_path=data / "tls" / "ca.crt")
        address = urlsplit(server.url)
        host, port = str(address.hostname), int(address.port or 0)

        def connect() -> socket.socket:
            raw = socket.create_connection((host, port), timeout=10)
            return context.wrap_socket(raw, server_hostname=host)

        assert slowclients.silent(connect)  # TLS is up; then not a byte
        assert slowclients.slowloris(connect) < len(slowclients.SLOW_HEAD)
        assert slowclients.stalled_body(connect, "/v1/attestation/challenge")
        sent, answer = slowclients.endless_header(connect)
        assert sent < slowclients.ENDLESS  # refused, not buffered without end
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 ")
        with httpx.Client(base_url=server.url, verify=context, timeout=30) as client:
            for _ in range(3):  # keep-alive: one connection, pauses shorter than the timeout
                assert client.get("/readyz").status_code == 200
    finally:
        server.stop()
