"""Failover between key servers (issue 14, item 3), on real ``keyserver serve`` processes.

Before: ``KeyReleaseClient``, the key cache and ``serve`` took one URL; with two replicas,
clients of a killed replica failed until it came back. Now they take several and move to the
next on a connection failure or a 503, with jittered backoff between rounds.
"""

from __future__ import annotations

import http.server
import json
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from _fixtures.keyserver import init_dir, release_key_of, start_serve
from sealtorch.attestation import SimAttester
from sealtorch.client import AdminClient, KeyReleaseClient, read_token
from sealtorch.errors import KeySourceUnreachableError

pytestmark = pytest.mark.e2e


def _policy(attester: SimAttester) -> dict[str, object]:
    return {"allowed_tees": ["sim"], "sim": {"mrenclave": [attester.mrenclave]}}


@pytest.mark.postgres
def test_a_client_of_a_killed_replica_moves_to_the_other(tmp_path: Path, postgres: str) -> None:
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    data, token_file = init_dir(tmp_path, attester, "--database-url", postgres)
    ca = data / "tls" / "ca.crt"
    first, second = (start_serve(data, log_dir=tmp_path / "logs") for _ in range(2))
    try:
        with AdminClient(first.url, token=read_token(token_file=token_file), ca=ca) as admin:
            admin.create_model("m")
            admin.set_policy("m", _policy(attester))
        with KeyReleaseClient(
            [first.url, second.url],
            attester=attester,
            ca=ca,
            trusted_release_keys=[release_key_of(data)],
            remember=False,
            sleep=lambda _: None,
        ) as client:
            before = client.release(["m"])
            assert client.url == first.url
            first.stop(signal.SIGKILL)
            for _ in range(20):  # every release succeeds, through the other replica
                after = client.release(["m"])
                assert [k.key.fingerprint for k in after.keys] == [
                    k.key.fingerprint for k in before.keys
                ]
            assert client.url == second.url  # and it stays there (no detour per request)
            second.stop(signal.SIGKILL)
            with pytest.raises(KeySourceUnreachableError, match="cannot reach a key source") as e:
                client.release(["m"])
            assert first.url in str(e.value)
            assert second.url in str(e.value)
    finally:
        first.stop()
        second.stop()


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """A key server replica whose store is down: every request is a 503."""

    def do_POST(self) -> None:
        body = json.dumps(
            {"error": {"code": "store_unavailable", "message": "the key store is unavailable"}}
        ).encode()
        self.send_response(503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        del format, args


@pytest.fixture
def unavailable() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_503_moves_to_the_next_key_server(
    tmp_path: Path, unavailable: str, caplog: pytest.LogCaptureFixture
) -> None:
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    data, token_file = init_dir(tmp_path, attester)
    ca = data / "tls" / "ca.crt"
    server = start_serve(data, log_dir=tmp_path / "logs")
    try:
        with AdminClient(server.url, token=read_token(token_file=token_file), ca=ca) as admin:
            admin.create_model("m")
            admin.set_policy("m", _policy(attester))
        caplog.set_level(logging.WARNING, logger="sealtorch.client")
        with KeyReleaseClient(
            f"{unavailable},{server.url}",  # a comma list works like a sequence
            attester=attester,
            ca=ca,
            trusted_release_keys=[release_key_of(data)],
            allow_insecure_http=True,  # the stand-in replica is plain HTTP on loopback
            sleep=lambda _: None,
        ) as client:
            assert client.urls == (unavailable, server.url)
            result = client.release(["m"])
        assert [k.model_id for k in result.keys] == ["m"]
        assert f"{unavailable}: HTTP 503 (store_unavailable); trying the next" in caplog.text
    finally:
        server.stop()


def test_one_key_server_answering_503_is_retried_with_backoff_then_reported(
    tmp_path: Path, unavailable: str
) -> None:
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    pauses: list[float] = []
    with (
        KeyReleaseClient(
            unavailable,
            attester=attester,
            trusted_release_keys=["sealtorch-release-key-v1:" + "A" * 43],
            allow_insecure_http=True,
            retries=3,
            backoff=0.1,
            sleep=pauses.append,
        ) as client,
        pytest.raises(Exception) as info,
    ):
        client.release(["m"])
    assert "store_unavailable" in str(info.value)
    assert len(pauses) == 3
    assert all(0.05 <= p <= 0.6 for p in pauses)  # jittered exponential backoff
