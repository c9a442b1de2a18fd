"""The chunked streaming AEAD of the sealed body (AES-256-GCM), see ``docs/format.md``.

A per-file random content key (CEK) and the body header's digest derive, through HKDF-SHA256,
the body key and a 7-byte nonce prefix. Chunk ``i`` of ``n`` is sealed with the nonce
``prefix ‖ u32be(i) ‖ last_flag`` (``last_flag`` is ``0x01`` for the final chunk, else ``0x00``),
so reordering, dropping, duplicating or truncating chunks, or moving a chunk to another file,
changes the nonce or the key and fails authentication.

This module only knows bytes. Failures raise :class:`~sealtorch.errors.IntegrityError` with its
one fixed message; the nonce/key material never appears in ``repr``.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealtorch.errors import IntegrityError

__all__ = [
    "BODY_INFO",
    "CEK_SIZE",
    "MAX_CHUNKS",
    "NONCE_PREFIX_SIZE",
    "TAG_SIZE",
    "BodyCipher",
    "chunk_nonce",
    "derive_body_key",
    "new_content_key",
    "sha256",
]

CEK_SIZE: Final = 32
TAG_SIZE: Final = 16
NONCE_PREFIX_SIZE: Final = 7
#: Chunk indices are 32-bit, so a body has at most 2**32 chunks.
MAX_CHUNKS: Final = 2**32
BODY_INFO: Final = b"sealtorch/v1/body\x00"

_INDEX_FLAG = struct.Struct(">IB")


def new_content_key() -> bytes:
    """A fresh random 256-bit content key (one per sealed file)."""
    return secrets.token_bytes(CEK_SIZE)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def derive_body_key(cek: bytes, *, salt: bytes, body_digest: bytes) -> tuple[bytes, bytes]:
    """HKDF-SHA256(ikm=CEK, salt, info=BODY_INFO ‖ body_digest, L=39) → (key 32 B, prefix 7 B)."""
    if len(cek) != CEK_SIZE:
        raise IntegrityError()
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=32 + NONCE_PREFIX_SIZE,
        salt=salt,
        info=BODY_INFO + body_digest,
    ).derive(cek)
    return okm[:32], okm[32:]


def chunk_nonce(prefix: bytes, index: int, *, last: bool) -> bytes:
    """The 12-byte nonce of chunk ``index``: ``prefix (7) ‖ u32be(index) ‖ (1 if last else 0)``."""
    return prefix + _INDEX_FLAG.pack(index, 1 if last else 0)


class BodyCipher:
    """Seals and opens the chunks of one body. Holds key material: never log or pickle it."""

    __slots__ = ("_aead", "_prefix")

    def __init__(self, cek: bytes, *, salt: bytes, body_digest: bytes) -> None:
        key, self._prefix = derive_body_key(cek, salt=salt, body_digest=body_digest)
        self._aead = AESGCM(key)

    def seal_into(self, index: int, *, last: bool, plaintext: memoryview, out: memoryview) -> None:
        """Encrypt one chunk into ``out`` (``len(plaintext) + TAG_SIZE`` bytes)."""
        self._aead.encrypt_into(chunk_nonce(self._prefix, index, last=last), plaintext, None, out)

    def open_into(self, index: int, *, last: bool, sealed: memoryview, out: memoryview) -> None:
        """Authenticate and decrypt one chunk into ``out`` (``len(sealed) - TAG_SIZE`` bytes).

        Raises :class:`IntegrityError` when the chunk does not authenticate; ``out`` then holds
        unauthenticated bytes that the caller must discard.
        """
        try:
            self._aead.decrypt_into(chunk_nonce(self._prefix, index, last=last), sealed, None, out)
        except (InvalidTag, ValueError) as exc:
            # Drop the views before raising: the traceback keeps this frame alive, and a live
            # view would stop the caller from releasing (unmapping) the destination buffer.
            del out, sealed
            raise IntegrityError() from exc

    def __repr__(self) -> str:
        return "BodyCipher(<redacted>)"

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("body ciphers hold key material and cannot be pickled")
