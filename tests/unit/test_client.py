"""sealtorch.client against a real key server app on a Unix socket (the key cache's transport):
the response checks from the attacker's side (a man in the middle rewriting responses), retries,
and the KeyProvider interface."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from _fixtures.keyserver import KeyServerUnderTest, new_signing_key, parse_time, running_keyserver
from sealtorch.attestation import SimAttester
from sealtorch.client import KeyReleaseClient
from sealtorch.errors import (
    ConfigError,
    KeyReleaseError,
    KeySourceUnreachableError,
    ProtocolError,
)
from sealtorch.keys import KeyProvider, generate_key
from sealtorch.keyserver.masterkey import FileMasterKey
from sealtorch.keyserver.store import open_store, sqlite_url

#: A well-formed pin, for clients that never reach a key server.
PIN = new_signing_key().public_key.text


@pytest.fixture(scope="module")
def attester(tmp_path_factory: pytest.TempPathFactory) -> SimAttester:
    made = SimAttester(role="app", key_path=tmp_path_factory.mktemp("sim") / "sim.key")
    assert made.mrenclave
    return made


@pytest.fixture
def server(tmp_path: Path, attester: SimAttester) -> Iterator[KeyServerUnderTest]:
    store = open_store(sqlite_url(tmp_path / "keys.db"))
    store.migrate()
    master = FileMasterKey.create(tmp_path / "master.key")
    try:
        with running_keyserver(
            tmp_path, store=store, master=master, attester=attester, uds=tmp_path / "ks.sock"
        ) as running:
            yield running
    finally:
        store.close()


class _Rewriter(httpx.BaseTransport):
    """A man in the middle: forwards to the real server, rewrites release/renew responses."""

    def __init__(self, socket: str, mutate: Callable[[dict[str, Any]], None]) -> None:
        self.inner = httpx.HTTPTransport(uds=socket)
        self.mutate = mutate

    def close(self) -> None:
        self.inner.close()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        response.read()
        response.close()
        if not request.url.path.startswith("/v1/keys/"):
            return response
        body = json.loads(response.content)
        self.mutate(body)
        return httpx.Response(response.status_code, json=body)


def _client(server: KeyServerUnderTest, mutate: Callable[[dict[str, Any]], None]) -> Any:
    socket = server.url.removeprefix("unix://")
    return server.client(transport=_Rewriter(socket, mutate))


def test_release_over_a_unix_socket_is_a_key_provider(server: KeyServerUnderTest) -> None:
    dek = generate_key()
    server.add_model("m", key=dek)
    with server.client() as client:
        assert isinstance(client, KeyProvider)
        assert client.data_key("m", 1) == dek
        assert "DataKey(<redacted>" in repr(client.release(["m"]).keys[0])
        assert dek.material.hex() not in repr(client.release(["m"]))


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(body: dict[str, Any]) -> None:
        for granted in body["granted"]:
            granted[field] = value

    return mutate


def _extend_lease(body: dict[str, Any]) -> None:
    for granted in body["granted"]:
        lease = parse_time(granted["lease_expires_at"]) + timedelta(days=30)
        granted["lease_expires_at"] = lease.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _weaken_policy(body: dict[str, Any]) -> None:
    for granted in body["granted"]:
        granted["policy"]["allow_debug_enclave_insecure"] = True


def _weaken_policy_and_digest(body: dict[str, Any]) -> None:
    import hashlib

    for granted in body["granted"]:
        granted["policy"]["allow_debug_enclave_insecure"] = True
        canonical = json.dumps(granted["policy"], sort_keys=True, separators=(",", ":"))
        granted["policy_digest"] = hashlib.sha256(canonical.encode()).hexdigest()


def _swap_versions(body: dict[str, Any]) -> None:
    first, second = body["granted"]
    first["sealed_key"], second["sealed_key"] = second["sealed_key"], first["sealed_key"]


def _other_request(body: dict[str, Any]) -> None:
    body["request_id"] = "f" * 32


def _unasked_model(body: dict[str, Any]) -> None:
    for granted in body["granted"]:
        granted["model_id"] = "other"


def _duplicate(body: dict[str, Any]) -> None:
    body["granted"].append(dict(body["granted"][0]))


@pytest.mark.parametrize(
    "mutate",
    [
        _extend_lease,
        _weaken_policy,
        _weaken_policy_and_digest,
        _swap_versions,
        _other_request,
        _unasked_model,
        _duplicate,
        _set("key_version", 7),
        _set("sealed_key", "A" * 64),
        _set("policy", "not an object"),
    ],
)
def test_tampered_release_responses_are_refused(
    server: KeyServerUnderTest, mutate: Callable[[dict[str, Any]], None]
) -> None:
    server.add_model("m")
    with server.admin() as admin:
        admin.rotate_key("m")
    with _client(server, mutate) as client, pytest.raises(ProtocolError):
        client.release(["m"])


def test_renewals_are_checked_against_their_fresh_nonce(server: KeyServerUnderTest) -> None:
    server.add_model("m")
    first_renewal: dict[str, Any] = {}

    def replay_first_renewal(body: dict[str, Any]) -> None:
        if body.get("session") is not None:
            return  # the release itself
        if not first_renewal:
            first_renewal.update(json.loads(json.dumps(body)))
        else:  # an attacker serves the earlier renewal again
            body.clear()
            body.update(first_renewal)

    socket = server.url.removeprefix("unix://")
    with server.client(session=True, transport=_Rewriter(socket, replay_first_renewal)) as client:
        client.release(["m"])
        client.renew()
        with pytest.raises(ProtocolError):
            client.renew()


class _Flaky(httpx.BaseTransport):
    """Fails the first ``failures`` requests with a connection error, then forwards."""

    def __init__(self, socket: str, failures: int) -> None:
        self.inner = httpx.HTTPTransport(uds=socket)
        self.failures = failures
        self.requests: list[str] = []

    def close(self) -> None:
        self.inner.close()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if self.failures:
            self.failures -= 1
            raise httpx.ConnectError("connection refused", request=request)
        return self.inner.handle_request(request)


def test_connection_errors_are_retried_with_jittered_backoff(server: KeyServerUnderTest) -> None:
    server.add_model("m")
    flaky = _Flaky(server.url.removeprefix("unix://"), failures=2)
    sleeps: list[float] = []
    with server.client(transport=flaky, sleep=sleeps.append, backoff=0.1) as client:
        assert client.release(["m"]).keys
    assert len(sleeps) == 2
    assert 0.05 <= sleeps[0] <= 0.15
    assert 0.1 <= sleeps[1] <= 0.3
    flaky.failures = 10
    with (
        server.client(transport=flaky, sleep=sleeps.append, retries=2) as client,
        pytest.raises(KeyReleaseError, match="cannot reach"),
    ):
        client.release(["m"])


def test_denials_and_refusals_are_never_retried(server: KeyServerUnderTest, tmp_path: Path) -> None:
    server.add_model("m", policy=server.sim_policy(sim={"mrenclave": ["44" * 32]}))
    flaky = _Flaky(server.url.removeprefix("unix://"), failures=0)
    sleeps: list[float] = []
    with server.client(transport=flaky, sleep=sleeps.append) as client:
        with pytest.raises(KeyReleaseError) as caught:
            client.data_key("m", 1)
        assert caught.value.reasons == ("measurement_mismatch",)
    rogue = SimAttester(role="app", key_path=tmp_path / "rogue.key")
    with server.client(rogue, transport=flaky, sleep=sleeps.append) as client:
        with pytest.raises(KeyReleaseError) as caught:
            client.release(["m"])
        assert caught.value.status_code == 403
    assert sleeps == []
    assert flaky.requests.count("/v1/keys/release") == 2


def test_urls_and_suites_are_checked_up_front(attester: SimAttester) -> None:
    for url in ("ftp://x", "unix://relative/path", "http://keys.example.com"):
        with pytest.raises(ConfigError):
            KeyReleaseClient(url, attester=attester, trusted_release_keys=[PIN])
    with pytest.raises(ProtocolError):
        KeyReleaseClient(
            "https://127.0.0.1:1", attester=attester, suite="ROT13", trusted_release_keys=[PIN]
        )


def test_renew_without_a_session_is_an_error(server: KeyServerUnderTest) -> None:
    with server.client() as client, pytest.raises(KeyReleaseError) as caught:
        client.renew()
    assert caught.value.reasons == ("no_session",)


def test_remembered_keys_can_be_forgotten_or_never_kept(server: KeyServerUnderTest) -> None:
    dek = generate_key()
    server.add_model("m", key=dek)
    with server.client() as client:
        assert client.data_key("m", 1) == dek
        assert client.remembered, "data_key remembers the key for the lease"
        client.forget()
        assert not client.remembered
    with server.client(remember=False) as client:
        assert client.data_key("m", 1) == dek
        assert client.release(["m"]).key("m") == dek
        assert not client.remembered


def test_an_unreachable_key_source_is_its_own_error(tmp_path: Path, attester: SimAttester) -> None:
    """Nobody listens: a KeySourceUnreachableError (retry later), not a refusal, and no socket
    is leaked (warnings are errors in this suite: a leak would fail as a ResourceWarning)."""
    missing = tmp_path / "nobody.sock"
    client = KeyReleaseClient(
        f"unix://{missing}", attester=attester, retries=1, backoff=0, trusted_release_keys=[PIN]
    )
    with client, pytest.raises(KeySourceUnreachableError, match="cannot reach") as info:
        client.data_key("m", 1)
    assert isinstance(info.value, KeyReleaseError)
    assert info.value.reasons == ()
