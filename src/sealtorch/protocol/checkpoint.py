"""Audit checkpoints: the key server's signature on its audit head, for the owner to keep.

A hash chain cannot show that its tail was deleted and its head row rewritten consistently
(:mod:`sealtorch.protocol.audit`). A checkpoint can: the key server signs its current head
``(seq, hash)``, the owner saves the checkpoint *outside* the key server's host and database,
and a later verify requires the log to still contain that record at that position.

Contract (version 1):

* **Signed with the release-signing key** (:mod:`sealtorch.protocol.statement`), the key every
  consumer already pins, so the owner pins nothing new; domain-separated from release
  statements twice over: the signature covers ``"sealtorch/v1/audit-checkpoint\\0"`` ‖ the
  payload (a statement's covers ``"sealtorch/v1/release-statement\\0"`` ‖ its payload), and the
  payload's ``type`` and fields differ (each parser requires exactly its own).
* **The payload** is canonical JSON (keys sorted, separators ``,`` and ``:``, ASCII only) of::

      {"head_hash": hex64, "issued_at": time, "seq": int, "signing_key_id": hex32,
       "type": "sealtorch.audit-checkpoint", "version": 1}

  ``signing_key_id`` is the key server's identity (its release-signing key).
* **The saved form** is one JSON object per line: ``{"key_id", "payload", "signature"}``
  (payload and signature base64url, :class:`SignedCheckpoint`).

:func:`issue_checkpoint` is the key server's side; :func:`verify_checkpoint` checks a saved one
under the pinned keys and :func:`check_log_against` checks a verified chain against it.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Final

from pydantic import Field, ValidationError

from sealtorch._crypto.sign import BadSignature, ed25519_verify
from sealtorch.errors import AuditError
from sealtorch.protocol._wire import B64Bytes
from sealtorch.protocol.audit import GENESIS_HASH, AuditChainError
from sealtorch.protocol.statement import (
    SignedPayload,
    StatementSigner,
    TrustedReleaseKeys,
    canonical_payload,
    parse_payload_time,
    payload_time,
)

__all__ = [
    "AUDIT_REWRITTEN",
    "AUDIT_ROLLED_BACK",
    "CHECKPOINT_INVALID",
    "CHECKPOINT_TYPE",
    "CHECKPOINT_UNPINNED_KEY",
    "AuditCheckpoint",
    "SignedCheckpoint",
    "check_log_against",
    "issue_checkpoint",
    "read_checkpoints",
    "verify_checkpoint",
]

CHECKPOINT_TYPE: Final = "sealtorch.audit-checkpoint"
CHECKPOINT_VERSION: Final = 1

#: Reason codes (``AuditChainError.problem``).
AUDIT_ROLLED_BACK: Final = "audit_rolled_back"
AUDIT_REWRITTEN: Final = "audit_rewritten"
CHECKPOINT_INVALID: Final = "checkpoint_invalid"
CHECKPOINT_UNPINNED_KEY: Final = "checkpoint_unpinned_key"

_SIGNING_CONTEXT: Final = b"sealtorch/v1/audit-checkpoint\x00"
_FIELDS: Final = frozenset({"head_hash", "issued_at", "seq", "signing_key_id", "type", "version"})
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


class SignedCheckpoint(SignedPayload):
    """A checkpoint on the wire and in the owner's file: payload bytes, signature, key id."""

    payload: Annotated[B64Bytes, Field(min_length=1, max_length=1024)]


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditCheckpoint:
    """The verified content of a checkpoint."""

    seq: int
    head_hash: str
    issued_at: datetime
    signing_key_id: str

    def payload(self) -> bytes:
        document = {
            "head_hash": self.head_hash,
            "issued_at": payload_time(self.issued_at),
            "seq": self.seq,
            "signing_key_id": self.signing_key_id,
            "type": CHECKPOINT_TYPE,
            "version": CHECKPOINT_VERSION,
        }
        return canonical_payload(document)

    @classmethod
    def from_payload(cls, payload: bytes) -> AuditCheckpoint:
        """Parse a payload; ValueError unless it is exactly a canonical version 1 checkpoint."""
        document = json.loads(payload)
        if not isinstance(document, dict) or set(document) != _FIELDS:
            raise ValueError("the payload does not have a checkpoint's fields")
        if document["type"] != CHECKPOINT_TYPE or document["version"] != CHECKPOINT_VERSION:
            raise ValueError("not a version 1 audit checkpoint")
        seq = document["seq"]
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**62:
            raise ValueError("seq is not a sequence number")
        for name in ("head_hash", "issued_at", "signing_key_id"):
            if not isinstance(document[name], str):
                raise ValueError(f"{name} is not a string")
        if not _HEX64.fullmatch(document["head_hash"]):
            raise ValueError("head_hash is not 64 hex digits")
        checkpoint = cls(
            seq=seq,
            head_hash=document["head_hash"],
            issued_at=parse_payload_time(document["issued_at"]),
            signing_key_id=document["signing_key_id"],
        )
        if checkpoint.payload() != payload:
            raise ValueError("the payload is not canonical JSON")
        return checkpoint

    def describe(self) -> str:
        return (
            f"checkpoint {self.seq}:{self.head_hash[:16]}... of "
            f"{self.issued_at.strftime('%Y-%m-%dT%H:%M:%SZ')} (key {self.signing_key_id})"
        )


#: The fields of a JSON log record (``--log-format json``), and the one that carries a checkpoint
#: in the key server's periodic ``audit checkpoint`` records.
_LOG_RECORD: Final = frozenset({"time", "level", "logger", "message"})
_LOGGED_CHECKPOINT: Final = "audit_checkpoint"


def issue_checkpoint(
    signer: StatementSigner, *, seq: int, head_hash: str, issued_at: datetime
) -> SignedCheckpoint:
    """The signed checkpoint of the audit head ``(seq, head_hash)`` (the key server's side)."""
    payload = AuditCheckpoint(
        seq=seq, head_hash=head_hash, issued_at=issued_at, signing_key_id=signer.key_id
    ).payload()
    return SignedCheckpoint(
        payload=payload, signature=signer.sign(_SIGNING_CONTEXT + payload), key_id=signer.key_id
    )


def verify_checkpoint(
    signed: SignedCheckpoint, trusted: TrustedReleaseKeys, *, where: str
) -> AuditCheckpoint:
    """The checkpoint, if it verifies under a pinned key; else :class:`AuditChainError`
    (``checkpoint_unpinned_key``, ``checkpoint_invalid``). ``where`` names it in messages."""
    key = trusted.find(signed.key_id)
    if key is None:
        shown = signed.shown_key_id()
        raise AuditChainError(
            0,
            CHECKPOINT_UNPINNED_KEY,
            f"{CHECKPOINT_UNPINNED_KEY}: {where} is signed by key {shown}, which is not pinned "
            f"(pinned: {', '.join(trusted.key_ids)}): a checkpoint of another key server, or "
            "a forged one; check --keyserver-pubkey",
        )
    try:
        ed25519_verify(key.raw, signed.signature, _SIGNING_CONTEXT + signed.payload)
        checkpoint = AuditCheckpoint.from_payload(signed.payload)
    except (BadSignature, ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise AuditChainError(
            0,
            CHECKPOINT_INVALID,
            f"{CHECKPOINT_INVALID}: {where} does not verify under the pinned key server key "
            f"{key.key_id} (forged or altered)",
        ) from exc
    if checkpoint.signing_key_id != key.key_id:
        raise AuditChainError(
            0,
            CHECKPOINT_INVALID,
            f"{CHECKPOINT_INVALID}: {where} names another signing key in its payload",
        )
    return checkpoint


def read_checkpoints(lines: Iterable[str], *, name: str) -> Iterator[tuple[str, SignedCheckpoint]]:
    """Parse saved checkpoints: ``(where, checkpoint)`` for each one in ``lines``, a JSON Lines
    file of them (``admin audit checkpoint -o``) or a key server's JSON log (``--log-format
    json``), whose periodic ``audit checkpoint`` records carry one each (its other records are
    skipped). Anything else, or no checkpoint at all, is an :class:`AuditError`."""
    found = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name} line {number}"
        try:
            document = json.loads(line)
        except ValueError as exc:
            raise AuditError(f"{where} is not an audit checkpoint: not JSON") from exc
        if isinstance(document, dict) and document.keys() >= _LOG_RECORD:
            if _LOGGED_CHECKPOINT not in document:
                continue  # another log record
            document = document[_LOGGED_CHECKPOINT]
        try:
            signed = SignedCheckpoint.model_validate(document)
        except ValidationError as exc:
            raise AuditError(
                f"{where} is not an audit checkpoint: {exc.errors()[0]['msg']}"
            ) from exc
        found += 1
        yield where, signed
    if not found:
        raise AuditError(
            f"{name} holds no audit checkpoint (expected the lines `sealtorch admin audit "
            "checkpoint -o` appends, or a key server's JSON log with `audit checkpoint` records)"
        )


def check_log_against(
    hashes: Mapping[int, str], *, last_seq: int, checkpoint: AuditCheckpoint, where: str
) -> None:
    """Return if a verified chain (``hashes``: seq -> hash, ending at ``last_seq``) still holds
    the checkpointed record; else :class:`AuditChainError` (``audit_rolled_back``,
    ``audit_rewritten``)."""
    if checkpoint.seq > last_seq:
        raise AuditChainError(
            last_seq + 1,
            AUDIT_ROLLED_BACK,
            f"{AUDIT_ROLLED_BACK}: the audit log ends at record {last_seq}, but "
            f"{checkpoint.describe()} ({where}) was signed when it reached record "
            f"{checkpoint.seq}: records {last_seq + 1}..{checkpoint.seq} were deleted and the "
            "head rewritten (the log was rolled back)",
        )
    found = GENESIS_HASH if checkpoint.seq == 0 else hashes.get(checkpoint.seq)
    if found != checkpoint.head_hash:
        raise AuditChainError(
            checkpoint.seq,
            AUDIT_REWRITTEN,
            f"{AUDIT_REWRITTEN}: audit record {checkpoint.seq} has hash {str(found)[:16]}..., "
            f"but {checkpoint.describe()} ({where}) signed {checkpoint.head_hash[:16]}...: the "
            "log was rewritten at or before this record",
        )
