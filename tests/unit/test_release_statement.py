"""The release statement contract (``sealtorch.protocol.statement``) from the attacker's side:
the exact payload, the commitment, the public key's text form, and every way a statement can be
wrong — refused with its stable reason code."""

from __future__ import annotations

import hashlib
import json
import struct
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from _fixtures.keyserver import new_signing_key
from sealtorch._crypto import hpke
from sealtorch._crypto.sign import ed25519_verify
from sealtorch.errors import ConfigError, ProtocolError, ReleaseStatementError
from sealtorch.keys import generate_key
from sealtorch.protocol import (
    DEFAULT_HPKE_SUITE,
    ReleasePublicKey,
    ReleaseStatement,
    SignedStatement,
    TrustedReleaseKeys,
    b64encode,
    issue_statement,
    key_commitment,
)

SIGNER = new_signing_key()
OTHER = new_signing_key()
PINS = TrustedReleaseKeys([SIGNER.public_key.text])
KEY = generate_key()
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
PUBLIC = hpke.generate_private_key().public_key().encode()
DIGEST = "ab" * 32


def _issue(signer: Any = SIGNER, **changes: Any) -> SignedStatement:
    fields: dict[str, Any] = {
        "model_id": "resnet50",
        "key_version": 2,
        "key": KEY.material,
        "policy_digest": DIGEST,
        "lease_expires_at": NOW + timedelta(hours=1),
        "hpke_suite": DEFAULT_HPKE_SUITE,
        "hpke_public_key": PUBLIC,
        "request_id": "0b7c" * 8,
        "issued_at": NOW,
    }
    fields.update(changes)
    return issue_statement(signer, **fields)


def _verify(signed: SignedStatement) -> ReleaseStatement:
    return PINS.verify(signed, what="the key of 'resnet50' v2", source="the test")


def test_the_payload_is_exactly_the_documented_canonical_json() -> None:
    signed = _issue()
    expected = {
        "hpke_public_key": b64encode(PUBLIC),
        "hpke_suite": DEFAULT_HPKE_SUITE,
        "issued_at": "2026-12-01T12:00:00.000000Z",
        "key_commitment": key_commitment(model_id="resnet50", key_version=2, key=KEY.material),
        "key_version": 2,
        "lease_expires_at": "2026-12-01T13:00:00.000000Z",
        "model_id": "resnet50",
        "policy_digest": DIGEST,
        "request_id": "0b7c" * 8,
        "signing_key_id": SIGNER.key_id,
        "type": "sealtorch.release-statement",
        "version": 1,
    }
    canonical = json.dumps(expected, sort_keys=True, separators=(",", ":")).encode()
    assert signed.payload == canonical
    assert signed.key_id == SIGNER.key_id
    # the signature is Ed25519 over the domain tag and the payload
    ed25519_verify(
        SIGNER.public_key.raw, signed.signature, b"sealtorch/v1/release-statement\x00" + canonical
    )
    statement = _verify(signed)
    assert statement.payload() == canonical
    assert statement.addressed_to(hpke_suite=DEFAULT_HPKE_SUITE, hpke_public_key=PUBLIC)
    assert not statement.addressed_to(hpke_suite=DEFAULT_HPKE_SUITE, hpke_public_key=bytes(32))


def test_the_commitment_binds_model_version_and_key_without_revealing_it() -> None:
    raw = b"resnet50"
    expected = hashlib.sha256(
        b"sealtorch/v1/key-commitment\x00"
        + struct.pack(">H", len(raw))
        + raw
        + struct.pack(">I", 2)
        + KEY.material
    ).hexdigest()
    assert key_commitment(model_id="resnet50", key_version=2, key=KEY.material) == expected
    others = {
        key_commitment(model_id="resnet51", key_version=2, key=KEY.material),
        key_commitment(model_id="resnet50", key_version=3, key=KEY.material),
        key_commitment(model_id="resnet50", key_version=2, key=generate_key().material),
    }
    assert expected not in others
    payload = _issue().payload
    for form in (KEY.material, KEY.material.hex().encode(), b64encode(KEY.material).encode()):
        assert form not in payload


def test_public_keys_have_one_text_form_and_a_key_id() -> None:
    key = SIGNER.public_key
    assert key.text.startswith("sealtorch-release-key-v1:")
    assert ReleasePublicKey.parse(key.text) == key
    assert ReleasePublicKey.parse(f"  {key.text}\n") == key  # as read from a .pub file
    assert len(key.key_id) == 32
    assert (
        key.key_id
        == hashlib.sha256(b"sealtorch/v1/release-signing-key\x00" + key.raw).digest()[:16].hex()
    )
    assert key.key_id in repr(key)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must start with"),
        ("ed25519:" + "11" * 32, "must start with"),
        ("sealtorch-master-key-v1:AAAA", "must start with"),
        ("sealtorch-release-key-v1:AAAA", "damaged"),
        ("sealtorch-release-key-v1:" + "A" * 43 + "=", "damaged"),
        ("sealtorch-release-key-v1:" + "!" * 43, "damaged"),
    ],
)
def test_malformed_public_keys_are_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ReleasePublicKey.parse(text)


def test_there_is_no_unpinned_mode() -> None:
    with pytest.raises(ConfigError, match="--keyserver-pubkey"):
        TrustedReleaseKeys([])
    both = TrustedReleaseKeys([SIGNER.public_key, OTHER.public_key.text, SIGNER.public_key])
    assert set(both.key_ids) == {SIGNER.key_id, OTHER.key_id}


def test_a_statement_signed_by_an_unpinned_key_is_refused() -> None:
    with pytest.raises(ReleaseStatementError) as caught:
        _verify(_issue(OTHER))
    assert caught.value.reason == "statement_unpinned_key"
    assert caught.value.reasons == ("statement_unpinned_key",)
    assert isinstance(caught.value, ProtocolError)
    assert OTHER.key_id in str(caught.value)
    assert "--keyserver-pubkey" in str(caught.value)
    # claiming to be the pinned key does not help: the signature is the attacker's
    forged = _issue(OTHER).model_copy(update={"key_id": SIGNER.key_id})
    with pytest.raises(ReleaseStatementError) as caught:
        _verify(forged)
    assert caught.value.reason == "statement_invalid"


@given(
    where=st.sampled_from(["payload", "signature"]),
    index=st.integers(min_value=0),
    bit=st.integers(min_value=0, max_value=7),
)
def test_any_flipped_bit_is_refused(where: str, index: int, bit: int) -> None:
    signed = _issue()
    data = bytearray(getattr(signed, where))
    data[index % len(data)] ^= 1 << bit
    with pytest.raises(ReleaseStatementError) as caught:
        _verify(signed.model_copy(update={where: bytes(data)}))
    assert caught.value.reason == "statement_invalid"


def _signed_payload(document: dict[str, Any], signer: Any = SIGNER) -> SignedStatement:
    payload = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    signature = signer.sign(b"sealtorch/v1/release-statement\x00" + payload)
    return SignedStatement(payload=payload, signature=signature, key_id=signer.key_id)


@pytest.mark.parametrize(
    "change",
    [
        {"type": "sealtorch.something-else"},
        {"version": 2},
        {"version": True},
        {"key_version": 0},
        {"key_version": "2"},
        {"model_id": "../etc"},
        {"key_commitment": "AB" * 32},
        {"policy_digest": 7},
        {"issued_at": "yesterday"},
        {"hpke_public_key": "not base64url!"},
        {"signing_key_id": OTHER.key_id},
        {"extra": 1},
        {"request_id": None},
    ],
)
def test_payloads_that_are_not_exactly_a_v1_statement_are_refused(change: dict[str, Any]) -> None:
    """Even signed by the pinned key: the payload must be exactly what version 1 defines."""
    document = json.loads(_issue().payload)
    document.update(change)
    with pytest.raises(ReleaseStatementError) as caught:
        _verify(_signed_payload(document))
    assert caught.value.reason == "statement_invalid"


def test_a_non_canonical_payload_is_refused() -> None:
    document = json.loads(_issue().payload)
    payload = json.dumps(document, indent=1).encode()  # same content, other bytes
    signature = SIGNER.sign(b"sealtorch/v1/release-statement\x00" + payload)
    with pytest.raises(ReleaseStatementError) as caught:
        _verify(SignedStatement(payload=payload, signature=signature, key_id=SIGNER.key_id))
    assert caught.value.reason == "statement_invalid"


@pytest.mark.parametrize(
    ("check", "reason"),
    [
        ({"model_id": "lite0"}, "statement_mismatch"),
        ({"key_version": 1}, "statement_mismatch"),
        ({"policy_digest": "cd" * 32}, "statement_mismatch"),
        ({"key": generate_key().material}, "key_commitment_mismatch"),
    ],
)
def test_a_statement_about_another_key_is_refused(check: dict[str, Any], reason: str) -> None:
    statement = _verify(_issue())
    arguments: dict[str, Any] = {
        "model_id": "resnet50",
        "key_version": 2,
        "policy_digest": DIGEST,
        "key": KEY.material,
        "source": "unix:///run/fake.sock",
    }
    statement.check_key(**arguments)  # about exactly this key: fine
    arguments.update(check)
    with pytest.raises(ReleaseStatementError) as caught:
        statement.check_key(**arguments)
    assert caught.value.reason == reason
    assert "unix:///run/fake.sock" in str(caught.value)
    assert KEY.material.hex() not in str(caught.value)


@given(st.binary(max_size=600))
def test_arbitrary_signed_payloads_never_crash_the_parser(payload: bytes) -> None:
    signature = SIGNER.sign(b"sealtorch/v1/release-statement\x00" + payload)
    signed = SignedStatement(payload=payload or b"{", signature=signature, key_id=SIGNER.key_id)
    with pytest.raises(ReleaseStatementError):
        _verify(signed)
