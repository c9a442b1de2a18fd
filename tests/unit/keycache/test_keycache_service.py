"""LocalReleaseService from the attacker's side: nonces, evidence, binding, the policy that came
with each key, leases, sessions — and the sealed keys' HPKE binding."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from keycache_units import Host, held_key

from _fixtures.clock import FakeClock
from sealtorch._crypto import hpke
from sealtorch.attestation import SimAttester, make_verifiers, report_data_for
from sealtorch.errors import IntegrityError
from sealtorch.keycache.holdings import Holdings, Refusal, ServerDenial
from sealtorch.keycache.service import ErrorKind, LocalError, LocalReleaseService
from sealtorch.protocol import (
    DEFAULT_HPKE_SUITE,
    HPKE_SUITE_MLKEM768_X25519,
    ReleaseRequest,
    RenewRequest,
    key_release_info,
)


class Box:
    """A mutable holder the service reads its snapshot from (the cache replaces it)."""

    def __init__(self, holdings: Holdings) -> None:
        self.holdings = holdings

    def __call__(self) -> Holdings:
        return self.holdings


@pytest.fixture
def keys(host: Host, clock: FakeClock) -> dict[str, Any]:
    now = clock()
    return {
        "m1": held_key("m1", host.policy(), now=now),
        "m1v2": held_key("m1", host.policy(), now=now, version=2),
        "m2": held_key("m2", host.policy(), now=now, lease=timedelta(minutes=2)),
    }


@pytest.fixture
def box(keys: dict[str, Any]) -> Box:
    return Box(Holdings.build(keys.values()))


@pytest.fixture
def service(host: Host, clock: FakeClock, box: Box) -> LocalReleaseService:
    return LocalReleaseService(
        holdings=box,
        verifiers=make_verifiers(sim_trusted_keys=[host.app.public_key]),
        clock=clock,
        nonce_ttl=timedelta(seconds=30),
        session_duration=timedelta(minutes=5),
    )


def request(
    service: LocalReleaseService,
    attester: SimAttester,
    models: list[str] | None,
    *,
    suite: str = DEFAULT_HPKE_SUITE,
    nonce: bytes | None = None,
    session: bool = False,
    bind_key: bytes | None = None,
) -> tuple[ReleaseRequest, hpke.HpkePrivateKey, bytes]:
    nonce = nonce if nonce is not None else service.challenge().nonce
    private = hpke.generate_private_key(suite)
    public = private.public_key().encode()
    evidence = attester.evidence(
        report_data_for(nonce=nonce, hpke_suite=suite, public_key=bind_key or public)
    )
    body = ReleaseRequest.model_validate(
        {
            "nonce": nonce,
            "evidence": {"type": evidence.type, "data": evidence.data},
            "hpke": {"suite": suite, "public_key": public},
            "models": models,
            "session": session,
        }
    )
    return body, private, nonce


def open_all(response: Any, private: hpke.HpkePrivateKey, nonce: bytes) -> dict[tuple, bytes]:
    out = {}
    for granted in response.granted:
        info = key_release_info(
            model_id=granted.model_id,
            key_version=granted.key_version,
            request_id=response.request_id,
            request_nonce=nonce,
            policy_digest=granted.policy_digest,
            lease_expires_at=granted.lease_expires_at,
        )
        out[(granted.model_id, granted.key_version)] = hpke.open(
            private.suite, private, granted.sealed_key, info=info
        )
    return out


@pytest.mark.parametrize("suite", [DEFAULT_HPKE_SUITE, HPKE_SUITE_MLKEM768_X25519])
def test_release_seals_every_held_version_with_its_binding(
    service: LocalReleaseService, host: Host, keys: dict[str, Any], clock: FakeClock, suite: str
) -> None:
    body, private, nonce = request(service, host.app, ["m1", "m2"], suite=suite)
    response = service.release(body)
    opened = open_all(response, private, nonce)
    assert opened == {
        ("m1", 2): keys["m1v2"].key.material,
        ("m1", 1): keys["m1"].key.material,
        ("m2", 1): keys["m2"].key.material,
    }
    assert response.server_time == clock()
    by_pair = {(g.model_id, g.key_version): g for g in response.granted}
    # the remaining lease of the cache's own key, and the policy exactly as received
    assert by_pair[("m2", 1)].lease_expires_at == keys["m2"].expires_at
    assert by_pair[("m1", 1)].policy == keys["m1"].policy.to_dict()
    assert by_pair[("m1", 1)].policy_digest == keys["m1"].policy.digest
    # any change to what is bound (lease, version, policy, request id) fails to open
    granted = by_pair[("m2", 1)]
    for change in (
        {"lease_expires_at": granted.lease_expires_at + timedelta(hours=1)},
        {"key_version": 2},
        {"policy_digest": "0" * 64},
        {"request_id": "f" * 32},
    ):
        fields = {
            "model_id": "m2",
            "key_version": 1,
            "request_id": response.request_id,
            "request_nonce": nonce,
            "policy_digest": granted.policy_digest,
            "lease_expires_at": granted.lease_expires_at,
            **change,
        }
        with pytest.raises(IntegrityError):
            hpke.open(suite, private, granted.sealed_key, info=key_release_info(**fields))


def test_nonces_are_single_use_and_expire(
    service: LocalReleaseService, host: Host, clock: FakeClock
) -> None:
    body, _, _ = request(service, host.app, ["m1"])
    service.release(body)
    with pytest.raises(LocalError) as replay:
        service.release(body)
    assert (replay.value.kind, replay.value.code) == (ErrorKind.FORBIDDEN, "nonce_invalid")
    never_issued, _, _ = request(service, host.app, ["m1"], nonce=secrets.token_bytes(32))
    with pytest.raises(LocalError, match="unknown or was already used"):
        service.release(never_issued)
    late, _, _ = request(service, host.app, ["m1"])
    clock.advance(seconds=30)
    with pytest.raises(LocalError) as expired:
        service.release(late)
    assert expired.value.code == "nonce_expired"
    assert expired.value.reasons == ("nonce_expired",)
    # an expired nonce is consumed too: no second try
    with pytest.raises(LocalError) as again:
        service.release(late)
    assert again.value.code == "nonce_invalid"


def test_nonce_table_is_bounded(host: Host, clock: FakeClock, box: Box) -> None:
    small = LocalReleaseService(
        holdings=box,
        verifiers=make_verifiers(sim_trusted_keys=[host.app.public_key]),
        clock=clock,
        max_nonces=3,
    )
    first = small.challenge().nonce
    for _ in range(3):
        small.challenge()
    body, _, _ = request(small, host.app, ["m1"], nonce=first)
    with pytest.raises(LocalError, match="unknown"):
        small.release(body)  # evicted: the oldest nonce goes first
    body, _, _ = request(small, host.app, ["m1"])
    assert small.release(body).granted


def test_evidence_and_binding_refusals(
    service: LocalReleaseService, host: Host, tmp_path: Any
) -> None:
    stranger = SimAttester(role="app", key_path=tmp_path / "stranger.key")
    body, _, _ = request(service, stranger, ["m1"])
    with pytest.raises(LocalError) as untrusted:
        service.release(body)
    assert untrusted.value.code == "attestation_key_untrusted"

    relayed, _, _ = request(service, host.app, ["m1"], bind_key=secrets.token_bytes(32))
    with pytest.raises(LocalError) as binding:
        service.release(relayed)
    assert binding.value.code == "binding_mismatch"

    body, _, _ = request(service, host.app, ["m1"])
    forged = body.model_copy(
        update={
            "evidence": body.evidence.model_copy(
                update={"data": body.evidence.data[:-1] + bytes([body.evidence.data[-1] ^ 1])}
            )
        }
    )
    with pytest.raises(LocalError) as signature:
        service.release(forged)
    assert signature.value.code == "evidence_invalid"

    body, _, _ = request(service, host.app, ["m1"])
    low_order = body.model_copy(
        update={"hpke": body.hpke.model_copy(update={"public_key": b"\x00" * 32})}
    )
    with pytest.raises(LocalError) as key:
        service.release(low_order)
    assert (key.value.kind, key.value.code) == (ErrorKind.INVALID, "invalid_public_key")


def test_tdx_or_sgx_evidence_without_a_dcap_verifier_is_refused(
    service: LocalReleaseService, host: Host
) -> None:
    body, _, _ = request(service, host.app, ["m1"])
    sgx = body.model_copy(
        update={"evidence": body.evidence.model_copy(update={"type": "sgx-dcap"})}
    )
    with pytest.raises(LocalError) as refused:
        service.release(sgx)
    assert refused.value.code == "tee_not_allowed"


@pytest.mark.parametrize(
    ("options", "reasons"),
    [
        ({"role": "serve"}, ("measurement_mismatch",)),
        ({"debug": True}, ("debug_enclave",)),
        ({"tcb_status": "Revoked"}, ("tcb_revoked",)),
        ({"tcb_status": "SWHardeningNeeded"}, ("tcb_status_not_allowed",)),
        (
            {"debug": True, "advisory_ids": ["INTEL-SA-00615"]},
            ("debug_enclave", "advisory_not_allowed"),
        ),
    ],
)
def test_policy_that_came_with_the_key_is_enforced(
    service: LocalReleaseService, host: Host, options: dict[str, Any], reasons: tuple[str, ...]
) -> None:
    attacker = SimAttester(key_path=host.key_path, **{"role": "app", **options})
    body, _, _ = request(service, attacker, ["m1", "m2"])
    response = service.release(body)
    assert response.granted == ()
    assert [d.reasons for d in response.denied] == [reasons, reasons]
    expected = host.policy().evaluate(
        make_verifiers(sim_trusted_keys=[host.app.public_key]).verify(
            attacker.evidence(b"\x00" * 64), now=datetime.now(UTC)
        ),
        now=datetime.now(UTC),
    )
    assert response.denied[0].reasons == expected.reasons


def test_each_model_is_judged_by_its_own_policy(
    host: Host, clock: FakeClock, service: LocalReleaseService, box: Box
) -> None:
    only_serve = held_key("m3", host.policy("cache", "serve"), now=clock())
    box.holdings = Holdings.build([*box.holdings.keys["m1"], only_serve])
    body, _, _ = request(service, host.app, ["m1", "m3"])
    response = service.release(body)
    assert [g.model_id for g in response.granted] == ["m1", "m1"]
    assert [(d.model_id, d.reasons) for d in response.denied] == [("m3", ("measurement_mismatch",))]


def test_expired_lease_and_models_not_held(
    service: LocalReleaseService, host: Host, clock: FakeClock, box: Box
) -> None:
    clock.advance(minutes=3)  # m2's two-minute lease ended (the cache has not purged it yet)
    body, _, _ = request(service, host.app, ["m1", "m2", "ghost"])
    response = service.release(body)
    assert {g.model_id for g in response.granted} == {"m1"}
    denied = {d.model_id: d for d in response.denied}
    assert denied["m2"].reasons == ("lease_expired",)
    assert denied["ghost"].reasons == ("not_cached",)
    # after the purge the reason stays lease_expired
    box.holdings = box.holdings.without_expired(clock())
    assert "m2" not in box.holdings.keys
    body, _, _ = request(service, host.app, ["m2"])
    assert service.release(body).denied[0].reasons == ("lease_expired",)


def test_server_denials_pass_through_only_when_they_describe_the_model(
    service: LocalReleaseService, host: Host, box: Box
) -> None:
    box.holdings = Holdings.build(
        box.holdings.keys["m1"],
        denied=[
            ServerDenial("gone", ("unknown_model",), "model 'gone' does not exist"),
            ServerDenial("secret", ("measurement_mismatch",), "MRENCLAVE of the cache ..."),
        ],
    )
    body, _, _ = request(service, host.app, ["gone", "secret"])
    denied = {d.model_id: d for d in service.release(body).denied}
    assert denied["gone"].reasons == ("unknown_model",)
    # the key server's verdict on the *cache's* evidence is not the client's verdict
    assert denied["secret"].reasons == ("not_cached",)
    assert "measurement_mismatch" in denied["secret"].message


def test_refused_cache_serves_nothing_and_says_why(
    service: LocalReleaseService, host: Host, box: Box
) -> None:
    box.holdings = Holdings.build(
        (), refusal=Refusal("attestation_key_untrusted", ("attestation_key_untrusted",), "...")
    )
    body, _, _ = request(service, host.app, ["m1"])
    response = service.release(body)
    assert response.granted == ()
    assert response.denied[0].reasons == ("not_cached",)
    assert "refused this key cache's own attestation" in response.denied[0].message


def test_every_model_mode_hides_denials(service: LocalReleaseService, host: Host) -> None:
    body, _, _ = request(service, host.serve, None)
    response = service.release(body)
    assert response.granted == ()
    assert response.denied == ()
    body, _, _ = request(service, host.app, None)
    assert {g.model_id for g in service.release(body).granted} == {"m1", "m2"}


def test_local_sessions_renew_against_current_holdings(
    service: LocalReleaseService, host: Host, clock: FakeClock, box: Box, keys: dict[str, Any]
) -> None:
    body, private, _ = request(service, host.app, ["m1"], session=True)
    response = service.release(body)
    assert response.session is not None
    token = response.session.token
    assert response.session.expires_at == clock() + timedelta(minutes=5)

    fresh = secrets.token_bytes(32)
    renewed = service.renew(token, RenewRequest(nonce=fresh, models=None))
    assert open_all(renewed, private, fresh) == {
        ("m1", 2): keys["m1v2"].key.material,
        ("m1", 1): keys["m1"].key.material,
    }
    outside = service.renew(token, RenewRequest(nonce=fresh, models=("m1", "m2")))
    assert [(d.model_id, d.reasons) for d in outside.denied] == [("m2", ("not_in_session",))]

    # a key revoked meanwhile (gone from the holdings) is not renewed
    box.holdings = Holdings.build([keys["m1v2"], keys["m2"]])
    renewed = service.renew(token, RenewRequest(nonce=fresh))
    assert [(g.model_id, g.key_version) for g in renewed.granted] == [("m1", 2)]

    with pytest.raises(LocalError) as bogus:
        service.renew("kcs_" + "x" * 43, RenewRequest(nonce=fresh))
    assert bogus.value.code == "session_invalid"
    clock.advance(minutes=5)
    with pytest.raises(LocalError) as expired:
        service.renew(token, RenewRequest(nonce=fresh))
    assert expired.value.code == "session_invalid"


def test_no_session_without_a_grant(service: LocalReleaseService, host: Host) -> None:
    body, _, _ = request(service, host.serve, ["m1"], session=True)
    assert service.release(body).session is None
