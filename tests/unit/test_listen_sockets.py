"""The one socket-listening implementation (sealtorch._listen) on real sockets: TCP over IPv4
and IPv6, SO_REUSEPORT for the key server's workers, a port only held, a taken port, Unix
sockets with their mode, and the TLS context every server uses."""

from __future__ import annotations

import socket
import ssl
import stat
from pathlib import Path

import pytest

from _fixtures.keyserver import make_tls
from sealtorch._listen import (
    BACKLOG,
    host_port,
    listen_tcp,
    listen_unix,
    socket_url,
    tls_context,
)
from sealtorch.errors import ConfigError


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_tcp_ipv4_listens_and_says_where() -> None:
    sock = listen_tcp("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert socket_url(sock, scheme="https") == f"https://127.0.0.1:{port}"
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        sock.close()


@pytest.mark.skipif(not _ipv6(), reason="no IPv6 loopback on this host")
def test_tcp_ipv6_listens_and_brackets_its_address() -> None:
    sock = listen_tcp("::1", 0)
    try:
        assert sock.family == socket.AF_INET6
        port = sock.getsockname()[1]
        assert socket_url(sock, scheme="http") == f"http://[::1]:{port}"
        with socket.create_connection(("::1", port), timeout=5):
            pass
    finally:
        sock.close()


def test_a_taken_port_says_how_to_get_a_free_one() -> None:
    taken = listen_tcp("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as caught:
            listen_tcp("127.0.0.1", port, free_port="--tcp 127.0.0.1:0")
        message = str(caught.value)
        assert message.startswith(f"cannot listen on 127.0.0.1:{port}: ")
        assert "(--tcp 127.0.0.1:0 picks a free one and prints it)" in message
    finally:
        taken.close()


def test_reuse_port_lets_workers_share_a_held_port() -> None:
    """The key server's parent holds the port (bound, not listening); each worker listens."""
    held = listen_tcp("127.0.0.1", 0, reuse_port=True, listen=False)
    workers: list[socket.socket] = []
    try:
        address = held.getsockname()[:2]
        with pytest.raises(ConnectionRefusedError):  # held only: nobody accepts yet
            socket.create_connection(address, timeout=5).close()
        workers = [listen_tcp(*address, reuse_port=True) for _ in range(2)]
        with socket.create_connection(address, timeout=5):
            pass
        with pytest.raises(ConfigError, match="cannot listen on"):  # without SO_REUSEPORT
            listen_tcp(*address)
    finally:
        for sock in (held, *workers):
            sock.close()


def test_unix_socket_mode_and_url(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ks.sock"
    sock = listen_unix(path, mode=0o660)
    try:
        info = path.lstat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert socket_url(sock, scheme="http") == f"unix://{path}"
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
    finally:
        sock.close()


def test_a_live_unix_socket_is_never_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "ks.sock"
    live = listen_unix(path)
    try:
        with pytest.raises(ConfigError, match="another process is listening"):
            listen_unix(path, mode=0o660)
        with socket.socket(socket.AF_UNIX) as client:  # the first server still answers
            client.connect(str(path))
    finally:
        live.close()


def test_host_port_brackets_ipv6() -> None:
    assert host_port("::", 8443) == "[::]:8443"
    assert host_port("10.0.0.5", 0) == "10.0.0.5:0"
    assert BACKLOG >= 1024


def test_tls_context_is_tls12_or_later_and_refuses_missing_files(tmp_path: Path) -> None:
    files = make_tls(tmp_path / "tls")
    context = tls_context(files.cert, files.key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigError):
        tls_context(files.cert, tmp_path / "missing.key")
