"""HPKE: round trips, every way to fail opening, strict key decoding, RFC 9180 known answers.

``cryptography``'s HPKE API draws the ephemeral key itself, so sealing is not deterministic. The
known-answer tests therefore use an independent RFC 9180 key schedule written here from the RFC
text: it is first checked against the RFC's Appendix A.1 vectors, then used (a) to open what
:func:`hpke.seal` produced for our AES-256-GCM suite and (b) to build a ciphertext with a fixed
ephemeral key that :func:`hpke.open` must accept — so both directions are checked against the
specification, not just against themselves. The chain is RFC vector → reference → library,
through public APIs only (the RFC's own ciphertexts carry an AAD, which the library's public HPKE
API does not take).
"""

from __future__ import annotations

import copy
import pickle  # noqa: TID251 - only to prove that private keys refuse pickling

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hmac import HMAC
from hypothesis import given
from hypothesis import strategies as st

from sealtorch._crypto import hpke
from sealtorch.errors import IntegrityError, ProtocolError

ALL_SUITES = sorted(hpke.SUITES)

# RFC 9180 Appendix A.1.1 (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, base mode).
A1_INFO = bytes.fromhex("4f6465206f6e2061204772656369616e2055726e")
A1_SKEM = bytes.fromhex("52c4a758a802cd8b936eceea314432798d5baf2d7e9235dc084ab1b9cfa2f736")
A1_PKEM = bytes.fromhex("37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431")
A1_SKRM = bytes.fromhex("4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8")
A1_PKRM = bytes.fromhex("3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d")
A1_SHARED = bytes.fromhex("fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc")
A1_KEY = bytes.fromhex("4531685d41d65f03dc48f6b8302c05b0")
A1_NONCE = bytes.fromhex("56d890e5accaaf011cff4b7d")
A1_PT = bytes.fromhex("4265617574792069732074727574682c20747275746820626561757479")
A1_AAD0 = bytes.fromhex("436f756e742d30")
A1_CT0 = bytes.fromhex(
    "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a"
)


# --- an independent RFC 9180 reference (base mode, DHKEM X25519, HKDF-SHA256) -------------------


def _hmac(key: bytes, data: bytes) -> bytes:
    mac = HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize()


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return _hmac(salt or bytes(32), ikm)


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = _hmac(prk, block + info + bytes([counter]))
        out += block
        counter += 1
    return out[:length]


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, b"HPKE-v1" + suite_id + label + ikm)


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    return _expand(prk, length.to_bytes(2, "big") + b"HPKE-v1" + suite_id + label + info, length)


def _ref_key_schedule(
    sk_e_or_r: bytes, pk_other: bytes, enc: bytes, pk_r: bytes, info: bytes, aead_id: int
) -> tuple[bytes, bytes, bytes]:
    """(shared_secret, key, base_nonce) per RFC 9180 §4.1 and §5.1."""
    dh = x25519.X25519PrivateKey.from_private_bytes(sk_e_or_r).exchange(
        x25519.X25519PublicKey.from_public_bytes(pk_other)
    )
    kem_suite = b"KEM" + (0x0020).to_bytes(2, "big")
    eae_prk = _labeled_extract(kem_suite, b"", b"eae_prk", dh)
    shared = _labeled_expand(kem_suite, eae_prk, b"shared_secret", enc + pk_r, 32)
    suite_id = b"HPKE" + (0x0020).to_bytes(2, "big") + (1).to_bytes(2, "big")
    suite_id += aead_id.to_bytes(2, "big")
    psk_id_hash = _labeled_extract(suite_id, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(suite_id, b"", b"info_hash", info)
    context = b"\x00" + psk_id_hash + info_hash
    secret = _labeled_extract(suite_id, shared, b"secret", b"")
    nk = 16 if aead_id == 1 else 32
    key = _labeled_expand(suite_id, secret, b"key", context, nk)
    nonce = _labeled_expand(suite_id, secret, b"base_nonce", context, 12)
    return shared, key, nonce


def test_reference_matches_rfc9180_a1() -> None:
    shared, key, nonce = _ref_key_schedule(A1_SKEM, A1_PKRM, A1_PKEM, A1_PKRM, A1_INFO, 1)
    assert (shared, key, nonce) == (A1_SHARED, A1_KEY, A1_NONCE)
    # The receiver side computes the same from (skR, enc).
    assert _ref_key_schedule(A1_SKRM, A1_PKEM, A1_PKEM, A1_PKRM, A1_INFO, 1)[0] == A1_SHARED
    assert AESGCM(key).encrypt(nonce, A1_PT, A1_AAD0) == A1_CT0


def _x25519_recipient() -> tuple[hpke.HpkePrivateKey, bytes]:
    """A recipient whose raw private key the test knows (built through the module's own types)."""
    raw = x25519.X25519PrivateKey.generate()
    suite = hpke.get_suite(hpke.SUITE_X25519)
    encoded = raw.public_key().public_bytes_raw()
    public = hpke.HpkePublicKey(suite, raw.public_key(), encoded)
    return hpke.HpkePrivateKey(suite, raw, public), raw.private_bytes_raw()


def test_seal_output_opens_with_rfc_reference() -> None:
    recipient, sk_r = _x25519_recipient()
    info = hpke.encode_info("sealtorch/test", "model-a", 3)
    sealed = hpke.seal(hpke.SUITE_X25519, recipient.public_key(), b"\x42" * 32, info=info)
    enc, ct = sealed[:32], sealed[32:]
    pk_r = recipient.public_key().encode()
    _, key, nonce = _ref_key_schedule(sk_r, enc, enc, pk_r, info, aead_id=2)  # AES-256-GCM
    assert AESGCM(key).decrypt(nonce, ct, b"") == b"\x42" * 32


def test_open_accepts_rfc_reference_ciphertext_with_fixed_ephemeral_key() -> None:
    recipient, _ = _x25519_recipient()
    pk_r = recipient.public_key().encode()
    info = b"fixed-ephemeral"
    _, key, nonce = _ref_key_schedule(A1_SKEM, pk_r, A1_PKEM, pk_r, info, aead_id=2)
    message = A1_PKEM + AESGCM(key).encrypt(nonce, A1_PT, b"")
    assert hpke.open(hpke.SUITE_X25519, recipient, message, info=info) == A1_PT


# --- behaviour of the module ----------------------------------------------------------------------


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_round_trip_and_sizes(suite: str) -> None:
    key = hpke.generate_private_key(suite)
    public = key.public_key()
    assert len(public.encode()) == hpke.get_suite(suite).public_key_length
    sealed = hpke.seal(suite, public.encode(), b"data key bytes", info=b"ctx")
    assert len(sealed) == hpke.get_suite(suite).enc_length + len(b"data key bytes") + 16
    assert hpke.open(suite, key, sealed, info=b"ctx") == b"data key bytes"


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_each_seal_is_fresh(suite: str) -> None:
    key = hpke.generate_private_key(suite)
    a = hpke.seal(suite, key.public_key(), b"same", info=b"i")
    b = hpke.seal(suite, key.public_key(), b"same", info=b"i")
    assert a != b


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_wrong_info_fails(suite: str) -> None:
    key = hpke.generate_private_key(suite)
    sealed = hpke.seal(suite, key.public_key(), b"secret", info=b"model-a/1/req-1")
    with pytest.raises(IntegrityError, match="HPKE message failed authentication"):
        hpke.open(suite, key, sealed, info=b"model-b/1/req-1")


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_wrong_key_fails(suite: str) -> None:
    key = hpke.generate_private_key(suite)
    other = hpke.generate_private_key(suite)
    sealed = hpke.seal(suite, key.public_key(), b"secret", info=b"i")
    with pytest.raises(IntegrityError):
        hpke.open(suite, other, sealed, info=b"i")


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_every_flipped_byte_fails_the_same_way(suite: str) -> None:
    key = hpke.generate_private_key(suite)
    sealed = hpke.seal(suite, key.public_key(), b"k" * 32, info=b"i")
    step = 1 if len(sealed) < 100 else 37
    messages = set()
    for index in range(0, len(sealed), step):
        tampered = bytearray(sealed)
        tampered[index] ^= 0x01
        with pytest.raises(IntegrityError) as info:
            hpke.open(suite, key, bytes(tampered), info=b"i")
        messages.add(str(info.value))
    assert len(messages) == 1  # no oracle: one message for every failure


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_truncated_and_extended_fail(suite: str) -> None:
    key = hpke.generate_private_key(suite)
    sealed = hpke.seal(suite, key.public_key(), b"k" * 32, info=b"i")
    for bad in (b"", sealed[:10], sealed[:-1], sealed + b"\x00"):
        with pytest.raises(IntegrityError):
            hpke.open(suite, key, bad, info=b"i")


def test_suite_mismatch_fails() -> None:
    classic = hpke.generate_private_key(hpke.SUITE_X25519)
    hybrid = hpke.generate_private_key(hpke.SUITE_MLKEM768_X25519)
    sealed = hpke.seal(hpke.SUITE_MLKEM768_X25519, hybrid.public_key(), b"x", info=b"i")
    # Opening under the other suite name, or with the other suite's key, fails closed.
    with pytest.raises(IntegrityError):
        hpke.open(hpke.SUITE_X25519, hybrid, sealed, info=b"i")
    with pytest.raises(IntegrityError):
        hpke.open(hpke.SUITE_X25519, classic, sealed, info=b"i")
    # Sealing to a key of another suite is refused up front.
    with pytest.raises(ProtocolError, match="public key is for"):
        hpke.seal(hpke.SUITE_X25519, hybrid.public_key(), b"x", info=b"i")


def test_the_x25519_half_of_the_hybrid_is_not_enough() -> None:
    """A classic-only recipient must not open hybrid ciphertexts (downgrade check)."""
    hybrid = hpke.generate_private_key(hpke.SUITE_MLKEM768_X25519)
    x_half = hybrid.public_key().encode()[-32:]
    sealed = hpke.seal(hpke.SUITE_X25519, x_half, b"secret", info=b"i")
    with pytest.raises(IntegrityError):
        hpke.open(hpke.SUITE_MLKEM768_X25519, hybrid, sealed, info=b"i")


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_public_key_decode_is_strict(suite: str) -> None:
    good = hpke.generate_private_key(suite).public_key().encode()
    assert hpke.HpkePublicKey.decode(suite, good).encode() == good
    for bad in (b"", good[:-1], good + b"\x00", good[1:]):
        with pytest.raises(ProtocolError, match="exactly"):
            hpke.HpkePublicKey.decode(suite, bad)


def test_malformed_mlkem_key_is_refused() -> None:
    bogus = b"\xff" * hpke.get_suite(hpke.SUITE_MLKEM768_X25519).public_key_length
    with pytest.raises(ProtocolError, match="not a valid"):
        hpke.HpkePublicKey.decode(hpke.SUITE_MLKEM768_X25519, bogus)


@pytest.mark.parametrize(
    "point",
    [
        bytes(32),
        b"\x01" + bytes(31),
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880"),
        b"\xec" + b"\xff" * 30 + b"\xff",
    ],
)
def test_low_order_x25519_points_are_refused(point: bytes) -> None:
    with pytest.raises(ProtocolError, match="low-order"):
        hpke.HpkePublicKey.decode(hpke.SUITE_X25519, point)
    with pytest.raises(ProtocolError):
        hpke.seal(hpke.SUITE_X25519, point, b"x", info=b"i")


def test_unknown_suite_is_refused() -> None:
    with pytest.raises(ProtocolError, match="unsupported HPKE suite"):
        hpke.generate_private_key("DHKEM(P-256,HKDF-SHA256)/HKDF-SHA256/AES-128-GCM")
    with pytest.raises(ProtocolError, match="supported: "):
        hpke.get_suite("x" * 10_000)


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_private_key_never_shows_or_leaves(suite: str) -> None:
    key = hpke.generate_private_key(suite)
    text = repr(key) + str(key)
    assert "<redacted>" in text
    if suite == hpke.SUITE_X25519:  # a key of known bytes (RFC 9180 A.1.1): they never show
        raw = x25519.X25519PrivateKey.from_private_bytes(A1_SKEM)
        known = hpke.HpkePrivateKey(
            hpke.get_suite(suite), raw, hpke.HpkePublicKey.decode(suite, A1_PKEM)
        )
        assert raw.private_bytes_raw().hex() not in repr(known) + str(known)
    for attempt in (lambda: pickle.dumps(key), lambda: copy.copy(key), lambda: copy.deepcopy(key)):
        with pytest.raises(TypeError):
            attempt()
    assert not hasattr(key, "private_bytes")
    assert not hasattr(key, "__dict__")


def test_public_key_equality_and_hash() -> None:
    key = hpke.generate_private_key()
    same = hpke.HpkePublicKey.decode(hpke.DEFAULT_SUITE, key.public_key().encode())
    assert same == key.public_key()
    assert hash(same) == hash(key.public_key())
    assert same != hpke.generate_private_key().public_key()
    assert key.public_key().fingerprint in repr(key.public_key())


def test_encode_info_is_unambiguous() -> None:
    assert hpke.encode_info("l", "ab", "c") != hpke.encode_info("l", "a", "bc")
    assert hpke.encode_info("l", "1") != hpke.encode_info("l", 1)
    assert hpke.encode_info("l", b"x") != hpke.encode_info("l", "x")
    assert hpke.encode_info("a", "b") != hpke.encode_info("ab")
    assert hpke.encode_info("sealtorch/v1/x", 7) == b"sealtorch/v1/x\x00i\x00\x08" + (7).to_bytes(
        8, "big"
    )
    for bad_label in ("", "a\x00b", "é"):
        with pytest.raises(ValueError, match="label"):
            hpke.encode_info(bad_label)
    with pytest.raises(ValueError, match=r"2\*\*64"):
        hpke.encode_info("l", -1)
    with pytest.raises(TypeError):
        hpke.encode_info("l", True)
    with pytest.raises(ValueError, match="65535"):
        hpke.encode_info("l", b"x" * 70_000)


@given(
    a=st.lists(st.one_of(st.text(max_size=8), st.binary(max_size=8), st.integers(0, 2**64 - 1))),
    b=st.lists(st.one_of(st.text(max_size=8), st.binary(max_size=8), st.integers(0, 2**64 - 1))),
)
def test_encode_info_injective(a: list[str | bytes | int], b: list[str | bytes | int]) -> None:
    def typed(fields: list[str | bytes | int]) -> list[tuple[str, str | bytes | int]]:
        return [(type(f).__name__, f) for f in fields]

    if typed(a) != typed(b):
        assert hpke.encode_info("l", *a) != hpke.encode_info("l", *b)
    else:
        assert hpke.encode_info("l", *a) == hpke.encode_info("l", *b)
