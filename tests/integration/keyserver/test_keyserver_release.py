"""The key release protocol against a real server (TLS, SQLite and PostgreSQL), attacker's view.

Every refusal here is made by the server; the requests are built by hand where the library
client would refuse to send them.
"""

from __future__ import annotations

import json
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
import pytest

from _fixtures.clock import FakeClock
from _fixtures.keyserver import KeyServerUnderTest, parse_time
from _fixtures.keystore import refuse_audit_inserts
from sealtorch._crypto import hpke
from sealtorch.attestation import SimAttester, report_data_for
from sealtorch.errors import IntegrityError, KeyReleaseError
from sealtorch.keys import generate_key
from sealtorch.keyserver.nonces import NonceMinter
from sealtorch.protocol import HPKE_SUITE_MLKEM768_X25519, b64decode, b64encode, key_release_info
from sealtorch.protocol.audit import AuditEntry, AuditKind

SUITE = hpke.DEFAULT_SUITE


def _challenge(http: httpx.Client) -> bytes:
    response = http.post("/v1/attestation/challenge", json={})
    assert response.status_code == 200
    return b64decode(response.json()["nonce"])


def _request(
    attester: SimAttester,
    nonce: bytes,
    public_key: bytes,
    *,
    models: list[str] | None,
    bind_nonce: bytes | None = None,
    bind_key: bytes | None = None,
    session: bool = False,
) -> dict[str, Any]:
    evidence = attester.evidence(
        report_data_for(
            nonce=bind_nonce or nonce, hpke_suite=SUITE, public_key=bind_key or public_key
        )
    )
    return {
        "nonce": b64encode(nonce),
        "evidence": evidence.to_wire(),
        "hpke": {"suite": SUITE, "public_key": b64encode(public_key)},
        "models": models,
        "session": session,
    }


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    code: str = body["error"]["code"]
    return code


def _audit(keyserver: KeyServerUnderTest) -> list[Any]:
    return list(keyserver.store.iter_audit())


def test_release_returns_the_key_sealed_to_the_enclave(keyserver: KeyServerUnderTest) -> None:
    dek = generate_key()
    keyserver.add_model("resnet50", key=dek)
    with keyserver.client() as client:
        result = client.release(["resnet50"])
        assert [(k.model_id, k.key_version) for k in result.keys] == [("resnet50", 1)]
        assert result.keys[0].key == dek
        assert result.denied == ()
        assert client.data_key("resnet50", 1) == dek
    record = _audit(keyserver)[-1]
    assert (record.action, record.decision) == ("release", "allow")
    assert record.evidence_digest
    assert record.claims["mrenclave"] == keyserver.attester.mrenclave
    assert record.details["granted"][0]["key_versions"] == [1]


def test_sealed_key_opens_only_with_its_exact_binding(keyserver: KeyServerUnderTest) -> None:
    keyserver.add_model("m")
    with keyserver.http() as http:
        nonce = _challenge(http)
        private = hpke.generate_private_key(SUITE)
        public = private.public_key().encode()
        body = http.post(
            "/v1/keys/release", json=_request(keyserver.attester, nonce, public, models=["m"])
        ).json()
    granted = body["granted"][0]
    info = {
        "model_id": "m",
        "key_version": 1,
        "request_id": body["request_id"],
        "request_nonce": nonce,
        "policy_digest": granted["policy_digest"],
        "lease_expires_at": parse_time(granted["lease_expires_at"]),
    }
    sealed = b64decode(granted["sealed_key"])
    assert len(hpke.open(SUITE, private, sealed, info=key_release_info(**info))) == 32
    for field, other in [
        ("model_id", "other"),
        ("key_version", 2),
        ("request_id", "0" * 32),
        ("request_nonce", secrets.token_bytes(32)),
        ("policy_digest", "0" * 64),
        ("lease_expires_at", parse_time("2099-01-01T00:00:00Z")),
    ]:
        with pytest.raises(IntegrityError):
            hpke.open(SUITE, private, sealed, info=key_release_info(**{**info, field: other}))
    with pytest.raises(IntegrityError):  # another enclave's key pair
        hpke.open(SUITE, hpke.generate_private_key(SUITE), sealed, info=key_release_info(**info))


def test_a_nonce_is_single_use(keyserver: KeyServerUnderTest) -> None:
    keyserver.add_model("m")
    with keyserver.http() as http:
        nonce = _challenge(http)
        public = hpke.generate_private_key(SUITE).public_key().encode()
        request = _request(keyserver.attester, nonce, public, models=["m"])
        assert http.post("/v1/keys/release", json=request).status_code == 200
        replay = http.post("/v1/keys/release", json=request)
    assert _error(replay, 403) == "nonce_invalid"
    assert "sealed_key" not in replay.text
    record = _audit(keyserver)[-1]
    assert (record.decision, record.reasons) == ("refuse", ("nonce_invalid",))


def test_a_nonce_replayed_concurrently_releases_once(keyserver: KeyServerUnderTest) -> None:
    """The same request sent 8 times at once (concurrent releases share commits): one key."""
    keyserver.add_model("m")
    with keyserver.http() as http:
        nonce = _challenge(http)
    public = hpke.generate_private_key(SUITE).public_key().encode()
    body = json.dumps(_request(keyserver.attester, nonce, public, models=["m"])).encode()
    barrier = threading.Barrier(8)

    def send() -> httpx.Response:
        with keyserver.http() as http:
            barrier.wait(30)
            return http.post(
                "/v1/keys/release", content=body, headers={"content-type": "application/json"}
            )

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: send(), range(8)))
    assert sorted(r.status_code for r in responses) == [200] + [403] * 7
    assert {_error(r, 403) for r in responses if r.status_code != 200} == {"nonce_invalid"}
    decisions = sorted(r.decision for r in _audit(keyserver) if r.action == "release")
    assert decisions == ["allow"] + ["refuse"] * 7


def test_release_bodies_must_be_json(keyserver: KeyServerUnderTest) -> None:
    keyserver.add_model("m")
    with keyserver.http() as http:
        nonce = _challenge(http)
        public = hpke.generate_private_key(SUITE).public_key().encode()
        body = json.dumps(_request(keyserver.attester, nonce, public, models=["m"]))
        for content, media_type in ((body, "text/plain"), ("", "application/json")):
            response = http.post(
                "/v1/keys/release", content=content, headers={"content-type": media_type}
            )
            assert _error(response, 400) == "invalid_request"
        ok = http.post(
            "/v1/keys/release", content=body, headers={"content-type": "application/json"}
        )
    assert ok.status_code == 200  # the refused attempts did not use up the nonce


def test_a_never_issued_nonce_is_refused(keyserver: KeyServerUnderTest) -> None:
    keyserver.add_model("m")
    public = hpke.generate_private_key(SUITE).public_key().encode()
    request = _request(keyserver.attester, secrets.token_bytes(32), public, models=["m"])
    with keyserver.http() as http:
        assert _error(http.post("/v1/keys/release", json=request), 403) == "nonce_invalid"


def test_forged_and_edited_nonces_are_refused_and_audited(
    keyserver: KeyServerUnderTest, clock: FakeClock
) -> None:
    """Nonces carry their own MAC (sealtorch.keyserver.nonces): one from another key server
    (its own nonce key), a real one with a byte flipped, its expiry pushed later, or cut short
    — each refused as ``nonce_invalid``, audited, and the real nonce still works after."""
    keyserver.add_model("m")
    public = hpke.generate_private_key(SUITE).public_key().encode()
    with keyserver.http() as http:
        real = _challenge(http)
        foreign, _ = NonceMinter(secrets.token_bytes(32)).issue(
            now=clock.now, ttl=timedelta(seconds=60)
        )
        later = (int.from_bytes(real[:8], "big") + 3_600_000_000).to_bytes(8, "big") + real[8:]
        flipped = real[:20] + bytes([real[20] ^ 1]) + real[21:]
        for forged in (foreign, flipped, later, real[:16]):
            request = _request(keyserver.attester, forged, public, models=["m"])
            assert _error(http.post("/v1/keys/release", json=request), 403) == "nonce_invalid"
        request = _request(keyserver.attester, real, public, models=["m"])
        assert http.post("/v1/keys/release", json=request).status_code == 200
    decisions = [r.decision for r in _audit(keyserver) if r.action == "release"]
    assert decisions == ["refuse"] * 4 + ["allow"]


def test_an_expired_nonce_is_refused(keyserver: KeyServerUnderTest, clock: FakeClock) -> None:
    keyserver.add_model("m")
    with keyserver.http() as http:
        nonce = _challenge(http)
        clock.advance(seconds=61)
        public = hpke.generate_private_key(SUITE).public_key().encode()
        for _ in range(2):  # its expiry is part of it: expired on every try
            response = http.post(
                "/v1/keys/release", json=_request(keyserver.attester, nonce, public, models=["m"])
            )
            assert _error(response, 403) == "nonce_expired"


def test_evidence_bound_to_another_public_key_is_refused(keyserver: KeyServerUnderTest) -> None:
    keyserver.add_model("m")
    honest = hpke.generate_private_key(SUITE).public_key().encode()
    attacker = hpke.generate_private_key(SUITE).public_key().encode()
    with keyserver.http() as http:
        nonce = _challenge(http)
        # evidence for the enclave's key, but the attacker's key in the request
        request = _request(keyserver.attester, nonce, attacker, models=["m"], bind_key=honest)
        response = http.post("/v1/keys/release", json=request)
    assert _error(response, 403) == "binding_mismatch"
    assert "sealed_key" not in response.text
    assert _audit(keyserver)[-1].reasons == ("binding_mismatch",)


def test_evidence_bound_to_another_nonce_is_refused(keyserver: KeyServerUnderTest) -> None:
    keyserver.add_model("m")
    public = hpke.generate_private_key(SUITE).public_key().encode()
    with keyserver.http() as http:
        old_nonce = _challenge(http)
        new_nonce = _challenge(http)
        # replay evidence made for an earlier challenge with a fresh nonce
        request = _request(
            keyserver.attester, new_nonce, public, models=["m"], bind_nonce=old_nonce
        )
        assert _error(http.post("/v1/keys/release", json=request), 403) == "binding_mismatch"


def test_untrusted_sim_attestation_key_is_refused(
    keyserver: KeyServerUnderTest, tmp_path: Any
) -> None:
    keyserver.add_model("m")
    rogue = SimAttester(role="app", key_path=tmp_path / "rogue.key")
    with keyserver.client(attester=rogue) as client, pytest.raises(KeyReleaseError) as caught:
        client.release(["m"])
    assert caught.value.reasons == ("attestation_key_untrusted",)
    assert caught.value.status_code == 403


@pytest.mark.parametrize(
    ("policy_change", "attester_options", "reasons"),
    [
        ({"sim": {"mrenclave": ["00" * 32]}}, {}, ("measurement_mismatch",)),
        ({}, {"debug": True}, ("debug_enclave",)),
        ({}, {"tcb_status": "OutOfDate"}, ("tcb_out_of_date",)),
        ({"allowed_tees": ["sgx"], "sim": None, "sgx": {"mrenclave": ["11" * 32]}}, {}, None),
    ],
)
def test_policy_denial_has_reason_codes_and_is_audited(
    keyserver: KeyServerUnderTest,
    tmp_path: Any,
    policy_change: dict[str, Any],
    attester_options: dict[str, Any],
    reasons: tuple[str, ...] | None,
) -> None:
    attester = SimAttester(role="app", key_path=keyserver.attester.key_path, **attester_options)
    # measured now: other work may have changed the package since the session's attester
    policy = {**keyserver.sim_policy(), "sim": {"mrenclave": [attester.mrenclave]}}
    policy = {k: v for k, v in {**policy, **policy_change}.items() if v is not None}
    keyserver.add_model("guarded", policy=policy)
    with keyserver.client(attester=attester) as client:
        result = client.release(["guarded"])
        assert result.keys == ()
        denial = result.denied[0]
        expected = reasons or ("simulated_not_allowed",)
        assert denial.reasons == expected
        assert denial.message
        with pytest.raises(KeyReleaseError) as caught:
            client.data_key("guarded", 1)
        assert caught.value.reasons == expected
    record = [r for r in _audit(keyserver) if r.action == "release"][-1]
    assert record.decision == "deny"
    assert record.reasons == expected
    assert record.details["denied"] == [{"model_id": "guarded", "reasons": list(expected)}]
    assert record.claims is not None
    assert record.evidence_digest


def test_unknown_model_is_a_clear_denial(keyserver: KeyServerUnderTest) -> None:
    keyserver.add_model("known")
    with keyserver.client() as client:
        result = client.release(["known", "no-such-model"])
        assert [k.model_id for k in result.keys] == ["known"]
        assert result.denied[0].model_id == "no-such-model"
        assert result.denied[0].reasons == ("unknown_model",)
        with pytest.raises(KeyReleaseError, match="no-such-model") as caught:
            client.data_key("no-such-model", 1)
        assert caught.value.reasons == ("unknown_model",)
    releases = [r.decision for r in _audit(keyserver) if r.action == "release"]
    assert releases == ["partial", "deny"]


def test_revoked_key_versions_are_never_released(keyserver: KeyServerUnderTest) -> None:
    keyserver.add_model("m")
    with keyserver.admin() as admin:
        admin.rotate_key("m")
        admin.revoke_key("m", 1)
    with keyserver.client() as client:
        result = client.release(["m"])
        assert [k.key_version for k in result.keys] == [2]
        with pytest.raises(KeyReleaseError) as caught:
            client.data_key("m", 1)
        assert caught.value.reasons == ("key_version_unavailable",)
    with keyserver.admin() as admin:
        admin.revoke_key("m", 2)
    with keyserver.client() as client:
        result = client.release(["m"])
        assert result.keys == ()
        assert result.denied[0].reasons == ("no_active_key",)


def test_a_revocation_racing_a_release_wins(keyserver: KeyServerUnderTest) -> None:
    """A revocation that commits after the release request was verified, just before the
    release's own commit, wins: the keys are read inside the commit that writes the audit
    record (share-locked on PostgreSQL, under the write lock on SQLite)."""
    keyserver.add_model("m")
    store = keyserver.store
    original = store.submit

    def revoke_first(work: Any, *, nonce: Any = None) -> Any:
        # The release's decision (a challenge does no database work).
        with store.transaction() as tx:
            tx.revoke_key_version("m", 1)
            tx.append_audit(AuditEntry(kind=AuditKind.ADMIN, action="key.revoke", decision="ok"))
        return original(work, nonce=nonce)

    store.submit = revoke_first  # type: ignore[method-assign]
    try:
        with keyserver.client() as client:
            result = client.release(["m"])
    finally:
        del store.submit
    assert result.keys == ()
    assert result.denied[0].reasons == ("no_active_key",)
    assert _audit(keyserver)[-1].action == "release"  # decided after the revocation


def test_asking_for_every_model_reveals_no_other_model(keyserver: KeyServerUnderTest) -> None:
    keyserver.add_model("mine")
    keyserver.add_model(
        "secret-project", policy=keyserver.sim_policy(sim={"mrenclave": ["22" * 32]})
    )
    with keyserver.client() as client:
        result = client.release(None)
    assert [k.model_id for k in result.keys] == ["mine"]
    assert result.denied == ()
    record = _audit(keyserver)[-1]
    assert record.decision == "partial"  # the audit log still records everything
    assert record.details["denied"][0]["model_id"] == "secret-project"


def test_post_quantum_hybrid_suite(keyserver: KeyServerUnderTest) -> None:
    dek = generate_key()
    keyserver.add_model("m", key=dek)
    with keyserver.client(suite=HPKE_SUITE_MLKEM768_X25519) as client:
        assert client.data_key("m", 1) == dek


def test_sessions_renew_with_current_policy_and_revocations(
    keyserver: KeyServerUnderTest, clock: FakeClock
) -> None:
    keyserver.add_model("m")
    with keyserver.client(session=True) as client:
        first = client.release(["m"])
        assert first.session is not None
        renewed = client.renew()
        assert [k.key for k in renewed.keys] == [k.key for k in first.keys]
        with keyserver.admin() as admin:
            admin.rotate_key("m")
            admin.revoke_key("m", 1)
        assert [k.key_version for k in client.renew().keys] == [2]
        with keyserver.admin() as admin:  # a tightened policy applies at renewal
            admin.set_policy("m", keyserver.sim_policy(sim={"mrenclave": ["33" * 32]}))
        result = client.renew(["m"])
        assert result.keys == ()
        assert result.denied[0].reasons == ("measurement_mismatch",)
        clock.advance(hours=5)  # past the session lifetime
        with pytest.raises(KeyReleaseError) as caught:
            client.renew()
        assert caught.value.status_code == 403
    renewals = [r for r in _audit(keyserver) if r.action == "renew"]
    assert [r.decision for r in renewals] == ["allow", "allow", "deny", "refuse"]


def test_a_stolen_session_token_only_yields_ciphertext(keyserver: KeyServerUnderTest) -> None:
    keyserver.add_model("m")
    with keyserver.client(session=True) as client:
        client.release(["m"])
        assert client.session is not None
        token = client.session.token
    nonce = secrets.token_bytes(32)
    with keyserver.http() as http:
        response = http.post(
            "/v1/keys/renew",
            json={"nonce": b64encode(nonce)},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 200
        granted = response.json()["granted"][0]
        info = key_release_info(
            model_id="m",
            key_version=1,
            request_id=response.json()["request_id"],
            request_nonce=nonce,
            policy_digest=granted["policy_digest"],
            lease_expires_at=parse_time(granted["lease_expires_at"]),
        )
        with pytest.raises(IntegrityError):  # the thief's own key pair cannot open it
            hpke.open(
                SUITE,
                hpke.generate_private_key(SUITE),
                b64decode(granted["sealed_key"]),
                info=info,
            )
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        response = http.post(
            "/v1/keys/renew",
            json={"nonce": b64encode(nonce)},
            headers={"Authorization": f"Bearer {forged}"},
        )
        assert _error(response, 403) == "session_invalid"
        response = http.post("/v1/keys/renew", json={"nonce": b64encode(nonce)})
        assert _error(response, 401) == "unauthenticated"


def test_nothing_is_released_when_the_audit_record_cannot_be_written(
    keyserver: KeyServerUnderTest,
) -> None:
    """Fail closed: a database that refuses the audit insert means no key leaves."""
    keyserver.add_model("m")
    refuse_audit_inserts(keyserver.store)
    with keyserver.http() as http:
        nonce = _challenge(http)
        public = hpke.generate_private_key(SUITE).public_key().encode()
        response = http.post(
            "/v1/keys/release", json=_request(keyserver.attester, nonce, public, models=["m"])
        )
    assert _error(response, 503) == "audit_unavailable"
    assert "sealed_key" not in response.text
    assert json.loads(response.text)["error"]["message"].startswith("the audit record")


def test_a_busy_store_answers_503_and_the_request_leaves_no_trace(
    store: Any, master: Any, sim_attester: SimAttester, tls_files: Any, tmp_path: Any
) -> None:
    """A release whose commit cannot start within the busy timeout is withdrawn (it never
    runs: its nonce stays unspent, nothing is audited) and answered 503; a challenge needs no
    database; once the store is free the same request succeeds."""
    from _fixtures.keyserver import running_keyserver

    with running_keyserver(
        tmp_path, store=store, master=master, attester=sim_attester, tls=tls_files,
        busy_timeout=0.3,
    ) as server:  # fmt: skip
        entered, leave = threading.Event(), threading.Event()

        def block(tx: Any) -> None:
            del tx
            entered.set()
            leave.wait(30)

        public = hpke.generate_private_key(SUITE).public_key().encode()
        blocker = store.submit(block)
        assert entered.wait(30)
        try:
            with server.http() as http:
                nonce = _challenge(http)  # no database work: served while the store is busy
                request = _request(sim_attester, nonce, public, models=None)
                busy = http.post("/v1/keys/release", json=request)
        finally:
            leave.set()
            blocker.result(30)
        assert _error(busy, 503) == "store_unavailable"
        assert [r.action for r in store.iter_audit()] == ["token.create"]
        with server.http() as http:
            assert http.post("/v1/keys/release", json=request).status_code == 200
    assert [r.action for r in store.iter_audit()] == ["token.create", "release"]
