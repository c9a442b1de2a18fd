"""Bearer tokens: format, digests at rest, and authentication against a real (SQLite) store."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from _fixtures.clock import FakeClock
from _fixtures.keystore import admin_entry
from sealtorch.keyserver.store import Store, open_store, sqlite_url
from sealtorch.keyserver.tokens import (
    InvalidTokenError,
    IssuedToken,
    TokenKind,
    authenticate_admin,
    authenticate_session,
    issue_token,
    parse_token,
    token_digest,
)
from sealtorch.protocol.admin import ADMIN_SCOPES


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    opened = open_store(sqlite_url(tmp_path / "keys.db"), clock=clock)
    opened.migrate()
    yield opened
    opened.close()


def _admin(store: Store, clock: FakeClock, **kwargs: object) -> IssuedToken:
    issued = issue_token(TokenKind.ADMIN)
    with store.transaction() as tx:
        tx.create_admin_token(
            token_id=issued.token_id,
            digest=issued.digest,
            name="ops",
            scopes=ADMIN_SCOPES,
            **kwargs,  # type: ignore[arg-type]
        )
        tx.append_audit(admin_entry("token.create"))
    return issued


def _session(store: Store, clock: FakeClock) -> IssuedToken:
    issued = issue_token(TokenKind.SESSION)
    with store.transaction() as tx:
        tx.create_session(
            token_id=issued.token_id,
            digest=issued.digest,
            hpke_suite="DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM",
            public_key=b"\x01" * 32,
            claims_json="{}",
            evidence_digest=None,
            model_ids=None,
            expires_at=clock.now + timedelta(minutes=5),
        )
        tx.append_audit(admin_entry("session.create"))
    return issued


def test_token_format_and_entropy() -> None:
    issued = issue_token(TokenKind.ADMIN)
    prefix, rest = issued.token.split("_", 1)
    token_id, secret = rest.split(".", 1)
    assert prefix == "sta"
    assert token_id == issued.token_id
    assert len(token_id) == 16
    assert len(secret) == 43  # 256 bits
    assert parse_token(TokenKind.ADMIN, issued.token)[0] == issued.token_id
    tokens = {issue_token(TokenKind.SESSION).token for _ in range(200)}
    assert len(tokens) == 200
    assert all(t.startswith("sts_") for t in tokens)


def test_digest_is_domain_separated() -> None:
    issued = issue_token(TokenKind.ADMIN)
    _, secret = parse_token(TokenKind.ADMIN, issued.token)
    assert issued.digest == token_digest(TokenKind.ADMIN, issued.token_id, secret)
    assert issued.digest != token_digest(TokenKind.SESSION, issued.token_id, secret)
    assert issued.digest != token_digest(TokenKind.ADMIN, "0" * 16, secret)
    assert issued.digest != hashlib.sha256(secret).digest()
    assert issued.digest != hashlib.sha256(issued.token.encode()).digest()


def test_issued_token_never_shows_its_secret() -> None:
    issued = issue_token(TokenKind.ADMIN)
    text = repr(issued) + str(issued)
    assert issued.token not in text
    assert issued.token.split(".")[1] not in text
    assert issued.digest.hex() not in text
    assert issued.token_id in text


def test_only_the_digest_is_stored(store: Store, clock: FakeClock, tmp_path: Path) -> None:
    issued = _admin(store, clock)
    secret = issued.token.split(".")[1]
    with sqlite3.connect(tmp_path / "keys.db") as conn:
        rows = conn.execute("SELECT * FROM admin_tokens").fetchall()
    dump = repr(rows).encode()
    assert secret.encode() not in dump
    assert issued.token.encode() not in dump
    assert rows[0][1] == issued.digest


def test_admin_authentication(store: Store, clock: FakeClock) -> None:
    issued = _admin(store, clock)
    record = authenticate_admin(store, issued.token, now=clock.now)
    assert record.token_id == issued.token_id


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # wrong secret
        lambda t: t.replace("sta_", "sts_"),  # a session prefix
        lambda t: "sta_" + "f" * 16 + "." + t.split(".")[1],  # unknown id, right secret
        lambda t: t + "x",
        lambda t: t[:-1],
        lambda t: "",
        lambda t: "Bearer " + t,
        lambda t: t.upper(),
        lambda t: t.replace(".", "_"),
    ],
)
def test_wrong_admin_tokens_are_refused_alike(
    store: Store, clock: FakeClock, tamper: object
) -> None:
    issued = _admin(store, clock)
    bad = tamper(issued.token)  # type: ignore[operator]
    with pytest.raises(InvalidTokenError) as info:
        authenticate_admin(store, bad, now=clock.now)
    assert str(info.value).startswith("the admin token is not valid")
    assert issued.token_id not in str(info.value)


def test_only_the_issued_spelling_of_a_secret_is_accepted(store: Store, clock: FakeClock) -> None:
    # The last of 43 base64url characters carries 2 unused bits: three other spellings decode
    # to the same secret. A token is a string; none of them is the token that was issued.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    issued = _admin(store, clock)
    index = alphabet.index(issued.token[-1])
    others = [alphabet[(index & ~3) | low] for low in range(4) if (index & ~3) | low != index]
    assert len(others) == 3
    for last in others:
        with pytest.raises(InvalidTokenError) as info:
            authenticate_admin(store, issued.token[:-1] + last, now=clock.now)
        assert info.value.reason == "malformed"
    assert authenticate_admin(store, issued.token, now=clock.now).token_id == issued.token_id


def test_revoked_and_expired_admin_tokens_are_refused(store: Store, clock: FakeClock) -> None:
    expiring = _admin(store, clock, expires_at=clock.now + timedelta(hours=1))
    assert authenticate_admin(store, expiring.token, now=clock.now)
    with pytest.raises(InvalidTokenError) as info:
        authenticate_admin(store, expiring.token, now=clock.now + timedelta(hours=1))
    assert info.value.reason == "expired"
    revoked = _admin(store, clock)
    with store.transaction() as tx:
        tx.revoke_admin_token(revoked.token_id)
        tx.append_audit(admin_entry("token.revoke"))
    with pytest.raises(InvalidTokenError) as info:
        authenticate_admin(store, revoked.token, now=clock.now)
    assert info.value.reason == "revoked"
    assert str(info.value) == str(InvalidTokenError(TokenKind.ADMIN, "other"))


def test_admin_token_cannot_open_a_session_and_vice_versa(store: Store, clock: FakeClock) -> None:
    admin = _admin(store, clock)
    session = _session(store, clock)
    with pytest.raises(InvalidTokenError):
        authenticate_session(store, admin.token, now=clock.now)
    with pytest.raises(InvalidTokenError):
        authenticate_admin(store, session.token, now=clock.now)
    forged = "sta_" + session.token[4:]  # the session's id and secret under the admin prefix
    with pytest.raises(InvalidTokenError):
        authenticate_admin(store, forged, now=clock.now)


def test_session_authentication_and_expiry(store: Store, clock: FakeClock) -> None:
    issued = _session(store, clock)
    record = authenticate_session(store, issued.token, now=clock.now)
    assert record.public_key == b"\x01" * 32
    with pytest.raises(InvalidTokenError, match="attest again") as info:
        authenticate_session(store, issued.token, now=clock.now + timedelta(minutes=5))
    assert info.value.reason == "expired"
    with store.transaction() as tx:
        tx.revoke_session(issued.token_id)
        tx.append_audit(admin_entry("session.revoke"))
    with pytest.raises(InvalidTokenError) as info:
        authenticate_session(store, issued.token, now=clock.now)
    assert info.value.reason == "revoked"
