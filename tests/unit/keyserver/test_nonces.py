"""Challenge nonces minted without a database write (sealtorch.keyserver.nonces), attacked from
the client's side: another key's nonce, any flipped byte, a pushed expiry, a cut or padded
nonce — none has an expiry (so every one is refused as ``nonce_invalid``)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import pytest

from sealtorch._release import NONCE_SIZE
from sealtorch.keyserver.nonces import NonceMinter

NOW = datetime(2026, 12, 7, 12, 0, 0, 123456, tzinfo=UTC)


def test_a_nonce_carries_its_expiry_to_the_microsecond() -> None:
    minter = NonceMinter(secrets.token_bytes(32))
    nonce, expires_at = minter.issue(now=NOW, ttl=timedelta(seconds=60))
    assert len(nonce) == NONCE_SIZE
    assert expires_at == NOW + timedelta(seconds=60)
    assert minter.expiry(nonce) == expires_at
    again, _ = minter.issue(now=NOW, ttl=timedelta(seconds=60))
    assert again != nonce  # same expiry, fresh random part


def test_nonces_of_another_key_are_not_ours() -> None:
    ours, theirs = NonceMinter(secrets.token_bytes(32)), NonceMinter(secrets.token_bytes(32))
    nonce, _ = theirs.issue(now=NOW, ttl=timedelta(seconds=60))
    assert ours.expiry(nonce) is None


def test_every_edited_byte_is_caught() -> None:
    minter = NonceMinter(secrets.token_bytes(32))
    nonce, _ = minter.issue(now=NOW, ttl=timedelta(seconds=60))
    for index in range(len(nonce)):
        edited = bytearray(nonce)
        edited[index] ^= 0x01
        assert minter.expiry(bytes(edited)) is None, index


def test_a_later_expiry_cannot_be_written_in() -> None:
    minter = NonceMinter(secrets.token_bytes(32))
    nonce, _ = minter.issue(now=NOW, ttl=timedelta(seconds=60))
    micros = int.from_bytes(nonce[:8], "big") + 86_400_000_000
    assert minter.expiry(micros.to_bytes(8, "big") + nonce[8:]) is None


@pytest.mark.parametrize("length", [0, 8, 16, 31, 33, 64])
def test_cut_or_padded_nonces_are_refused(length: int) -> None:
    minter = NonceMinter(secrets.token_bytes(32))
    nonce, _ = minter.issue(now=NOW, ttl=timedelta(seconds=60))
    candidate = (nonce + secrets.token_bytes(64))[:length]
    assert minter.expiry(candidate) is None


def test_the_key_is_32_bytes_and_never_shown() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        NonceMinter(b"short")
    key = secrets.token_bytes(32)
    assert key.hex() not in repr(NonceMinter(key))
