"""Challenge nonces issued without a database write.

A challenge used to insert its nonce into the store and the release delete it: two writes and a
commit on the challenge's path for a value that only has to be *unforgeable*, *fresh* and
*used once*. Now a nonce carries its own proof (32 bytes, :data:`~sealtorch._release.NONCE_SIZE`):

* its expiry, microseconds since the epoch (8 bytes, big-endian);
* 8 random bytes, so that two nonces with one expiry differ;
* a 16-byte MAC over both: keyed BLAKE2b (RFC 7693's keyed mode, a MAC by design; no OpenSSL
  call, so no GIL hand-off on the event loop) under the store's *nonce key*, personalised for
  this use.

Unforgeable: without the nonce key nobody can make a nonce the key server accepts, nor learn
one before the key server issues it (an enclave cannot pre-compute evidence for a future
challenge). Fresh: the expiry is authenticated. Used once: the release records the nonce as
spent in the same commit as its audit record (``spent_nonces``, keyed by the nonce, across every
replica of the store); a second release with it finds the row and is refused. Rows go once their
nonce has expired (the purge task): an expired nonce is refused whatever the table says.

The nonce key is 32 random bytes made once per store and kept in it wrapped by the master key
(:func:`load_nonce_key`), so every replica sharing the database and master key checks the
nonces of the others, and a reader of the database or of a backup cannot mint any.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final

from sealtorch.errors import ConfigError, IntegrityError
from sealtorch.keyserver.masterkey import MasterKey

__all__ = ["NONCE_KEY_AAD", "NonceMinter", "load_nonce_key"]

#: Associated data of the wrapped nonce key (distinct from every model key's ``wrap_aad``).
NONCE_KEY_AAD: Final = b"sealtorch/v1/challenge-nonce-key\x00"
_PERSON: Final = b"sealtorch-nonce1"  # BLAKE2b personalisation: 16 bytes
_KEY_SIZE: Final = 32
_TAG_SIZE: Final = 16
_BODY: Final = struct.Struct(">q8s")  # expiry in microseconds, random
_SIZE: Final = _BODY.size + _TAG_SIZE  # 32: the protocol's NONCE_SIZE
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class NonceMinter:
    """Issues and checks challenge nonces under one nonce key (see the module docstring)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != _KEY_SIZE:
            raise ValueError("a nonce key is 32 bytes")
        self._key = bytes(key)

    def __repr__(self) -> str:
        return "NonceMinter(<secret>)"

    def _tag(self, body: bytes) -> bytes:
        return hashlib.blake2b(body, key=self._key, digest_size=_TAG_SIZE, person=_PERSON).digest()

    def issue(self, *, now: datetime, ttl: timedelta) -> tuple[bytes, datetime]:
        """A fresh nonce and its expiry (``now + ttl``, to the microsecond)."""
        micros = (now - _EPOCH) // timedelta(microseconds=1) + ttl // timedelta(microseconds=1)
        body = _BODY.pack(micros, secrets.token_bytes(8))
        return body + self._tag(body), _EPOCH + timedelta(microseconds=micros)

    def expiry(self, nonce: bytes) -> datetime | None:
        """The expiry of a nonce this key issued; ``None`` for anything else (another store's,
        edited, truncated, made up). Says nothing about whether it was already spent."""
        if len(nonce) != _SIZE:
            return None
        body, tag = bytes(nonce[: _BODY.size]), bytes(nonce[_BODY.size :])
        if not hmac.compare_digest(tag, self._tag(body)):
            return None
        micros, _ = _BODY.unpack(body)
        return _EPOCH + timedelta(microseconds=micros)


def load_nonce_key(
    stored: Callable[[Callable[[], bytes]], bytes], master_key: MasterKey
) -> NonceMinter:
    """The store's nonce key, unwrapped: ``stored(make)`` returns the store's wrapped key,
    writing ``make()``'s the first time (:meth:`~sealtorch.keyserver.store.Store.nonce_key`).

    :class:`ConfigError` if the stored key was wrapped by another master key (a replica
    started with the wrong master key would refuse every other replica's nonces)."""

    def make() -> bytes:
        return master_key.wrap(secrets.token_bytes(_KEY_SIZE), NONCE_KEY_AAD)

    blob = stored(make)
    try:
        key = master_key.unwrap(blob, NONCE_KEY_AAD)
    except IntegrityError as exc:
        raise ConfigError(
            "the key store's challenge-nonce key does not unwrap with this master key "
            f"({master_key.key_id}): this key server was started with another master key than "
            "the one its database was made with; start it with that master key"
        ) from exc
    return NonceMinter(key.material)
