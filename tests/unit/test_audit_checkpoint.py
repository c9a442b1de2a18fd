"""Audit checkpoints (sealtorch.protocol.checkpoint): format, signature, domain separation."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sealtorch.keyserver.signingkey import FileReleaseSigningKey
from sealtorch.protocol.audit import GENESIS_HASH, AuditChainError
from sealtorch.protocol.checkpoint import (
    AuditCheckpoint,
    SignedCheckpoint,
    check_log_against,
    issue_checkpoint,
    verify_checkpoint,
)
from sealtorch.protocol.statement import (
    ReleaseStatement,
    SignedStatement,
    TrustedReleaseKeys,
    issue_statement,
)

_AT = datetime(2026, 12, 7, 4, 0, 0, 123456, tzinfo=UTC)
_HASH = "ab" * 32


@pytest.fixture
def key(tmp_path: Path) -> FileReleaseSigningKey:
    return FileReleaseSigningKey.create(tmp_path / "signing.key")


def _problem(call: Callable[[], object]) -> str:
    with pytest.raises(AuditChainError) as info:
        call()
    return info.value.problem


def test_round_trip(key: FileReleaseSigningKey) -> None:
    signed = issue_checkpoint(key, seq=7, head_hash=_HASH, issued_at=_AT)
    assert signed.payload == (
        b'{"head_hash":"' + _HASH.encode() + b'","issued_at":"2026-12-07T04:00:00.123456Z",'
        b'"seq":7,"signing_key_id":"' + key.key_id.encode() + b'",'
        b'"type":"sealtorch.audit-checkpoint","version":1}'
    )
    again = SignedCheckpoint.model_validate_json(signed.model_dump_json())
    checkpoint = verify_checkpoint(again, TrustedReleaseKeys([key.public_key]), where="x")
    assert (checkpoint.seq, checkpoint.head_hash, checkpoint.issued_at) == (7, _HASH, _AT)


def test_a_release_statement_is_never_a_checkpoint(key: FileReleaseSigningKey) -> None:
    statement = issue_statement(
        key,
        model_id="m",
        key_version=1,
        key=b"k" * 32,
        policy_digest=_HASH,
        lease_expires_at=_AT,
        hpke_suite="s",
        hpke_public_key=b"p" * 32,
        request_id="r",
        issued_at=_AT,
    )
    trusted = TrustedReleaseKeys([key.public_key])
    as_checkpoint = SignedCheckpoint(
        payload=statement.payload, signature=statement.signature, key_id=statement.key_id
    )
    assert _problem(lambda: verify_checkpoint(as_checkpoint, trusted, where="x")) == (
        "checkpoint_invalid"
    )
    # ...and the other way round: a checkpoint's signature does not make a statement.
    checkpoint = issue_checkpoint(key, seq=1, head_hash=_HASH, issued_at=_AT)
    as_statement = SignedStatement(
        payload=checkpoint.payload, signature=checkpoint.signature, key_id=checkpoint.key_id
    )
    with pytest.raises(Exception, match="does not verify"):
        trusted.verify(as_statement, what="k", source="s")
    with pytest.raises(ValueError):
        ReleaseStatement.from_payload(checkpoint.payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"{}",
        b'{"head_hash":"' + _HASH.encode() + b'","issued_at":"2026-12-07T04:00:00.123456Z",'
        b'"seq":true,"signing_key_id":"x","type":"sealtorch.audit-checkpoint","version":1}',
        b'{"head_hash":"' + _HASH.encode() + b'", "issued_at":"2026-12-07T04:00:00.123456Z",'
        b'"seq":1,"signing_key_id":"x","type":"sealtorch.audit-checkpoint","version":1}',
        b'{"head_hash":"' + _HASH.encode() + b'","issued_at":"2026-12-07T04:00:00.123456Z",'
        b'"seq":1,"signing_key_id":"x","type":"sealtorch.release-statement","version":1}',
    ],
)
def test_only_canonical_payloads_parse(payload: bytes) -> None:
    with pytest.raises(ValueError):
        AuditCheckpoint.from_payload(payload)


def test_check_log_against() -> None:
    checkpoint = AuditCheckpoint(seq=3, head_hash=_HASH, issued_at=_AT, signing_key_id="k")
    check_log_against({3: _HASH}, last_seq=5, checkpoint=checkpoint, where="x")
    assert (
        _problem(lambda: check_log_against({}, last_seq=2, checkpoint=checkpoint, where="x"))
        == "audit_rolled_back"
    )
    assert (
        _problem(
            lambda: check_log_against({3: "cd" * 32}, last_seq=3, checkpoint=checkpoint, where="x")
        )
        == "audit_rewritten"
    )
    empty = AuditCheckpoint(seq=0, head_hash=GENESIS_HASH, issued_at=_AT, signing_key_id="k")
    check_log_against({}, last_seq=0, checkpoint=empty, where="x")
