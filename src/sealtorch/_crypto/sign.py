"""Ed25519 signatures: the simulated TEE's attestation key (``sealtorch.attestation.sim``) and
the key server's release-signing key (``sealtorch.protocol.statement``).

A thin wrapper so that only ``sealtorch._crypto`` imports ``cryptography.hazmat``. Private keys
are handled as raw 32-byte seeds; they never appear in ``repr``. Public keys and signatures are
raw bytes (32 and 64), as RFC 8032 defines them.
"""

from __future__ import annotations

from typing import NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "ED25519_PUBLIC_KEY_SIZE",
    "ED25519_SEED_SIZE",
    "ED25519_SIGNATURE_SIZE",
    "BadSignature",
    "Ed25519Signer",
    "ed25519_check_public_key",
    "ed25519_verify",
]

ED25519_SEED_SIZE = 32
ED25519_PUBLIC_KEY_SIZE = 32
ED25519_SIGNATURE_SIZE = 64


class BadSignature(Exception):  # noqa: N818 - mirrors cryptography's InvalidSignature
    """The signature does not verify under the public key (or the public key is malformed)."""


class Ed25519Signer:
    """An Ed25519 private key. ``repr`` shows only the public key."""

    __slots__ = ("_key", "_public")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != ED25519_SEED_SIZE:
            raise ValueError(f"an Ed25519 private key is {ED25519_SEED_SIZE} bytes")
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self._public = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> tuple[Ed25519Signer, bytes]:
        """A new random key and its 32-byte seed (to be stored by the caller, mode 0600)."""
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        seed = Ed25519PrivateKey.generate().private_bytes(
            Encoding.Raw, PrivateFormat.Raw, NoEncryption()
        )
        return cls(seed), seed

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key."""
        return self._public

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"Ed25519Signer(public_key={self._public.hex()})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("private keys cannot be pickled")


def ed25519_verify(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Return if ``signature`` is a valid Ed25519 signature of ``message``; else raise."""
    if len(public_key) != ED25519_PUBLIC_KEY_SIZE or len(signature) != ED25519_SIGNATURE_SIZE:
        raise BadSignature("malformed Ed25519 public key or signature")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise BadSignature("Ed25519 signature does not verify") from exc


def ed25519_check_public_key(public_key: bytes) -> None:
    """Return if ``public_key`` is a well-formed 32-byte Ed25519 public key; else raise
    :class:`BadSignature` (a key nothing could ever verify under)."""
    if len(public_key) != ED25519_PUBLIC_KEY_SIZE:
        raise BadSignature(f"an Ed25519 public key is {ED25519_PUBLIC_KEY_SIZE} bytes")
    try:
        Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError as exc:
        raise BadSignature("not a valid Ed25519 public key") from exc
