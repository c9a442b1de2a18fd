"""Sealed restart persistence from the attacker's side: the file never holds a key in the clear,
and a blob that was edited, comes from another measurement, another platform key or another
TEE is refused. Leases still count after a restart."""

from __future__ import annotations

import base64
import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from keycache_units import RELEASE_KEY, Host, StubUpstream, held_key, released, result_with

from _fixtures.clock import FakeClock
from _fixtures.keyserver import new_signing_key
from sealtorch.errors import ConfigError, FormatError
from sealtorch.keycache.cache import KeyCache
from sealtorch.keycache.holdings import Holdings
from sealtorch.keycache.persist import PlatformSealer, SealedState, StateRefused
from sealtorch.keycache.upstream import Unreachable
from sealtorch.protocol import TrustedReleaseKeys

PINS = TrustedReleaseKeys([RELEASE_KEY])
MEASUREMENT = "ab" * 32
OTHER = "cd" * 32


@pytest.fixture
def sealer(tmp_path: Path) -> PlatformSealer:
    return PlatformSealer.for_sim(key_file=tmp_path / "sealing.key", measurement=MEASUREMENT)


def _holdings(host: Host, clock: FakeClock) -> Holdings:
    now = clock()
    return Holdings.build(
        [
            held_key("m1", host.policy(), now=now),
            held_key("m1", host.policy(), now=now, version=2),
            held_key("m2", host.policy("cache", "serve"), now=now, lease=timedelta(minutes=1)),
        ]
    )


def test_round_trip_keeps_keys_policies_and_leases(
    tmp_path: Path, sealer: PlatformSealer, host: Host, clock: FakeClock
) -> None:
    holdings = _holdings(host, clock)
    state = SealedState(tmp_path / "state.sealed", sealer, trusted_release_keys=PINS)
    state.save(holdings, now=clock())
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o600
    loaded = {(k.model_id, k.key_version): k for k in state.load(now=clock())}
    for versions in holdings.keys.values():
        for original in versions:
            restored = loaded[(original.model_id, original.key_version)]
            assert restored.key == original.key
            assert restored.expires_at == original.expires_at
            assert restored.policy_digest == original.policy_digest
            assert restored.policy == original.policy
            assert restored.statement == original.statement
    # a restart after m2's lease ended restores only what still runs
    clock.advance(minutes=2)
    assert {(k.model_id, k.key_version) for k in state.load(now=clock())} == {
        ("m1", 1),
        ("m1", 2),
    }


def test_no_key_bytes_on_disk(
    tmp_path: Path, sealer: PlatformSealer, host: Host, clock: FakeClock
) -> None:
    holdings = _holdings(host, clock)
    state = SealedState(tmp_path / "state.sealed", sealer, trusted_release_keys=PINS)
    state.save(holdings, now=clock())
    disk = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    for versions in holdings.keys.values():
        for held in versions:
            material = held.key.material
            for form in (
                material,
                material.hex().encode(),
                base64.b64encode(material).rstrip(b"="),
                base64.urlsafe_b64encode(material).rstrip(b"="),
            ):
                assert form not in disk
    # model ids are inside the ciphertext too: look for them as the JSON would carry them (a bare
    # two-byte id turns up in random ciphertext a few times in a hundred runs)
    blob = state.path.read_bytes()
    assert b'"m1"' not in blob
    assert b"model_id" not in blob


def test_other_measurement_platform_key_or_tee_is_refused(
    tmp_path: Path, sealer: PlatformSealer, host: Host, clock: FakeClock
) -> None:
    path = tmp_path / "state.sealed"
    SealedState(path, sealer, trusted_release_keys=PINS).save(_holdings(host, clock), now=clock())
    other_code = PlatformSealer.for_sim(key_file=tmp_path / "sealing.key", measurement=OTHER)
    with pytest.raises(StateRefused, match="another enclave measurement"):
        SealedState(path, other_code, trusted_release_keys=PINS).load(now=clock())
    other_host = PlatformSealer.for_sim(key_file=tmp_path / "other.key", measurement=MEASUREMENT)
    with pytest.raises(StateRefused, match="failed authentication"):
        SealedState(path, other_host, trusted_release_keys=PINS).load(now=clock())
    raw = (tmp_path / "sealing.key").read_text()
    (tmp_path / "gramine" / "keys").mkdir(parents=True)
    (tmp_path / "gramine" / "keys" / "_sgx_mrenclave").write_bytes(b"k" * 16)
    (tmp_path / "gramine" / "my_target_info").write_bytes(bytes.fromhex(MEASUREMENT) + bytes(480))
    gramine = PlatformSealer.for_gramine(tmp_path / "gramine")
    assert gramine.measurement == MEASUREMENT
    with pytest.raises(StateRefused):
        SealedState(path, gramine, trusted_release_keys=PINS).load(now=clock())
    assert raw == (tmp_path / "sealing.key").read_text()


def test_header_relabelled_to_our_measurement_still_fails(
    tmp_path: Path, sealer: PlatformSealer, host: Host, clock: FakeClock
) -> None:
    """Produced under another measurement, then edited to claim ours: the key derivation and
    the associated data both bind the measurement, so it does not open."""
    foreign = PlatformSealer.for_sim(key_file=tmp_path / "sealing.key", measurement=OTHER)
    path = tmp_path / "state.sealed"
    SealedState(path, foreign, trusted_release_keys=PINS).save(_holdings(host, clock), now=clock())
    blob = path.read_bytes().replace(OTHER.encode(), MEASUREMENT.encode())
    path.write_bytes(blob)
    with pytest.raises(StateRefused, match="failed authentication"):
        SealedState(path, sealer, trusted_release_keys=PINS).load(now=clock())


@given(data=st.data())
def test_any_edit_is_refused(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    directory = tmp_path_factory.mktemp("tamper")
    sealer = PlatformSealer.for_sim(key_file=directory / "k", measurement=MEASUREMENT)
    clock = FakeClock()
    blob = sealer.seal(b'{"keys":[]}', sealed_at=clock())
    index = data.draw(st.integers(0, len(blob) - 1))
    flip = data.draw(st.integers(1, 255))
    edited = blob[:index] + bytes([blob[index] ^ flip]) + blob[index + 1 :]
    with pytest.raises((StateRefused, FormatError)):
        sealer.open(edited)
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises((StateRefused, FormatError)):
        sealer.open(blob[:cut])


def test_sim_sealing_key_file_must_be_private(tmp_path: Path) -> None:
    key = tmp_path / "sealing.key"
    PlatformSealer.for_sim(key_file=key, measurement=MEASUREMENT)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    os.chmod(key, 0o644)  # noqa: PTH101
    with pytest.raises(ConfigError, match="chmod 600"):
        PlatformSealer.for_sim(key_file=key, measurement=MEASUREMENT)
    key.chmod(0o600)
    key.write_text("something else\n")
    with pytest.raises(ConfigError, match="not a sealtorch sim sealing key"):
        PlatformSealer.for_sim(key_file=key, measurement=MEASUREMENT)


def test_gramine_needs_its_sealing_key_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs Gramine-SGX"):
        PlatformSealer.for_gramine(tmp_path)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "_sgx_mrenclave").write_bytes(b"short")
    (tmp_path / "my_target_info").write_bytes(bytes(512))
    with pytest.raises(ConfigError, match="16-byte"):
        PlatformSealer.for_gramine(tmp_path)


def test_cache_restores_then_refreshes_and_refuses_a_bad_state(
    tmp_path: Path, sealer: PlatformSealer, host: Host, clock: FakeClock
) -> None:
    path = tmp_path / "state.sealed"
    state = SealedState(path, sealer, trusted_release_keys=PINS)
    first = StubUpstream(clock)
    first.outcomes.append(
        result_with(clock, [released("m", host.policy(), expires=clock() + timedelta(minutes=10))])
    )
    cache = KeyCache(upstream=first, clock=clock, tee="sim", state=state)
    cache.start()
    original = cache.holdings().keys["m"][0].key
    assert path.exists()

    # restart while the key server is down: the running lease is served from the sealed state
    clock.advance(minutes=3)
    down = StubUpstream(clock)
    down.outcomes.append(Unreachable("down"))
    restarted = KeyCache(upstream=down, clock=clock, tee="sim", state=state)
    restarted.start()
    assert restarted.holdings().keys["m"][0].key == original
    assert restarted.holdings().keys["m"][0].expires_at == clock() + timedelta(minutes=7)
    status = restarted.status()
    assert status.state == "degraded"
    assert status.persistence is not None
    assert status.persistence.restored_keys == 1

    # an edited state file is refused (logged, in the status) and nothing is restored
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x40
    path.write_bytes(bytes(blob))
    down = StubUpstream(clock)
    down.outcomes.append(Unreachable("down"))
    tampered = KeyCache(upstream=down, clock=clock, tee="sim", state=state)
    tampered.start()
    assert tampered.holdings().key_count == 0
    assert tampered.status().persistence.error
    assert "failed authentication" in tampered.status().persistence.error


def test_restored_keys_need_a_statement_the_pinned_keys_verify(
    tmp_path: Path,
    sealer: PlatformSealer,
    host: Host,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The key server's statements are verified again on restore: under pins that no longer
    include the key that signed them (a finished rollover), the keys are not restored."""
    path = tmp_path / "state.sealed"
    SealedState(path, sealer, trusted_release_keys=PINS).save(_holdings(host, clock), now=clock())
    assert len(SealedState(path, sealer, trusted_release_keys=PINS).load(now=clock())) == 3
    rotated = TrustedReleaseKeys([new_signing_key().public_key])
    assert SealedState(path, sealer, trusted_release_keys=rotated).load(now=clock()) == []
    assert "statement_unpinned_key" in caplog.text
