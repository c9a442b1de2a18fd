"""Wrapping a file's content key (CEK) under a model data key (DEK), see ``docs/format.md``.

``W = HKDF-SHA256(ikm=DEK, salt=key.salt, info=WRAP_INFO, L=32)`` and
``wrapped_cek = AES-256-GCM(W, key.nonce, CEK, aad)``; the caller supplies the associated data
(the canonical JSON of body digest, key version and model id).
"""

from __future__ import annotations

import secrets
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealtorch._crypto.stream import CEK_SIZE, TAG_SIZE
from sealtorch.errors import IntegrityError

__all__ = [
    "WRAPPED_CEK_SIZE",
    "WRAP_INFO",
    "WRAP_NONCE_SIZE",
    "WRAP_SALT_SIZE",
    "new_wrap_nonce",
    "new_wrap_salt",
    "unwrap_cek",
    "wrap_cek",
]

WRAP_INFO: Final = b"sealtorch/v1/wrap\x00"
WRAP_SALT_SIZE: Final = 32
WRAP_NONCE_SIZE: Final = 12
WRAPPED_CEK_SIZE: Final = CEK_SIZE + TAG_SIZE


def new_wrap_salt() -> bytes:
    return secrets.token_bytes(WRAP_SALT_SIZE)


def new_wrap_nonce() -> bytes:
    return secrets.token_bytes(WRAP_NONCE_SIZE)


def _wrapping_key(dek: bytes, salt: bytes) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=WRAP_INFO).derive(dek)
    return AESGCM(key)


def wrap_cek(dek: bytes, *, salt: bytes, nonce: bytes, cek: bytes, aad: bytes) -> bytes:
    """Encrypt ``cek`` under ``dek``; returns the 48-byte wrapped key (ciphertext ‖ tag)."""
    if len(cek) != CEK_SIZE or len(salt) != WRAP_SALT_SIZE or len(nonce) != WRAP_NONCE_SIZE:
        raise ValueError("wrap_cek: wrong CEK, salt or nonce length")
    return _wrapping_key(dek, salt).encrypt(nonce, cek, aad)


def unwrap_cek(dek: bytes, *, salt: bytes, nonce: bytes, wrapped: bytes, aad: bytes) -> bytes:
    """Recover the CEK; any mismatch (key, salt, nonce, aad, wrapped bytes) is IntegrityError."""
    if (
        len(wrapped) != WRAPPED_CEK_SIZE
        or len(salt) != WRAP_SALT_SIZE
        or len(nonce) != WRAP_NONCE_SIZE
    ):
        raise IntegrityError()
    try:
        return _wrapping_key(dek, salt).decrypt(nonce, wrapped, aad)
    except InvalidTag as exc:
        raise IntegrityError() from exc
