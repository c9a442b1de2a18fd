"""AES-256-GCM under a key held in process memory, for wrapping data keys (file master key).

The file master key provider (``sealtorch.keyserver.masterkey``) derives a wrapping key from the
master secret with HKDF-SHA256 and seals each data key with a fresh random 96-bit nonce. Data
keys are wrapped rarely (creation, rotation, import), so random nonces stay far below the 2**32
messages per key that AES-GCM's nonce-collision bound allows.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealtorch.errors import IntegrityError

__all__ = ["NONCE_SIZE", "TAG_SIZE", "GcmKey", "hkdf_sha256"]

NONCE_SIZE = 12
TAG_SIZE = 16


def hkdf_sha256(
    secret: bytes, *, info: bytes, length: int = 32, salt: bytes | None = None
) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


class GcmKey:
    """A 256-bit AES-GCM key. Never shown in ``repr``; cannot be pickled or copied."""

    __slots__ = ("_aead", "_fingerprint")

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("an AES-256-GCM key is 32 bytes")
        self._aead = AESGCM(bytes(key))
        self._fingerprint = hashlib.sha256(b"sealtorch/v1/gcm-key-id\x00" + key).hexdigest()[:16]

    @classmethod
    def derive(cls, secret: bytes, *, info: bytes) -> GcmKey:
        """The key HKDF-SHA256 derives from ``secret`` for the purpose named by ``info``."""
        return cls(hkdf_sha256(secret, info=info))

    def seal(self, plaintext: bytes, *, aad: bytes) -> bytes:
        """``nonce || ciphertext || tag`` with a fresh random nonce."""
        nonce = secrets.token_bytes(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, bytes(plaintext), bytes(aad))

    def open(self, blob: bytes, *, aad: bytes, message: str) -> bytes:
        """Inverse of :meth:`seal`; any failure raises :class:`IntegrityError` with ``message``."""
        if len(blob) < NONCE_SIZE + TAG_SIZE:
            raise IntegrityError(message)
        try:
            return self._aead.decrypt(bytes(blob[:NONCE_SIZE]), bytes(blob[NONCE_SIZE:]), aad)
        except InvalidTag as exc:
            raise IntegrityError(message) from exc

    def __repr__(self) -> str:
        return f"GcmKey(<redacted>, id={self._fingerprint})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("keys cannot be pickled")
