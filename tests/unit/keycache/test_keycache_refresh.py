"""KeyCache's schedule and state machine at fixed times: renew before expiry, bound revocation
latency by the refresh interval, back off while the key server is away, drop what it no longer
releases, drop everything when it refuses the cache."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from keycache_units import Host, StubUpstream, released, result_with

from _fixtures.clock import FakeClock
from sealtorch.client import Denial
from sealtorch.errors import ProtocolError
from sealtorch.keycache.cache import KeyCache
from sealtorch.keycache.upstream import AttestFailed, Refused, Unreachable


def make_cache(clock: FakeClock, upstream: StubUpstream, **options: Any) -> KeyCache:
    settings: dict[str, Any] = {
        "refresh_interval": timedelta(minutes=1),
        "renew_fraction": 0.5,
        "backoff_initial": 1.0,
        "backoff_max": 16.0,
        "random_fraction": lambda: 1.0,
    }
    settings.update(options)
    return KeyCache(upstream=upstream, clock=clock, tee="sim", **settings)


def lease(clock: FakeClock, minutes: float) -> Any:
    return clock() + timedelta(minutes=minutes)


def test_next_refresh_is_the_earlier_of_interval_and_half_lease(
    host: Host, clock: FakeClock
) -> None:
    upstream = StubUpstream(clock)
    upstream.outcomes.append(
        result_with(clock, [released("m", host.policy(), expires=lease(clock, 10))])
    )
    short = make_cache(clock, upstream)
    short.start()
    assert short.tick() == pytest.approx(60.0)  # the refresh interval bounds revocation latency

    upstream = StubUpstream(clock)
    upstream.outcomes.append(
        result_with(clock, [released("m", host.policy(), expires=lease(clock, 10))])
    )
    long = make_cache(clock, upstream, refresh_interval=timedelta(hours=1))
    long.start()
    assert long.tick() == pytest.approx(300.0)  # renew when half the 10-minute lease has passed
    assert long.status().next_refresh_at == clock() + timedelta(minutes=5)


def test_leases_are_converted_to_the_caches_clock(host: Host, clock: FakeClock) -> None:
    """A key server whose clock runs an hour ahead grants 10 minutes: the cache holds the key
    for 10 minutes of its own time, not for 70."""
    ahead = timedelta(hours=1)
    upstream = StubUpstream(clock)
    upstream.outcomes.append(
        result_with(
            clock,
            [released("m", host.policy(), expires=clock() + ahead + timedelta(minutes=10))],
            server_offset=ahead,
        )
    )
    cache = make_cache(clock, upstream, refresh_interval=timedelta(hours=2))
    cache.start()
    assert cache.holdings().keys["m"][0].expires_at == clock() + timedelta(minutes=10)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_backoff_doubles_with_jitter_up_to_the_cap(
    host: Host, clock: FakeClock, fraction: float
) -> None:
    upstream = StubUpstream(clock)
    upstream.outcomes.extend(Unreachable("down") for _ in range(8))
    cache = make_cache(clock, upstream, random_fraction=lambda: fraction)
    delays = []
    for _ in range(8):
        cache.refresh_once()
        delays.append(cache.tick())
        clock.advance(seconds=delays[-1])
    bases = [1, 2, 4, 8, 16, 16, 16, 16]
    # "equal jitter": between half of the base delay and all of it
    expected = [b / 2 if fraction == 0.0 else b for b in bases]
    assert delays[:-1] == pytest.approx(expected[:-1])
    status = cache.status()
    assert status.state == "unavailable"
    assert status.keyserver.reachable is False
    assert status.keyserver.consecutive_failures == 8


def test_a_refresh_replaces_the_holdings(host: Host, clock: FakeClock) -> None:
    policy = host.policy()
    upstream = StubUpstream(clock)
    upstream.outcomes += [
        result_with(
            clock,
            [
                released("a", policy, expires=lease(clock, 10), version=1),
                released("b", policy, expires=lease(clock, 10)),
            ],
        ),
        # a's v1 revoked (v2 is current); b no longer released to this cache
        result_with(clock, [released("a", policy, expires=lease(clock, 11), version=2)]),
    ]
    cache = make_cache(clock, upstream)
    cache.start()
    assert {m: [k.key_version for k in v] for m, v in cache.holdings().keys.items()} == {
        "a": [1],
        "b": [1],
    }
    clock.advance(minutes=1)
    cache.tick()
    assert {m: [k.key_version for k in v] for m, v in cache.holdings().keys.items()} == {"a": [2]}
    assert cache.status().state == "ready"


def test_a_refused_cache_drops_everything_and_recovers_when_accepted(
    host: Host, clock: FakeClock
) -> None:
    policy = host.policy()
    upstream = StubUpstream(clock)
    upstream.outcomes += [
        result_with(clock, [released("a", policy, expires=lease(clock, 10))]),
        Refused(
            "the key server refused this key cache: evidence refused",
            code="attestation_key_untrusted",
            reasons=("attestation_key_untrusted",),
        ),
        result_with(clock, [released("a", policy, expires=lease(clock, 20))]),
    ]
    cache = make_cache(clock, upstream)
    cache.start()
    clock.advance(minutes=1)
    cache.tick()
    status = cache.status()
    assert cache.holdings().key_count == 0
    assert status.state == "denied"
    assert status.attestation.state == "denied"
    assert status.attestation.reasons == ("attestation_key_untrusted",)
    assert cache.holdings().refusal is not None
    clock.advance(seconds=1)
    cache.tick()
    assert cache.status().state == "ready"
    assert cache.holdings().refusal is None


def test_a_tampered_or_unattestable_refresh_keeps_running_leases(
    host: Host, clock: FakeClock
) -> None:
    upstream = StubUpstream(clock)
    upstream.outcomes += [
        result_with(clock, [released("a", host.policy(), expires=lease(clock, 10))]),
        ProtocolError("the policy sent with 'a' v1 does not match its digest"),
        AttestFailed("this key cache could not attest: /dev/attestation does not exist"),
    ]
    cache = make_cache(clock, upstream)
    cache.start()
    held = cache.holdings()
    clock.advance(minutes=1)
    cache.tick()
    assert cache.holdings() is held
    assert cache.status().state == "degraded"
    assert "rejected a key server response" in (cache.status().keyserver.last_error or "")
    clock.advance(seconds=1)
    cache.tick()
    assert cache.holdings() is held
    assert cache.status().attestation.state == "error"


def test_a_policy_the_cache_cannot_enforce_is_not_served(host: Host, clock: FakeClock) -> None:
    """A key whose policy this build cannot parse (say, a newer schema) must not be served
    without its policy: fail closed for that model, keep the others."""
    document = {**host.policy().to_dict(), "future_rule": True}
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    import hashlib

    digest = hashlib.sha256(canonical.encode()).hexdigest()
    odd = released("odd", host.policy(), expires=lease(clock, 10), document=document)
    odd = type(odd)(**{**odd.__dict__, "policy_digest": digest})
    upstream = StubUpstream(clock)
    upstream.outcomes.append(
        result_with(clock, [odd, released("fine", host.policy(), expires=lease(clock, 10))])
    )
    cache = make_cache(clock, upstream)
    cache.start()
    assert set(cache.holdings().keys) == {"fine"}
    assert cache.holdings().denied["odd"].reasons == ("policy_invalid",)


def test_leases_end_on_time_even_without_a_refresh(host: Host, clock: FakeClock) -> None:
    upstream = StubUpstream(clock)
    upstream.outcomes += [
        result_with(
            clock,
            [
                released("short", host.policy(), expires=lease(clock, 2)),
                released("long", host.policy(), expires=lease(clock, 30)),
            ],
        ),
        *(Unreachable("down") for _ in range(20)),
    ]
    cache = make_cache(clock, upstream, refresh_interval=timedelta(hours=1))
    cache.start()
    assert cache.tick() == pytest.approx(60.0)  # the short lease's renewal (half of 2 min)
    clock.advance(minutes=2)
    dropped = cache.expire()
    assert dropped == 1
    assert set(cache.holdings().keys) == {"long"}
    assert set(cache.holdings().expired) == {"short"}
    status = cache.status()
    assert [m.model_id for m in status.models] == ["long"]
    assert [e.model_id for e in status.expired] == ["short"]
    assert status.state == "ready"


def test_status_holds_no_key_material(host: Host, clock: FakeClock) -> None:
    keys = [released(f"m{i}", host.policy(), expires=lease(clock, 10)) for i in range(3)]
    upstream = StubUpstream(clock)
    upstream.outcomes.append(
        result_with(clock, keys, denied=(Denial("x", ("unknown_model",), "no such model"),))
    )
    cache = make_cache(clock, upstream)
    cache.start()
    text = cache.status().model_dump_json()
    for key in keys:
        material = key.key.material
        assert material.hex() not in text
        assert repr(material)[2:-1] not in text
    assert "fingerprint" not in text
    assert json.loads(text)["denied"] == [
        {"model_id": "x", "reasons": ["unknown_model"], "message": "no such model"}
    ]


def test_background_loop_refreshes_on_wake(host: Host, clock: FakeClock) -> None:
    upstream = StubUpstream(clock)
    upstream.outcomes += [
        result_with(clock, [released("a", host.policy(), expires=lease(clock, 10))])
        for _ in range(3)
    ]
    cache = make_cache(clock, upstream)
    cache.start()
    cache.start_background()
    try:
        cache.wake()
        assert cache.wait_for(lambda c: c.attempts >= 2, timeout=10)
    finally:
        cache.close()
    assert upstream.closed
