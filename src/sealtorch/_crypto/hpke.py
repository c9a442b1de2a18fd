"""HPKE (RFC 9180) single-shot encryption to a key pair generated inside an enclave.

The key server seals each released data key to an ephemeral public key that the enclave created
and bound into its attestation evidence; only that enclave can open it. This module wraps
:mod:`cryptography.hazmat.primitives.hpke` (base mode, single shot) with:

* cipher suites named by stable strings (they travel in the protocol), see :data:`SUITES`;
* key objects whose private half can be neither printed, pickled nor serialised;
* strict public-key decoding (exact lengths, no point-at-infinity surprises);
* :func:`seal` / :func:`open` where *every* failure to open is one uninformative
  :class:`~sealtorch.errors.IntegrityError`.

The ``info`` argument is bound into the HPKE key schedule: a ciphertext opens only with the same
``info`` it was sealed with. Use :func:`encode_info` to build it from a domain label and fields,
so that field boundaries are unambiguous.

Wire format of a sealed message: ``enc || ciphertext`` where ``enc`` is the KEM encapsulation
(32 bytes for X25519, 1120 for ML-KEM-768+X25519) and ``ciphertext`` is the AEAD output
(plaintext length + 16-byte tag).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke as _hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from sealtorch.errors import IntegrityError, ProtocolError

__all__ = [
    "DEFAULT_SUITE",
    "SUITES",
    "SUITE_MLKEM768_X25519",
    "SUITE_X25519",
    "HpkePrivateKey",
    "HpkePublicKey",
    "HpkeSuite",
    "encode_info",
    "generate_private_key",
    "get_suite",
    "open",
    "seal",
]

#: RFC 9180 DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM — the default.
SUITE_X25519 = "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM"
#: Post-quantum hybrid: ML-KEM-768 combined with X25519 / HKDF-SHA256 / AES-256-GCM.
SUITE_MLKEM768_X25519 = "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"
DEFAULT_SUITE = SUITE_X25519

OPEN_FAILED_MESSAGE = (
    "HPKE message failed authentication: it was modified, is for another key or another "
    "context (info), or uses another cipher suite"
)

_X25519_LEN = 32
_MLKEM768_PUBLIC_LEN = 1184
_TAG_LEN = 16
_MAX_INFO_FIELD = 0xFFFF


@dataclass(frozen=True)
class HpkeSuite:
    """One HPKE cipher suite: its protocol name, public key size and encapsulation size."""

    name: str
    public_key_length: int
    enc_length: int
    _kem: _hpke.KEM
    _kdf: _hpke.KDF
    _aead: _hpke.AEAD

    def _suite(self) -> _hpke.Suite:
        return _hpke.Suite(self._kem, self._kdf, self._aead)

    def __repr__(self) -> str:
        return f"HpkeSuite({self.name!r})"


SUITES: dict[str, HpkeSuite] = {
    SUITE_X25519: HpkeSuite(
        name=SUITE_X25519,
        public_key_length=_X25519_LEN,
        enc_length=_hpke.KEM.X25519.enc_length(),
        _kem=_hpke.KEM.X25519,
        _kdf=_hpke.KDF.HKDF_SHA256,
        _aead=_hpke.AEAD.AES_256_GCM,
    ),
    SUITE_MLKEM768_X25519: HpkeSuite(
        name=SUITE_MLKEM768_X25519,
        public_key_length=_MLKEM768_PUBLIC_LEN + _X25519_LEN,
        enc_length=_hpke.KEM.MLKEM768_X25519.enc_length(),
        _kem=_hpke.KEM.MLKEM768_X25519,
        _kdf=_hpke.KDF.HKDF_SHA256,
        _aead=_hpke.AEAD.AES_256_GCM,
    ),
}


def get_suite(suite: str | HpkeSuite) -> HpkeSuite:
    """The suite called ``suite``; :class:`~sealtorch.errors.ProtocolError` if unsupported."""
    name = suite.name if isinstance(suite, HpkeSuite) else suite
    found = SUITES.get(name)
    if found is None:
        raise ProtocolError(
            f"unsupported HPKE suite {str(name)[:100]!r}; supported: " + ", ".join(SUITES)
        )
    return found


_PublicKeyObject = x25519.X25519PublicKey | _hpke.MLKEM768X25519PublicKey
_PrivateKeyObject = x25519.X25519PrivateKey | _hpke.MLKEM768X25519PrivateKey


class HpkePublicKey:
    """A recipient public key of one suite; :meth:`encode` gives its wire bytes.

    Encodings: X25519 — the 32-byte RFC 7748 public key; ML-KEM-768+X25519 — the 1184-byte
    ML-KEM-768 encapsulation key followed by the 32-byte X25519 public key.
    """

    __slots__ = ("_encoded", "_key", "_suite")

    def __init__(self, suite: HpkeSuite, key: _PublicKeyObject, encoded: bytes) -> None:
        self._suite = suite
        self._key = key
        self._encoded = encoded

    @classmethod
    def decode(cls, suite: str | HpkeSuite, data: bytes) -> HpkePublicKey:
        """Parse wire bytes for ``suite``; :class:`~sealtorch.errors.ProtocolError` if malformed."""
        resolved = get_suite(suite)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ProtocolError("an HPKE public key must be bytes")
        data = bytes(data)
        if len(data) != resolved.public_key_length:
            raise ProtocolError(
                f"an HPKE public key for {resolved.name} is exactly "
                f"{resolved.public_key_length} bytes, not {len(data)}"
            )
        try:
            key: _PublicKeyObject
            if resolved.name == SUITE_X25519:
                key = x25519.X25519PublicKey.from_public_bytes(data)
            else:
                key = _hpke.MLKEM768X25519PublicKey(
                    mlkem.MLKEM768PublicKey.from_public_bytes(data[:_MLKEM768_PUBLIC_LEN]),
                    x25519.X25519PublicKey.from_public_bytes(data[_MLKEM768_PUBLIC_LEN:]),
                )
        except ValueError as exc:
            raise ProtocolError(f"the HPKE public key is not a valid {resolved.name} key") from exc
        _reject_low_order_x25519(data[-_X25519_LEN:])
        return cls(resolved, key, data)

    @property
    def suite(self) -> HpkeSuite:
        return self._suite

    def encode(self) -> bytes:
        """The wire encoding (see the class docstring)."""
        return self._encoded

    @property
    def fingerprint(self) -> str:
        """A short digest of the encoding, safe to log."""
        return hashlib.sha256(self._encoded).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HpkePublicKey):
            return NotImplemented
        return self._suite.name == other._suite.name and self._encoded == other._encoded

    def __hash__(self) -> int:
        return hash((self._suite.name, self._encoded))

    def __repr__(self) -> str:
        return f"HpkePublicKey({self._suite.name!r}, fingerprint={self.fingerprint})"


# X25519 public keys of small order (RFC 7748 §6.1 / libsodium blocklist) give an all-zero or
# attacker-known shared secret. OpenSSL refuses the all-zero DH output at encryption time, but a
# clear error at decode time is better than a late "Error computing shared key".
_LOW_ORDER_X25519 = frozenset(
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
)


def _reject_low_order_x25519(point: bytes) -> None:
    # Compare with the top bit cleared, as X25519 ignores it.
    canonical = point[:-1] + bytes([point[-1] & 0x7F])
    if point in _LOW_ORDER_X25519 or canonical in _LOW_ORDER_X25519:
        raise ProtocolError("the HPKE public key is a low-order X25519 point and is refused")


class HpkePrivateKey:
    """An HPKE private key, generated in this process and never exported.

    There is deliberately no way to serialise it: no ``private_bytes``, no pickling, and its
    ``repr`` shows only the suite and the public key fingerprint. It lives as long as the
    object does (an ephemeral key per release request).
    """

    __slots__ = ("_key", "_public", "_suite")

    def __init__(self, suite: HpkeSuite, key: _PrivateKeyObject, public: HpkePublicKey) -> None:
        self._suite = suite
        self._key = key
        self._public = public

    @property
    def suite(self) -> HpkeSuite:
        return self._suite

    def public_key(self) -> HpkePublicKey:
        return self._public

    def __repr__(self) -> str:
        return (
            f"HpkePrivateKey({self._suite.name!r}, <redacted>, public={self._public.fingerprint})"
        )

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("HPKE private keys cannot be pickled or copied out of the process")

    def __copy__(self) -> NoReturn:
        raise TypeError("HPKE private keys cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("HPKE private keys cannot be copied")


def generate_private_key(suite: str | HpkeSuite = DEFAULT_SUITE) -> HpkePrivateKey:
    """A fresh ephemeral key pair for ``suite`` from the OS CSPRNG."""
    resolved = get_suite(suite)
    key: _PrivateKeyObject
    encoded: bytes
    if resolved.name == SUITE_X25519:
        x_key = x25519.X25519PrivateKey.generate()
        key = x_key
        encoded = x_key.public_key().public_bytes_raw()
        public = HpkePublicKey(resolved, x_key.public_key(), encoded)
    else:
        pq = mlkem.MLKEM768PrivateKey.generate()
        classic = x25519.X25519PrivateKey.generate()
        hybrid = _hpke.MLKEM768X25519PrivateKey(pq, classic)
        key = hybrid
        encoded = pq.public_key().public_bytes_raw() + classic.public_key().public_bytes_raw()
        public = HpkePublicKey(resolved, hybrid.public_key(), encoded)
    return HpkePrivateKey(resolved, key, public)


def _coerce_public(suite: HpkeSuite, public_key: HpkePublicKey | bytes) -> HpkePublicKey:
    if isinstance(public_key, HpkePublicKey):
        if public_key.suite.name != suite.name:
            raise ProtocolError(
                f"the public key is for {public_key.suite.name}, not the requested {suite.name}"
            )
        return public_key
    return HpkePublicKey.decode(suite, public_key)


def seal(
    suite: str | HpkeSuite,
    public_key: HpkePublicKey | bytes,
    plaintext: bytes,
    *,
    info: bytes,
) -> bytes:
    """Encrypt ``plaintext`` to ``public_key`` (HPKE base mode), binding ``info``.

    ``public_key`` may be an :class:`HpkePublicKey` or its wire bytes. Returns ``enc || ct``.
    Raises :class:`~sealtorch.errors.ProtocolError` for an unsupported suite or a malformed key.
    """
    resolved = get_suite(suite)
    recipient = _coerce_public(resolved, public_key)
    try:
        return resolved._suite().encrypt(bytes(plaintext), recipient._key, bytes(info))
    except ValueError as exc:  # e.g. a DH result of zero
        raise ProtocolError("cannot encrypt to this HPKE public key; it is unusable") from exc


def open(
    suite: str | HpkeSuite,
    private_key: HpkePrivateKey,
    ciphertext: bytes,
    *,
    info: bytes,
) -> bytes:
    """Decrypt a message made by :func:`seal`.

    Every way it can be wrong (modified bytes, truncation, another key, another ``info``,
    another suite) raises the same :class:`~sealtorch.errors.IntegrityError`.
    """
    resolved = get_suite(suite)
    if private_key.suite.name != resolved.name:
        raise IntegrityError(OPEN_FAILED_MESSAGE)
    data = bytes(ciphertext)
    if len(data) < resolved.enc_length + _TAG_LEN:
        raise IntegrityError(OPEN_FAILED_MESSAGE)
    try:
        return resolved._suite().decrypt(data, private_key._key, bytes(info))
    except (InvalidTag, ValueError) as exc:
        raise IntegrityError(OPEN_FAILED_MESSAGE) from exc


def encode_info(label: str, *fields: str | bytes | int) -> bytes:
    """An unambiguous ``info``/context string: a domain label, then length-prefixed fields.

    ``label`` must be ASCII without NUL (e.g. ``"sealtorch/v1/release"``); it is followed by a
    NUL byte. Each field is then a one-byte type (``s`` str, ``b`` bytes, ``i`` int), a 2-byte
    big-endian length and its bytes: ``str`` as UTF-8, ``bytes`` as is, ``int``
    (0 <= n < 2**64) as 8 bytes big-endian. Two different field lists never give the same
    encoding.
    """
    if not label.isascii() or "\x00" in label or not label:
        raise ValueError("the info label must be non-empty ASCII without NUL")
    out = bytearray(label.encode("ascii") + b"\x00")
    for field in fields:
        if isinstance(field, bool):
            raise TypeError("booleans are not info fields; encode them as an int")
        if isinstance(field, int):
            if not 0 <= field < 1 << 64:
                raise ValueError("integer info fields must be in [0, 2**64)")
            tag, raw = b"i", field.to_bytes(8, "big")
        elif isinstance(field, str):
            tag, raw = b"s", field.encode("utf-8")
        elif isinstance(field, bytes | bytearray | memoryview):
            tag, raw = b"b", bytes(field)
        else:
            raise TypeError(f"info fields are str, bytes or int, not {type(field).__name__}")
        if len(raw) > _MAX_INFO_FIELD:
            raise ValueError("an info field is longer than 65535 bytes")
        out += tag + struct.pack(">H", len(raw)) + raw
    return bytes(out)
