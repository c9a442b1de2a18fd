"""The key server's release statements through a real key cache, from the attacker's side.

The cache pins the key server's release-signing key: it holds a key only with a statement
that key signed, issued to the cache itself, and forwards that statement with every key it
re-seals to a local enclave, so the enclave checks the key's origin end to end. A fake key
source where the cache expects the key server (the host owns the socket) gets the cache
nowhere: it holds nothing from it, keeps serving what the real key server released while the
leases run, and refuses every local enclave the fake's "anything goes" policy would admit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from keycache_helpers import (
    Attesters,
    CacheUnderTest,
    KeyServerControl,
    cache_settings,
    running_cache,
)

from _fixtures.clock import FakeClock
from _fixtures.keyserver import new_signing_key
from sealtorch._demo.fakesource import FakeGrant, FakeKeySource
from sealtorch.attestation import Policy, SimAttester
from sealtorch.errors import ReleaseStatementError
from sealtorch.keys import generate_key
from sealtorch.protocol import SignedStatement, TrustedReleaseKeys, issue_statement

Forge = Callable[[FakeGrant], SignedStatement | None]


def test_the_cache_forwards_the_key_servers_statement_with_each_key(
    cache: CacheUnderTest, keyserver: KeyServerControl, attesters: Attesters
) -> None:
    pins = TrustedReleaseKeys([keyserver.release_key])
    with cache.client(attesters.app, session=True) as client:
        for result in (client.release(["m1", "m2"]), client.renew()):
            for released in result.keys:
                held = cache.cache.holdings().keys[released.model_id][0]
                assert released.statement == held.statement  # as the key server signed it
                assert released.forwarded  # issued to the cache's HPKE key, not the client's
                statement = pins.verify(released.statement, what="key", source="test")
                assert statement.request_id != result.request_id  # the key server's request
                statement.check_key(
                    model_id=released.model_id,
                    key_version=released.key_version,
                    policy_digest=released.policy_digest,
                    key=released.key.material,
                    source="test",
                )


def test_a_client_of_the_cache_pinning_another_key_server_refuses_its_keys(
    cache: CacheUnderTest, attesters: Attesters
) -> None:
    other = new_signing_key().public_key.text
    with (
        cache.client(attesters.app, trusted_release_keys=[other]) as client,
        pytest.raises(ReleaseStatementError) as caught,
    ):
        client.data_key("m1", 1)
    assert caught.value.reason == "statement_unpinned_key"


def _attacks(genuine: Callable[[], SignedStatement]) -> dict[str, Forge]:
    attacker = new_signing_key()

    def signed_by_the_host(grant: FakeGrant) -> SignedStatement:
        return issue_statement(
            attacker,
            model_id=grant.model_id,
            key_version=grant.key_version,
            key=grant.key,
            policy_digest=grant.policy_digest,
            lease_expires_at=grant.lease_expires_at,
            hpke_suite=grant.hpke_suite,
            hpke_public_key=grant.hpke_public_key,
            request_id=grant.request_id,
            issued_at=grant.issued_at,
        )

    return {
        "statement_missing": lambda grant: None,
        "statement_unpinned_key": signed_by_the_host,
        # a genuine statement the key server issued to another enclave, replayed to the cache
        "statement_mismatch": lambda grant: genuine(),
    }


@contextmanager
def _fake_in_place_of_the_key_server(
    keyserver: KeyServerControl, forge: Forge, policy: Policy | None = None
) -> Iterator[FakeKeySource]:
    """The host stops the real key server and answers on its socket itself."""
    keyserver.stop()
    options = {"policy": policy} if policy is not None else {}
    fake = FakeKeySource(keyserver.socket, key=generate_key().material, forge=forge, **options)
    with fake:
        yield fake


@pytest.mark.parametrize(
    "reason", ["statement_missing", "statement_unpinned_key", "statement_mismatch"]
)
def test_a_cache_started_against_a_fake_key_source_holds_nothing(
    tmp_path: Path,
    keyserver: KeyServerControl,
    attesters: Attesters,
    clock: FakeClock,
    reason: str,
) -> None:
    """The incident: a cache pointed at a fake "granted" its key and released it to a
    wrong-MRENCLAVE enclave and a debug enclave. Now it holds nothing from the fake, and
    both are refused (not_cached)."""
    keyserver.server.add_model("m1", policy=attesters.policy())
    with keyserver.server.client(attesters.app) as witness:
        captured = witness.release(["m1"]).keys[0]  # issued to the witness, not to the cache
    forge = _attacks(lambda: captured.statement)[reason]
    policy = Policy.from_dict(dict(captured.policy))
    with (
        _fake_in_place_of_the_key_server(keyserver, forge, policy) as fake,
        running_cache(
            cache_settings(tmp_path, attesters, keyserver), clock=clock, attester=attesters.cache
        ) as cache,
    ):
        assert fake.keys_sent >= 1  # the cache asked the fake and got its key
        assert cache.cache.holdings().key_count == 0
        status = cache.cache.status()
        assert reason in (status.keyserver.last_error or ""), status.keyserver.last_error
        assert status.state != "ready"
        wrong_code = attesters.serve  # not in the policy
        debug = SimAttester(role="app", key_path=attesters.key_path, debug=True)
        for enclave in (wrong_code, debug, attesters.app):
            with cache.client(enclave) as client:
                result = client.release(["m1"])
            assert result.keys == ()
            assert result.denied[0].reasons == ("not_cached",)


def test_a_fake_swapped_in_later_is_refused_and_the_real_keys_run_out_their_leases(
    cache: CacheUnderTest, keyserver: KeyServerControl, attesters: Attesters, clock: FakeClock
) -> None:
    """The host replaces the key server with a fake after the cache started: every refresh
    is rejected (like an outage), the keys the real key server released are served until
    their leases end, and the fake's key never is."""
    kc = cache.cache
    with cache.client(attesters.app) as client:
        original = client.data_key("m1", 1)
    with _fake_in_place_of_the_key_server(keyserver, lambda grant: None) as fake:
        clock.advance(seconds=61)
        kc.tick()
        assert fake.keys_sent >= 1
        status = kc.status()
        assert status.state == "degraded"
        assert "statement_missing" in (status.keyserver.last_error or "")
        with cache.client(attesters.app) as client:
            assert client.data_key("m1", 1) == original
        clock.advance(minutes=11)  # past the real lease
        kc.tick()
        assert kc.holdings().key_count == 0
        with cache.client(attesters.app) as client:
            assert client.release(["m1"]).denied[0].reasons == ("lease_expired",)
