"""A real key server and a real key cache on Unix sockets, a local enclave asking the cache.

The cache must answer exactly like the key server (same schemas, same error codes, same reason
codes for the same evidence) and never be more permissive than the server.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from keycache_helpers import (
    Attesters,
    CacheUnderTest,
    KeyServerControl,
    cache_settings,
    fresh_nonce,
    release_body,
    running_cache,
)

from _fixtures.clock import FakeClock
from sealtorch.attestation import SimAttester
from sealtorch.errors import KeyReleaseError
from sealtorch.protocol import b64encode


def test_local_enclave_gets_the_same_keys_policy_and_lease_as_from_the_key_server(
    cache: CacheUnderTest, keyserver: KeyServerControl, attesters: Attesters
) -> None:
    status = cache.cache.status()
    assert status.state == "ready"
    assert [m.model_id for m in status.models] == ["m1", "m2"]

    with cache.client(attesters.app, session=True) as client:
        via_cache = client.release(["m1", "m2"])
        renewed = client.renew(["m1"])
    with keyserver.server.client(attesters.app) as direct:
        via_server = direct.release(["m1", "m2"])

    assert not via_cache.denied
    assert via_cache.session is not None
    by_model = {k.model_id: k for k in via_server.keys}
    for released in via_cache.keys:
        expected = by_model[released.model_id]
        assert released.key == expected.key
        assert released.key_version == expected.key_version
        assert dict(released.policy) == dict(expected.policy)
        assert released.policy_digest == expected.policy_digest
        # The cache hands out the remaining lease of its own key, never a longer one.
        held = cache.cache.holdings().keys[released.model_id][0]
        assert released.lease_expires_at == held.expires_at
    assert [k.model_id for k in renewed.keys] == ["m1"]
    assert renewed.keys[0].key == by_model["m1"].key


def test_every_model_at_once_hides_what_one_may_not_have(
    cache: CacheUnderTest, attesters: Attesters
) -> None:
    with cache.client(attesters.serve) as client:  # "serve" is not in the policy
        result = client.release()  # models=None: every model it may have
    assert result.keys == ()
    assert result.denied == ()  # like the key server: no model ids leak


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda a: a.serve, "measurement_mismatch"),
        (lambda a: SimAttester(role="app", key_path=a.key_path, debug=True), "debug_enclave"),
        (
            lambda a: SimAttester(role="app", key_path=a.key_path, tcb_status="OutOfDate"),
            "tcb_out_of_date",
        ),
        (
            lambda a: SimAttester(role="app", key_path=a.key_path, advisory_ids=["INTEL-SA-00615"]),
            "advisory_not_allowed",
        ),
    ],
    ids=["measurement", "debug", "tcb", "advisory"],
)
def test_policy_denial_has_the_key_servers_reason_codes(
    cache: CacheUnderTest,
    keyserver: KeyServerControl,
    attesters: Attesters,
    make: Any,
    reason: str,
) -> None:
    attacker: SimAttester = make(attesters)
    with cache.client(attacker) as client:
        at_cache = client.release(["m1"])
    with keyserver.server.client(attacker) as direct:
        at_server = direct.release(["m1"])
    assert at_cache.keys == ()
    assert at_server.keys == ()
    assert at_cache.denied[0].reasons == at_server.denied[0].reasons
    assert reason in at_cache.denied[0].reasons
    with cache.client(attacker) as client, pytest.raises(KeyReleaseError) as caught:
        client.data_key("m1", 1)
    assert reason in caught.value.reasons


def _raw_pair(cache: CacheUnderTest, keyserver: KeyServerControl) -> list[tuple[str, httpx.Client]]:
    return [("cache", cache.http()), ("server", keyserver.server.http())]


def _post(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def test_replayed_nonce_is_refused_like_at_the_key_server(
    cache: CacheUnderTest, keyserver: KeyServerControl, attesters: Attesters
) -> None:
    for _, http in _raw_pair(cache, keyserver):
        with http:
            nonce = fresh_nonce(http)
            body, _ = release_body(attesters.app, nonce, models=["m1"])
            first = _post(http, "/v1/keys/release", body)
            assert first.status_code == 200
            assert len(first.json()["granted"]) == 1
            replay = _post(http, "/v1/keys/release", body)
            assert replay.status_code == 403
            assert replay.json()["error"]["code"] == "nonce_invalid"
            assert replay.json()["error"]["reasons"] == ["nonce_invalid"]
            # A nonce the service never issued is refused the same way.
            forged, _ = release_body(attesters.app, b"\x01" * 32, models=["m1"])
            assert _post(http, "/v1/keys/release", forged).json()["error"]["code"] == (
                "nonce_invalid"
            )


def test_request_refusals_match_the_key_server(
    cache: CacheUnderTest, keyserver: KeyServerControl, attesters: Attesters, tmp_path: Path
) -> None:
    stranger = SimAttester(role="app", key_path=tmp_path / "other-host.key")
    outcomes: dict[str, list[tuple[int, str]]] = {}
    for name, http in _raw_pair(cache, keyserver):
        with http:
            got: list[tuple[int, str]] = []
            # evidence signed by a host key nobody trusts
            body, _ = release_body(stranger, fresh_nonce(http), models=["m1"])
            got.append(_code(_post(http, "/v1/keys/release", body)))
            # genuine evidence, but the HPKE key was swapped (a relay keeping the key)
            body, _ = release_body(
                attesters.app, fresh_nonce(http), models=["m1"], public_key=b"\x09" * 32
            )
            got.append(_code(_post(http, "/v1/keys/release", body)))
            # a low-order X25519 point
            body, _ = release_body(
                attesters.app, fresh_nonce(http), models=["m1"], public_key=b"\x00" * 32
            )
            got.append(_code(_post(http, "/v1/keys/release", body)))
            # unknown field, malformed base64, wrong types
            body, _ = release_body(attesters.app, fresh_nonce(http), models=["m1"])
            got.append(_code(_post(http, "/v1/keys/release", {**body, "extra": 1})))
            got.append(_code(_post(http, "/v1/keys/release", {**body, "nonce": "a+b/"})))
            got.append(_code(_post(http, "/v1/keys/release", {**body, "models": "m1"})))
            got.append(_code(http.post("/v1/keys/release", content=b"{not json")))
            # too large
            got.append(_code(http.post("/v1/keys/release", content=b"x" * 70_000)))
            # renew without and with a bogus session token
            got.append(_code(_post(http, "/v1/keys/renew", {"nonce": b64encode(b"n" * 32)})))
            got.append(
                _code(
                    http.post(
                        "/v1/keys/renew",
                        json={"nonce": b64encode(b"n" * 32)},
                        headers={"authorization": "Bearer sts_" + "x" * 40},
                    )
                )
            )
            got.append(_code(http.get("/v1/keys/release")))
            got.append(_code(http.get("/v1/nothing-here")))
            outcomes[name] = got
    assert outcomes["cache"] == outcomes["server"], outcomes
    assert [code for _, code in outcomes["cache"]] == [
        "attestation_key_untrusted",
        "binding_mismatch",
        "invalid_public_key",
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "request_too_large",
        "unauthenticated",
        "session_invalid",
        "method_not_allowed",
        "not_found",
    ]


def _forget_sessions(keyserver: KeyServerControl) -> None:
    """The key server loses every renewal session (as after a purge or a restore)."""
    with sqlite3.connect(keyserver.tmp / "keys.db") as db:
        db.execute("DELETE FROM sessions")


def _code(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def test_local_nonce_expires(cache: CacheUnderTest, attesters: Attesters, clock: FakeClock) -> None:
    with cache.http() as http:
        nonce = fresh_nonce(http)
        body, _ = release_body(attesters.app, nonce, models=["m1"])
        clock.advance(seconds=31)  # the cache's nonces live 30 s
        response = _post(http, "/v1/keys/release", body)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "nonce_expired"


def test_keyserver_outage_leases_then_lease_expired_then_recovery(
    cache: CacheUnderTest, keyserver: KeyServerControl, attesters: Attesters, clock: FakeClock
) -> None:
    kc = cache.cache
    with keyserver.server.client(attesters.app) as direct:
        original = direct.release(["m1"]).key("m1")
    keyserver.stop()

    clock.advance(seconds=61)  # the refresh interval passed: the refresh fails
    kc.tick()
    status = kc.status()
    assert status.state == "degraded"
    assert status.keyserver.reachable is False
    assert status.keyserver.consecutive_failures == 1
    assert "cannot reach the key server" in (status.keyserver.last_error or "")
    with cache.client(attesters.app) as client:
        assert client.data_key("m1", 1) == original  # still served: the lease runs

    # Retries back off (jittered exponential, capped at 8 s) while the leases run out.
    delays = []
    for _ in range(4):
        delay = kc.tick()
        delays.append(delay)
        clock.advance(seconds=delay)
    kc.tick()
    assert all(0 < d <= 8 for d in delays)
    assert kc.status().keyserver.consecutive_failures >= 4

    clock.advance(minutes=10)  # past the 10-minute lease
    kc.tick()
    status = kc.status()
    assert status.state == "unavailable"
    assert status.models == ()
    assert {e.model_id for e in status.expired} == {"m1", "m2"}
    assert kc.holdings().key_count == 0  # dropped, not just refused
    with cache.client(attesters.app) as client:
        result = client.release(["m1"])
    assert result.keys == ()
    assert result.denied[0].reasons == ("lease_expired",)
    assert "could not be reached" in result.denied[0].message

    keyserver.start()
    clock.advance(seconds=9)  # past the longest backoff
    kc.tick()
    status = kc.status()
    assert status.state == "ready"
    assert status.keyserver.reachable is True
    assert [m.model_id for m in status.models] == ["m1", "m2"]
    with cache.client(attesters.app) as client:
        assert client.data_key("m1", 1) == original


def test_renewal_uses_the_session_and_reattests_when_it_is_gone(
    cache: CacheUnderTest, keyserver: KeyServerControl, clock: FakeClock
) -> None:
    kc = cache.cache

    def refreshes(how: str) -> float | None:
        return kc.metrics.registry.get_sample_value(
            "sealtorch_keycache_refreshes_total", {"how": how, "outcome": "ok"}
        )

    assert refreshes("release") == 1
    clock.advance(seconds=61)
    kc.tick()
    assert refreshes("renew") == 1
    # The key server forgets the session (e.g. purged); the next refresh attests afresh.
    _forget_sessions(keyserver)
    clock.advance(seconds=61)
    kc.tick()
    assert refreshes("release") == 2
    assert kc.status().state == "ready"


def test_revocation_reaches_the_cache_within_one_refresh_interval(
    cache: CacheUnderTest, keyserver: KeyServerControl, attesters: Attesters, clock: FakeClock
) -> None:
    kc = cache.cache
    with keyserver.server.admin() as admin:
        admin.rotate_key("m1")  # v2
        admin.revoke_key("m1", 1)
        admin.revoke_key("m2", 1)  # m2 has no active key left
    # Before the refresh the cache still holds what it was given.
    assert [k.key_version for k in kc.holdings().keys["m1"]] == [1]
    clock.advance(seconds=60)  # one refresh interval
    kc.tick()
    held = kc.holdings()
    assert [k.key_version for k in held.keys["m1"]] == [2]
    assert "m2" not in held.keys
    with cache.client(attesters.app) as client:
        result = client.release(["m1", "m2"])
        assert [(k.model_id, k.key_version) for k in result.keys] == [("m1", 2)]
        assert result.denied[0].model_id == "m2"
        assert result.denied[0].reasons == ("not_cached",)
        with pytest.raises(KeyReleaseError):
            client.data_key("m1", 1)


def test_tightened_policy_arrives_with_the_key(
    cache: CacheUnderTest, keyserver: KeyServerControl, attesters: Attesters, clock: FakeClock
) -> None:
    """The cache enforces the policy that came with the *current* key: when the owner drops the
    app's measurement, the cache refuses the app after the next refresh, with the server's
    reason code."""
    with keyserver.server.admin() as admin:
        admin.set_policy("m1", attesters.policy("cache", "serve"))
    clock.advance(seconds=60)
    cache.cache.tick()
    with cache.client(attesters.app) as client:
        denied = client.release(["m1"])
    with cache.client(attesters.serve) as client:
        allowed = client.release(["m1"])
    assert denied.denied[0].reasons == ("measurement_mismatch",)
    assert [k.model_id for k in allowed.keys] == ["m1"]


@pytest.mark.parametrize("how", ["untrusted-host-key", "policy-excludes-cache"])
def test_cache_refused_by_the_key_server_starts_reports_and_serves_nothing(
    tmp_path: Path,
    keyserver: KeyServerControl,
    attesters: Attesters,
    clock: FakeClock,
    how: str,
) -> None:
    cache_attester = attesters.cache
    models: tuple[str, ...] | None = None
    if how == "untrusted-host-key":
        keyserver.server.add_model("m1", policy=attesters.policy())
        cache_attester = SimAttester(role="keycache", key_path=tmp_path / "rogue.key")
        expected = ("attestation_key_untrusted",)
    else:
        keyserver.server.add_model("m1", policy=attesters.policy("app"))
        models = ("m1",)
        expected = ("measurement_mismatch",)
    settings = cache_settings(tmp_path, attesters, keyserver, models=models)
    with running_cache(settings, clock=clock, attester=cache_attester) as running:
        status = running.cache.status()
        assert status.state == "denied"
        assert status.models == ()
        if how == "untrusted-host-key":
            assert status.attestation.state == "denied"
            assert status.attestation.reasons == expected
        else:
            assert status.denied[0].reasons == expected
        with running.http() as http:
            ready = http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["error"]["reasons"] == ["denied"]
        with running.client(attesters.app) as client:
            result = client.release(["m1"])
            assert result.keys == ()
            assert result.denied[0].reasons == ("not_cached",)
            assert expected[0] in result.denied[0].message
            assert client.release().keys == ()


def test_cache_drops_every_key_when_the_key_server_stops_trusting_it(
    cache: CacheUnderTest, keyserver: KeyServerControl, attesters: Attesters, clock: FakeClock
) -> None:
    """A refusal of the cache's own evidence at refresh time (e.g. its host key is no longer
    trusted) must not leave old keys being served."""
    kc = cache.cache
    keyserver.stop()
    keyserver.settings = {"lease_duration": timedelta(minutes=10)}
    keyserver.attester = SimAttester(role="app", key_path=keyserver.tmp / "new-host.key")
    keyserver.start()
    _forget_sessions(keyserver)
    clock.advance(seconds=60)
    kc.tick()
    status = kc.status()
    assert status.state == "denied"
    assert status.attestation.reasons == ("attestation_key_untrusted",)
    assert kc.holdings().key_count == 0
    with cache.client(attesters.app) as client:
        assert client.release(["m1"]).denied[0].reasons == ("not_cached",)


def test_keyserver_over_https_with_its_ca(
    tmp_path: Path,
    store: Any,
    master: Any,
    attesters: Attesters,
    clock: FakeClock,
) -> None:
    from _fixtures.keyserver import make_tls, running_keyserver

    tls = make_tls(tmp_path / "tls")
    with running_keyserver(
        tmp_path, store=store, master=master, attester=attesters.app, clock=clock, tls=tls
    ) as server:
        server.add_model("m1", policy=attesters.policy())
        good = cache_settings(tmp_path, attesters, server, keyserver_ca=tls.ca)
        with running_cache(good, clock=clock, attester=attesters.cache) as running:
            assert running.cache.status().state == "ready"
        other = make_tls(tmp_path / "other-ca")
        bad = cache_settings(tmp_path, attesters, server, keyserver_ca=other.ca)
        with running_cache(bad, clock=clock, attester=attesters.cache) as running:
            status = running.cache.status()
            assert status.state == "unavailable"
            assert status.keyserver.reachable is False


def test_tampered_keyserver_response_is_not_used(
    tmp_path: Path, keyserver: KeyServerControl, attesters: Attesters, clock: FakeClock
) -> None:
    """A man in the middle swaps in a permissive policy for the cache to enforce: the policy
    digest is bound into the HPKE info, so the response is rejected and nothing changes."""
    from sealtorch.keycache import KeyCacheApp, build_cache

    keyserver.server.add_model("m1", policy=attesters.policy())

    class Weaken(httpx.BaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.HTTPTransport(uds=str(keyserver.socket))
            self.active = False

        def close(self) -> None:
            self.inner.close()

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = self.inner.handle_request(request)
            response.read()
            response.close()
            if not (self.active and request.url.path.startswith("/v1/keys/")):
                return response
            data = json.loads(response.content)
            for granted in data["granted"]:
                granted["policy"]["allow_any_measurement_insecure"] = True
                granted["policy"]["sim"]["mrenclave"] = []
            return httpx.Response(response.status_code, json=data, request=request)

    transport = Weaken()
    settings = cache_settings(tmp_path, attesters, keyserver)
    kc, service = build_cache(settings, clock=clock, transport=transport, attester=attesters.cache)
    try:
        kc.start()
        before = kc.holdings()
        transport.active = True
        clock.advance(seconds=60)
        kc.tick()
        assert kc.holdings() is before  # nothing from the tampered response was applied
        status = kc.status()
        assert status.state == "degraded"
        assert "rejected a key server response" in (status.keyserver.last_error or "")
        assert status.models[0].policy_digest == before.keys["m1"][0].policy_digest
        del service, KeyCacheApp
    finally:
        kc.close()


def test_status_metrics_and_logs_never_show_key_material(
    cache: CacheUnderTest,
    keyserver: KeyServerControl,
    attesters: Attesters,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import base64
    import logging

    caplog.set_level(logging.DEBUG)
    with cache.client(attesters.app, session=True) as client:
        released = client.release(["m1", "m2"])
        token = released.session.token if released.session else ""
        client.renew()
    secrets_found = [k.key.material for k in released.keys]
    with cache.http() as http:
        documents = {
            "status": http.get("/v1/keycache/status").content,
            "metrics": http.get("/metrics").content,
        }
    documents["logs"] = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records).encode()
    documents["repr"] = repr(cache.cache.holdings().keys).encode()
    for where, data in documents.items():
        assert token.encode() not in data, where
        for secret in secrets_found:
            for form in (
                secret,
                secret.hex().encode(),
                base64.b64encode(secret).rstrip(b"="),
                base64.urlsafe_b64encode(secret).rstrip(b"="),
            ):
                assert form not in data, f"key material in {where}"
    status = json.loads(documents["status"])
    assert {m["model_id"] for m in status["models"]} == {"m1", "m2"}
    assert b"sealtorch_keycache_keys_released_total 4.0" in documents["metrics"]
    assert (
        b'sealtorch_keycache_release_decisions_total{action="release",decision="allow"} 1.0'
        in (documents["metrics"])
    )
