"""The release statement: the key server's signature on every key it grants (``docs/protocol.md``).

HPKE base mode authenticates no sender, so a sealed key alone proves nothing about where it came
from: whoever answers at an enclave's key URL (the cloud host owns the network, the ports and
the sockets) could seal a key of its own. So the key server signs, for every key it grants (on
release and on renewal), a statement that binds the key to its origin, and every enclave-side
consumer verifies it under a key server public key *pinned in its measured configuration*
(``--keyserver-pubkey``) before it uses the key.

Contract (version 1):

* **Public keys** are Ed25519 (RFC 8032), written in one text form,
  ``sealtorch-release-key-v1:<base64url of the 32-byte public key, no padding>``; their *key
  id* is the first 16 bytes, in hex, of SHA-256(``"sealtorch/v1/release-signing-key\\0"`` ‖ the
  32 bytes).
* **The payload** is canonical JSON (keys sorted, separators ``,`` and ``:``, ASCII only) of::

      {"hpke_public_key": b64url, "hpke_suite": str, "issued_at": time, "key_commitment": hex,
       "key_version": int, "lease_expires_at": time, "model_id": str, "policy_digest": hex,
       "request_id": str, "signing_key_id": hex, "type": "sealtorch.release-statement",
       "version": 1}

  (times RFC 3339 UTC with microseconds and ``Z``).
* **The key commitment** is SHA-256 (hex) of ``"sealtorch/v1/key-commitment\\0"`` ‖ the model
  id's UTF-8 length (2 bytes, big endian) ‖ the model id ‖ the key version (4 bytes, big
  endian) ‖ the 32-byte data key. It identifies the key without revealing it (a data key is 256
  random bits).
* **The signature** is Ed25519 over ``"sealtorch/v1/release-statement\\0"`` ‖ the payload bytes,
  as sent (base64url on the wire, :class:`SignedStatement`).

:func:`issue_statement` is the key server's side; :class:`TrustedReleaseKeys` (the pins)
verifies a signed statement and :meth:`ReleaseStatement.check_key` checks it against the key it
came with. What each party checks is in ``docs/protocol.md``.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Protocol

from pydantic import Field

from sealtorch._crypto.sign import BadSignature, ed25519_check_public_key, ed25519_verify
from sealtorch.errors import ConfigError, ReleaseStatementError
from sealtorch.protocol._wire import (
    MODEL_ID_RE,
    B64Bytes,
    WireModel,
    as_utc,
    b64decode,
    b64encode,
)

__all__ = [
    "KEY_COMMITMENT_MISMATCH",
    "RELEASE_KEY_PREFIX",
    "STATEMENT_INVALID",
    "STATEMENT_MISMATCH",
    "STATEMENT_MISSING",
    "STATEMENT_TYPE",
    "STATEMENT_UNPINNED_KEY",
    "STATEMENT_VERSION",
    "ReleasePublicKey",
    "ReleaseStatement",
    "SignedPayload",
    "SignedStatement",
    "StatementSigner",
    "TrustedReleaseKeys",
    "canonical_payload",
    "issue_statement",
    "key_commitment",
    "parse_payload_time",
    "payload_time",
    "release_key_id",
]

#: Text form of a key server's release-signing public key.
RELEASE_KEY_PREFIX: Final = "sealtorch-release-key-v1:"
STATEMENT_TYPE: Final = "sealtorch.release-statement"
STATEMENT_VERSION: Final = 1

#: Reason codes of :class:`~sealtorch.errors.ReleaseStatementError` (``docs/protocol.md``).
STATEMENT_MISSING: Final = "statement_missing"
STATEMENT_UNPINNED_KEY: Final = "statement_unpinned_key"
STATEMENT_INVALID: Final = "statement_invalid"
STATEMENT_MISMATCH: Final = "statement_mismatch"
KEY_COMMITMENT_MISMATCH: Final = "key_commitment_mismatch"

_SIGNING_CONTEXT: Final = b"sealtorch/v1/release-statement\x00"
_COMMITMENT_TAG: Final = b"sealtorch/v1/key-commitment\x00"
_KEY_ID_TAG: Final = b"sealtorch/v1/release-signing-key\x00"
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_KEY_ID: Final = re.compile(r"[0-9a-f]{32}")
_FIELDS: Final = frozenset(
    {
        "hpke_public_key",
        "hpke_suite",
        "issued_at",
        "key_commitment",
        "key_version",
        "lease_expires_at",
        "model_id",
        "policy_digest",
        "request_id",
        "signing_key_id",
        "type",
        "version",
    }
)
_NUMBERS: Final = frozenset({"key_version", "version"})
_SHOW_KEY: Final = (
    "`sealtorch keyserver signing-key show DATA_DIR` on the key server prints it; pin it with "
    "--keyserver-pubkey"
)


def release_key_id(public_key: bytes) -> str:
    """The key id of a 32-byte release-signing public key (32 hex digits)."""
    return hashlib.sha256(_KEY_ID_TAG + public_key).digest()[:16].hex()


def key_commitment(*, model_id: str, key_version: int, key: bytes) -> str:
    """SHA-256 (hex) commitment to one data key version (see the module docstring)."""
    raw = model_id.encode("utf-8")
    if len(raw) > 0xFFFF or not 1 <= key_version < 1 << 32:
        raise ValueError("model id or key version out of range")
    body = _COMMITMENT_TAG + struct.pack(">H", len(raw)) + raw + struct.pack(">I", key_version)
    return hashlib.sha256(body + key).hexdigest()


def payload_time(value: datetime) -> str:
    """RFC 3339 UTC with microseconds and ``Z`` (``%Y-%m-%dT%H:%M:%S.%fZ``, without strftime's
    cost)."""
    return as_utc(value).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


_ENCODER: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical_payload(document: dict[str, Any]) -> bytes:
    """A signed payload's canonical JSON: sorted keys, no whitespace, ASCII."""
    return _ENCODER.encode(document).encode("ascii")


# -- public keys -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReleasePublicKey:
    """A key server's release-signing public key (Ed25519, 32 bytes)."""

    raw: bytes

    def __post_init__(self) -> None:
        try:
            ed25519_check_public_key(self.raw)
        except BadSignature as exc:
            raise ConfigError(f"not a release-signing public key: {exc}") from exc

    @classmethod
    def parse(cls, text: str) -> ReleasePublicKey:
        """A key from its text form (``sealtorch-release-key-v1:...``); ConfigError otherwise."""
        stripped = text.strip()
        if not stripped.startswith(RELEASE_KEY_PREFIX):
            raise ConfigError(
                f"{stripped[:40]!r} is not a key server release-signing public key: it must "
                f"start with {RELEASE_KEY_PREFIX!r} ({_SHOW_KEY})"
            )
        try:
            raw = b64decode(stripped[len(RELEASE_KEY_PREFIX) :])
        except ValueError as exc:
            raise ConfigError(
                f"release-signing public key {stripped[:40]!r}... is damaged ({exc}); copy it "
                f"again ({_SHOW_KEY})"
            ) from exc
        if len(raw) != 32:
            raise ConfigError(
                f"release-signing public key {stripped[:40]!r}... is damaged (wrong length); "
                f"copy it again ({_SHOW_KEY})"
            )
        return cls(raw)

    @property
    def key_id(self) -> str:
        return release_key_id(self.raw)

    @property
    def text(self) -> str:
        return RELEASE_KEY_PREFIX + b64encode(self.raw)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"ReleasePublicKey({self.text!r}, key_id={self.key_id!r})"


# -- the statement -----------------------------------------------------------------------------


class SignedPayload(WireModel):
    """What the release-signing key signs, on the wire: the canonical JSON payload exactly as
    signed, the Ed25519 signature over a context string ‖ the payload, and the signing key's
    id. Release statements and audit checkpoints (:mod:`sealtorch.protocol.checkpoint`) are
    this envelope, each with its own context and payload size."""

    payload: Annotated[B64Bytes, Field(min_length=1, max_length=4096)]
    signature: Annotated[B64Bytes, Field(min_length=1, max_length=512)]
    key_id: Annotated[str, Field(min_length=1, max_length=128)]

    def shown_key_id(self) -> str:
        """The key id for a message: as sent when it is one, else ``(malformed id)``."""
        return self.key_id if _KEY_ID.fullmatch(self.key_id) else "(malformed id)"


class SignedStatement(SignedPayload):
    """A release statement on the wire: payload bytes, signature, signing key id."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseStatement:
    """The verified content of a release statement (see the module docstring)."""

    model_id: str
    key_version: int
    key_commitment: str
    policy_digest: str
    lease_expires_at: datetime
    #: The HPKE suite and public key of the enclave the key server released the key to.
    hpke_suite: str
    hpke_public_key: bytes
    request_id: str
    issued_at: datetime
    signing_key_id: str

    def payload(self) -> bytes:
        """The canonical JSON payload."""
        return canonical_payload(
            {
                "hpke_public_key": b64encode(self.hpke_public_key),
                "hpke_suite": self.hpke_suite,
                "issued_at": payload_time(self.issued_at),
                "key_commitment": self.key_commitment,
                "key_version": self.key_version,
                "lease_expires_at": payload_time(self.lease_expires_at),
                "model_id": self.model_id,
                "policy_digest": self.policy_digest,
                "request_id": self.request_id,
                "signing_key_id": self.signing_key_id,
                "type": STATEMENT_TYPE,
                "version": STATEMENT_VERSION,
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes) -> ReleaseStatement:
        """Parse a payload; ValueError unless it is exactly a canonical version 1 payload."""
        document = json.loads(payload)
        if not isinstance(document, dict) or set(document) != _FIELDS:
            raise ValueError("the payload does not have the statement's fields")
        if document["type"] != STATEMENT_TYPE or document["version"] != STATEMENT_VERSION:
            raise ValueError("not a version 1 release statement")
        if not all(isinstance(document[name], str) for name in _FIELDS - _NUMBERS):
            raise ValueError("a text field is not a string")
        version = document["key_version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError("key_version is not a positive integer")
        if not MODEL_ID_RE.fullmatch(document["model_id"]):
            raise ValueError("model_id is not a model id")
        if not (
            _HEX64.fullmatch(document["key_commitment"])
            and _HEX64.fullmatch(document["policy_digest"])
        ):
            raise ValueError("a digest is not 64 hex digits")
        statement = cls(
            model_id=document["model_id"],
            key_version=version,
            key_commitment=document["key_commitment"],
            policy_digest=document["policy_digest"],
            lease_expires_at=parse_payload_time(document["lease_expires_at"]),
            hpke_suite=document["hpke_suite"],
            hpke_public_key=b64decode(document["hpke_public_key"]),
            request_id=document["request_id"],
            issued_at=parse_payload_time(document["issued_at"]),
            signing_key_id=document["signing_key_id"],
        )
        if statement.payload() != payload:
            raise ValueError("the payload is not canonical JSON")
        return statement

    def addressed_to(self, *, hpke_suite: str, hpke_public_key: bytes) -> bool:
        """Whether the key server released this key to that HPKE key (else it was forwarded,
        by a key cache the key server released it to)."""
        return self.hpke_suite == hpke_suite and self.hpke_public_key == hpke_public_key

    def check_key(
        self, *, model_id: str, key_version: int, policy_digest: str, key: bytes, source: str
    ) -> None:
        """Return if this statement is about ``key``, the key of ``model_id`` at
        ``key_version`` governed by the policy with ``policy_digest``; else raise
        :class:`~sealtorch.errors.ReleaseStatementError` (``statement_mismatch``,
        ``key_commitment_mismatch``). ``source`` names the sender in messages."""
        what = f"{model_id!r} v{key_version}"
        for name, theirs, ours in (
            ("model id", self.model_id, model_id),
            ("key version", self.key_version, key_version),
            ("policy digest", self.policy_digest, policy_digest),
        ):
            if theirs != ours:
                raise ReleaseStatementError(
                    STATEMENT_MISMATCH,
                    f"{source} sent the key of {what} with the key server's statement about "
                    f"another {name} ({theirs}): a statement replayed from another release; "
                    "the key is refused (check that this key source is your key cache or key "
                    "server)",
                )
        expected = key_commitment(model_id=model_id, key_version=key_version, key=key)
        if expected != self.key_commitment:
            raise ReleaseStatementError(
                KEY_COMMITMENT_MISMATCH,
                f"{source} sent a key for {what} that is not the key the key server's "
                "statement commits to: the key source substituted a key of its own; the key "
                "is refused (check that this key source is your key cache or key server)",
            )


def parse_payload_time(value: Any) -> datetime:
    """A payload time; any other spelling than :func:`payload_time`'s is refused by the
    canonical check of each payload parser (it re-encodes the payload)."""
    if not isinstance(value, str) or not value.endswith("Z"):
        raise ValueError("a time is not RFC 3339 UTC")
    return as_utc(datetime.fromisoformat(value))


# -- signing (the key server) ------------------------------------------------------------------


class StatementSigner(Protocol):
    """Signs release statements: the key server's release-signing key."""

    @property
    def key_id(self) -> str: ...

    def sign(self, message: bytes) -> bytes: ...


def issue_statement(
    signer: StatementSigner,
    *,
    model_id: str,
    key_version: int,
    key: bytes,
    policy_digest: str,
    lease_expires_at: datetime,
    hpke_suite: str,
    hpke_public_key: bytes,
    request_id: str,
    issued_at: datetime,
) -> SignedStatement:
    """The signed statement for one granted key (the key server calls this after its audit
    record committed, for every key it releases or renews)."""
    key_id = signer.key_id
    payload = ReleaseStatement(
        model_id=model_id,
        key_version=key_version,
        key_commitment=key_commitment(model_id=model_id, key_version=key_version, key=key),
        policy_digest=policy_digest,
        lease_expires_at=lease_expires_at,
        hpke_suite=hpke_suite,
        hpke_public_key=hpke_public_key,
        request_id=request_id,
        issued_at=issued_at,
        signing_key_id=key_id,
    ).payload()
    signature = signer.sign(_SIGNING_CONTEXT + payload)
    # Built here from values just made: no validation needed (and the release path is hot).
    return SignedStatement.model_construct(payload=payload, signature=signature, key_id=key_id)


# -- verifying (enclaves, key caches) ----------------------------------------------------------


class TrustedReleaseKeys:
    """The key server release-signing keys an enclave pins (one, or two during a rollover).

    Built from the measured configuration (``--keyserver-pubkey``); refuses to exist empty, so
    there is no unpinned mode.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[ReleasePublicKey | str]) -> None:
        parsed = [k if isinstance(k, ReleasePublicKey) else ReleasePublicKey.parse(k) for k in keys]
        if not parsed:
            raise ConfigError(
                "no key server release-signing public key is pinned, so no released key could "
                f"be trusted: {_SHOW_KEY} (Python: trusted_release_keys=[...])"
            )
        self._keys = {key.key_id: key for key in parsed}

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    @property
    def keys(self) -> tuple[ReleasePublicKey, ...]:
        return tuple(self._keys[key_id] for key_id in self.key_ids)

    def __repr__(self) -> str:
        return f"TrustedReleaseKeys(key_ids={list(self.key_ids)!r})"

    def find(self, key_id: str) -> ReleasePublicKey | None:
        """The pinned key with ``key_id``, or None."""
        return self._keys.get(key_id)

    def verify(self, signed: SignedStatement, *, what: str, source: str) -> ReleaseStatement:
        """The statement, if ``signed`` verifies under a pinned key; else
        :class:`~sealtorch.errors.ReleaseStatementError` (``statement_unpinned_key``,
        ``statement_invalid``). ``what`` names the key, ``source`` the sender, in messages."""
        key = self._keys.get(signed.key_id)
        if key is None:
            shown = signed.shown_key_id()
            raise ReleaseStatementError(
                STATEMENT_UNPINNED_KEY,
                f"{source} sent {what} with a statement signed by key {shown}, which is not "
                f"pinned here (pinned: {', '.join(self.key_ids)}); the key is refused: check "
                f"--keyserver-pubkey ({_SHOW_KEY})",
            )
        try:
            ed25519_verify(key.raw, signed.signature, _SIGNING_CONTEXT + signed.payload)
            statement = ReleaseStatement.from_payload(signed.payload)
        except (BadSignature, ValueError, UnicodeDecodeError, binascii.Error) as exc:
            raise ReleaseStatementError(
                STATEMENT_INVALID,
                f"{source} sent {what} with a statement that does not verify under the pinned "
                f"key server key {key.key_id} (forged or altered); the key is refused: check "
                "that this key source is your key cache or key server",
            ) from exc
        if statement.signing_key_id != key.key_id:
            raise ReleaseStatementError(
                STATEMENT_INVALID,
                f"{source} sent {what} with a statement whose payload names another signing "
                "key; the key is refused",
            )
        return statement
