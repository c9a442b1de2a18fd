"""Bearer tokens: admin tokens and renewal-session tokens.

A token is ``<prefix>_<token id>.<secret>``: ``sta_`` for admin tokens, ``sts_`` for renewal
sessions; the token id is 16 hex characters (public: it names the token in listings, audit
records and revocations); the secret is 32 random bytes in base64url (43 characters).

Only a digest is stored: ``SHA-256("sealtorch/v1/token" 0 kind 0 token_id 0 secret)``. A plain
(fast) hash is the right tool here, unlike for passwords: the secret is 256 bits from the OS
CSPRNG, so no amount of guessing finds a preimage and a slow KDF (bcrypt/argon2) would only add
CPU cost to every request. The domain tag, kind and id in the hash mean a stored digest is
useless for any other token row or token kind. Verification compares digests with
``hmac.compare_digest`` and does the same work whether or not the token id exists, so timing
reveals neither which ids exist nor how much of a secret matched.

Every way a presented token can be wrong (malformed, unknown id, wrong secret, revoked, expired)
raises the same :class:`InvalidTokenError` message; ``reason`` says which, for logs only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from sealtorch.errors import Error
from sealtorch.keyserver.records import AdminTokenRecord, SessionRecord, utc

__all__ = [
    "InvalidTokenError",
    "IssuedToken",
    "TokenKind",
    "authenticate_admin",
    "authenticate_session",
    "issue_token",
    "parse_token",
    "token_digest",
]

_SECRET_BYTES = 32
_TOKEN_ID = re.compile(r"^[0-9a-f]{16}$")
_SHAPE = re.compile(r"^(st[as])_([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")
_DUMMY_DIGEST = hashlib.sha256(b"sealtorch/v1/token/no-such-token").digest()


class TokenKind(StrEnum):
    ADMIN = "sta"
    SESSION = "sts"


class InvalidTokenError(Error):
    """A presented bearer token is not valid (HTTP: 403). ``reason`` is for logs only."""

    def __init__(self, kind: TokenKind, reason: str) -> None:
        what = "admin token" if kind is TokenKind.ADMIN else "session token"
        super().__init__(
            f"the {what} is not valid (unknown, revoked or expired); "
            + (
                "ask an administrator for a valid token"
                if kind is TokenKind.ADMIN
                else "attest again to get a new session"
            )
        )
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class IssuedToken:
    """A newly issued token: show :attr:`token` to its holder once; store only the digest."""

    kind: TokenKind
    token_id: str
    token: str = field(repr=False)
    digest: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"IssuedToken({self.kind.name}, token_id={self.token_id!r}, <redacted>)"


def token_digest(kind: TokenKind, token_id: str, secret: bytes) -> bytes:
    """The stored digest of a token (see the module docstring)."""
    if not _TOKEN_ID.fullmatch(token_id):
        raise ValueError("a token id is 16 lowercase hex characters")
    message = b"\x00".join(
        [b"sealtorch/v1/token", kind.value.encode(), token_id.encode(), bytes(secret)]
    )
    return hashlib.sha256(message).digest()


def issue_token(kind: TokenKind) -> IssuedToken:
    """A fresh random token of ``kind``."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_bytes(_SECRET_BYTES)
    text = f"{kind.value}_{token_id}." + base64.urlsafe_b64encode(secret).decode().rstrip("=")
    return IssuedToken(
        kind=kind, token_id=token_id, token=text, digest=token_digest(kind, token_id, secret)
    )


def parse_token(kind: TokenKind, presented: str) -> tuple[str, bytes]:
    """``(token_id, secret)`` of a well-formed token of ``kind``, else InvalidTokenError."""
    match = _SHAPE.fullmatch(presented)
    if match is None or match.group(1) != kind.value:
        raise InvalidTokenError(kind, "malformed")
    try:
        secret = base64.urlsafe_b64decode(match.group(3) + "=")
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - the regex prevents it
        raise InvalidTokenError(kind, "malformed") from exc
    if len(secret) != _SECRET_BYTES:  # pragma: no cover - 43 base64url chars are 32 bytes
        raise InvalidTokenError(kind, "malformed")
    # 43 base64url characters carry 258 bits: the last one has 2 unused bits, so four
    # spellings decode to the same secret. Only the one we issue is a token.
    if base64.urlsafe_b64encode(secret)[:-1].decode("ascii") != match.group(3):
        raise InvalidTokenError(kind, "malformed")
    return match.group(2), secret


def _check_digest(kind: TokenKind, token_id: str, secret: bytes, stored: bytes | None) -> None:
    presented = token_digest(kind, token_id, secret)
    expected = stored if stored is not None else _DUMMY_DIGEST
    matches = hmac.compare_digest(presented, expected)
    if stored is None:
        raise InvalidTokenError(kind, "unknown")
    if not matches:
        raise InvalidTokenError(kind, "wrong_secret")


class AdminTokenSource(Protocol):
    def get_admin_token(self, token_id: str) -> AdminTokenRecord | None: ...
    def admin_token_digest(self, token_id: str) -> bytes | None: ...


class SessionSource(Protocol):
    def get_session(self, token_id: str) -> SessionRecord | None: ...
    def session_digest(self, token_id: str) -> bytes | None: ...


def authenticate_admin(
    store: AdminTokenSource, presented: str, *, now: datetime
) -> AdminTokenRecord:
    """The admin token record for ``presented``, or :class:`InvalidTokenError`."""
    token_id, secret = parse_token(TokenKind.ADMIN, presented)
    _check_digest(TokenKind.ADMIN, token_id, secret, store.admin_token_digest(token_id))
    record = store.get_admin_token(token_id)
    if record is None:  # deleted between the two reads
        raise InvalidTokenError(TokenKind.ADMIN, "unknown")
    if record.revoked_at is not None:
        raise InvalidTokenError(TokenKind.ADMIN, "revoked")
    if not record.usable_at(utc(now)):
        raise InvalidTokenError(TokenKind.ADMIN, "expired")
    return record


def authenticate_session(store: SessionSource, presented: str, *, now: datetime) -> SessionRecord:
    """The renewal session for ``presented``, or :class:`InvalidTokenError`.

    The caller must still check that the request's HPKE public key is the session's.
    """
    token_id, secret = parse_token(TokenKind.SESSION, presented)
    _check_digest(TokenKind.SESSION, token_id, secret, store.session_digest(token_id))
    record = store.get_session(token_id)
    if record is None:
        raise InvalidTokenError(TokenKind.SESSION, "unknown")
    if record.revoked_at is not None:
        raise InvalidTokenError(TokenKind.SESSION, "revoked")
    if not record.usable_at(utc(now)):
        raise InvalidTokenError(TokenKind.SESSION, "expired")
    return record
