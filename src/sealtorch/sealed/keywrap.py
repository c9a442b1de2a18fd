"""Wrapping a sealed file's content key under a model data key — the envelope layer.

Sealing asks a :class:`ContentKeyWrapper` for the file's key block. The local implementation,
:class:`LocalKeyWrapper`, holds the data key; a key server client can implement the same protocol
so that the data key never leaves the server (``sealtorch encrypt --keyserver URL``).

:func:`wrap_content_key` and :func:`unwrap_content_key` are the two operations a key server (or
any holder of the data key) performs; readers call :func:`unwrap_content_key` with the data key a
:class:`~sealtorch.keys.KeyProvider` returned.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from sealtorch._crypto.wrap import WRAP_NONCE_SIZE, WRAP_SALT_SIZE, unwrap_cek, wrap_cek
from sealtorch.keys import DataKey
from sealtorch.sealed.header import Header, KeyBlock, check_key_version, check_model_id, wrap_aad

__all__ = [
    "ContentKeyWrapper",
    "LocalKeyWrapper",
    "unwrap_content_key",
    "wrap_content_key",
]


@runtime_checkable
class ContentKeyWrapper(Protocol):
    """Wraps a new file's content key; returns the header's key block (with its key version)."""

    def wrap(self, *, model_id: str, body_digest: bytes, cek: bytes) -> KeyBlock:
        """Wrap ``cek`` for the file of ``model_id`` whose body header digest is ``body_digest``."""
        ...


def wrap_content_key(
    dek: DataKey,
    *,
    model_id: str,
    key_version: int,
    body_digest: bytes,
    cek: bytes,
    _random_bytes: Callable[[int], bytes] = secrets.token_bytes,
) -> KeyBlock:
    """Wrap ``cek`` under ``dek`` (fresh random salt and nonce).

    ``_random_bytes`` exists for the published test vector only; keep the CSPRNG default.
    """
    check_model_id(model_id)
    check_key_version(key_version)
    salt, nonce = _random_bytes(WRAP_SALT_SIZE), _random_bytes(WRAP_NONCE_SIZE)
    aad = wrap_aad(model_id=model_id, key_version=key_version, body_digest=body_digest)
    wrapped = wrap_cek(dek.material, salt=salt, nonce=nonce, cek=cek, aad=aad)
    return KeyBlock(key_version=key_version, salt=salt, nonce=nonce, wrapped_cek=wrapped)


def unwrap_content_key(dek: DataKey, header: Header) -> bytes:
    """Recover the content key of the file with ``header``.

    Raises :class:`~sealtorch.errors.IntegrityError` for a wrong key or any edited header field.
    """
    aad = wrap_aad(
        model_id=header.body.model_id,
        key_version=header.key.key_version,
        body_digest=header.body.digest,
    )
    return unwrap_cek(
        dek.material,
        salt=header.key.salt,
        nonce=header.key.nonce,
        wrapped=header.key.wrapped_cek,
        aad=aad,
    )


class LocalKeyWrapper:
    """A :class:`ContentKeyWrapper` holding the data key of one model version."""

    def __init__(
        self,
        dek: DataKey,
        *,
        key_version: int = 1,
        _random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if not isinstance(dek, DataKey):
            raise TypeError("LocalKeyWrapper needs a DataKey")
        self._dek = dek
        self.key_version = check_key_version(key_version)
        self._random_bytes = _random_bytes

    def wrap(self, *, model_id: str, body_digest: bytes, cek: bytes) -> KeyBlock:
        return wrap_content_key(
            self._dek,
            model_id=model_id,
            key_version=self.key_version,
            body_digest=body_digest,
            cek=cek,
            _random_bytes=self._random_bytes,
        )

    def __repr__(self) -> str:
        return f"LocalKeyWrapper({self._dek!r}, key_version={self.key_version})"
