"""Failover by DNS: a key server name with several addresses, one of them dead.

The release client documents that a name with several addresses needs no list of URLs: each
connection tries the name's addresses in turn. Here the resolver (``socket.getaddrinfo``, the
seam every connection goes through) answers for ``localhost`` with a dead loopback address
first and the real key server second, as a DNS name of two replicas with one down would.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from _fixtures.keyserver import KeyServerUnderTest
from sealtorch.errors import KeySourceUnreachableError

#: A loopback address nothing listens on (the key server binds 127.0.0.1 only).
_DEAD = "127.0.0.2"


def _resolving_localhost_to(
    monkeypatch: pytest.MonkeyPatch, addresses: list[str], asked: list[str]
) -> None:
    real = socket.getaddrinfo

    def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "localhost":
            asked.append(host)
            return [
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port)))
                for address in addresses
            ]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)


def test_a_name_whose_first_address_is_dead_releases_from_the_next(
    keyserver: KeyServerUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyserver.add_model("m")
    port = int(keyserver.url.rsplit(":", 1)[1])
    url = f"https://localhost:{port}"
    asked: list[str] = []

    # Control: the dead address alone is unreachable (so the next test step proves failover).
    _resolving_localhost_to(monkeypatch, [_DEAD], asked)
    with pytest.raises(KeySourceUnreachableError):
        _release(keyserver, url)
    assert asked

    asked.clear()
    _resolving_localhost_to(monkeypatch, [_DEAD, "127.0.0.1"], asked)
    result = _release(keyserver, url)
    assert [(k.model_id, k.key_version) for k in result.keys] == [("m", 1)]
    assert asked  # the name was resolved (to both addresses), not bypassed


def _release(keyserver: KeyServerUnderTest, url: str) -> Any:
    from sealtorch.client import KeyReleaseClient

    with KeyReleaseClient(
        url,
        attester=keyserver.attester,
        ca=keyserver.ca,
        trusted_release_keys=[keyserver.release_key],
        retries=0,
    ) as client:
        return client.release(["m"])
