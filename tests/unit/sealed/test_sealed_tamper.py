"""The attacker's side: every way of altering a sealed file must fail authentication.

A small file (chunk size 64) lets these run exhaustively in a second or two: every bit of the
preamble and header, every bit of the bytes around every chunk boundary, truncation at and
between boundaries, appended bytes, reordered / duplicated / spliced chunks, edited header
fields, wrong keys and key versions.
"""

from __future__ import annotations

import random
import struct

import pytest

from conftest import KEY, OTHER_KEY, open_parallel, open_sealed, open_streaming, seal
from sealtorch.errors import INTEGRITY_MESSAGE, FormatError, IntegrityError
from sealtorch.keys import StaticKey
from sealtorch.sealed import canonical
from sealtorch.sealed.header import PREAMBLE_SIZE, Header
from sealtorch.sealed.keywrap import LocalKeyWrapper, unwrap_content_key

CHUNK = 64
TAG = 16
PLAINTEXT = bytes(random.Random(7).randrange(256) for _ in range(5 * CHUNK + 17))


@pytest.fixture(scope="module")
def blob() -> bytes:
    return seal(PLAINTEXT, chunk_size=CHUNK)


def _layout(blob: bytes) -> tuple[int, list[tuple[int, int]]]:
    (length,) = struct.unpack(">I", blob[12:16])
    start = PREAMBLE_SIZE + length
    chunks = []
    position = start
    remaining = len(PLAINTEXT)
    while True:
        size = min(CHUNK, remaining)
        chunks.append((position, position + size + TAG))
        position += size + TAG
        remaining -= size
        if remaining == 0:
            break
    assert position == len(blob)
    return start, chunks


def _flip(blob: bytes, position: int, bit: int) -> bytes:
    data = bytearray(blob)
    data[position] ^= 1 << bit
    return bytes(data)


def _refused(blob: bytes) -> type[Exception]:
    """Open ``blob`` every way (one thread from a stream, chunk by chunk, several threads from
    a file); each must raise the same error class (and return nothing)."""
    errors: list[Exception] = []
    for opener in (open_sealed, open_streaming, open_parallel):
        try:
            opener(blob)
        except (IntegrityError, FormatError) as exc:
            errors.append(exc)
        else:
            raise AssertionError("a tampered file was accepted")
    kinds = {type(error) for error in errors}
    assert len(kinds) == 1
    if IntegrityError in kinds:
        assert {str(error) for error in errors} == {INTEGRITY_MESSAGE}
    return type(errors[0])


def test_untouched_file_opens(blob: bytes) -> None:
    assert open_sealed(blob) == PLAINTEXT
    assert open_streaming(blob) == PLAINTEXT
    for threads in (1, 2, 3, 7):
        assert open_parallel(blob, threads=threads) == PLAINTEXT


def test_every_bit_of_preamble_and_header(blob: bytes) -> None:
    body_start, _ = _layout(blob)
    for position in range(body_start):
        for bit in range(8):
            error = _refused(_flip(blob, position, bit))
            expected = FormatError if position < 10 else IntegrityError  # magic and version
            assert error is expected, (position, bit)


def test_every_bit_around_every_chunk_boundary(blob: bytes) -> None:
    body_start, chunks = _layout(blob)
    positions: set[int] = set()
    for start, end in chunks:
        positions.update(range(max(body_start, start - 3), min(len(blob), start + 3)))
        positions.update(range(end - TAG - 2, min(len(blob), end + 2)))  # data end and tag
    for position in sorted(positions):
        for bit in range(8):
            assert _refused(_flip(blob, position, bit)) is IntegrityError, position


def test_random_bit_flips(blob: bytes) -> None:
    rng = random.Random(2)
    for _ in range(300):
        position = rng.randrange(len(blob))
        expected = FormatError if position < 10 else IntegrityError
        assert _refused(_flip(blob, position, rng.randrange(8))) is expected


def test_truncation_at_and_between_chunk_boundaries(blob: bytes) -> None:
    body_start, chunks = _layout(blob)
    cuts = {body_start, body_start + 1, len(blob) - 1, PREAMBLE_SIZE, PREAMBLE_SIZE + 5, 9}
    for start, end in chunks:
        cuts.update({start, start + 1, end - TAG, end - TAG + 1, end - 1, (start + end) // 2})
    for cut in sorted(cuts):
        if cut < len(blob):
            assert _refused(blob[:cut]) is IntegrityError, cut


@pytest.mark.parametrize("extra", [b"\x00", b"x" * TAG, b"y" * (CHUNK + TAG)])
def test_appended_bytes(blob: bytes, extra: bytes) -> None:
    assert _refused(blob + extra) is IntegrityError


def test_reordered_duplicated_and_dropped_chunks(blob: bytes) -> None:
    _, chunks = _layout(blob)
    pieces = [blob[s:e] for s, e in chunks]
    head = blob[: chunks[0][0]]
    full = pieces[:-1]  # all the same size
    variants = [
        full[1:2] + full[0:1] + full[2:],  # swap first two
        full[:2] + full[3:4] + full[2:3] + full[4:],  # swap two in the middle
        full[:1] + full[:1] + full[2:],  # duplicate chunk 0 over chunk 1
        full[:-1] + full[-2:-1],  # duplicate a middle chunk at the end
        full[1:] + full[:1],  # rotate
    ]
    for variant in variants:
        assert _refused(head + b"".join(variant) + pieces[-1]) is IntegrityError
    # the last (short) chunk moved or dropped
    assert _refused(head + b"".join(full)) is IntegrityError
    # a full chunk moved into the last position changes the length: refused too
    assert _refused(head + b"".join(full[:-1]) + pieces[-1] + full[-1]) is IntegrityError


def test_file_ending_on_a_full_chunk_cannot_be_truncated_to_an_earlier_boundary() -> None:
    """Dropping whole chunks and fixing the size field still fails: the last flag and the
    header binding both change."""
    data = bytes(4 * CHUNK)
    blob = seal(data, chunk_size=CHUNK)
    (length,) = struct.unpack(">I", blob[12:16])
    header = canonical.loads(blob[PREAMBLE_SIZE : PREAMBLE_SIZE + length])
    header["body"]["plaintext_size"] = 3 * CHUNK
    text = canonical.dumps(header)
    forged = blob[:12] + struct.pack(">I", len(text)) + text
    forged += blob[PREAMBLE_SIZE + length : PREAMBLE_SIZE + length + 3 * (CHUNK + TAG)]
    assert _refused(forged) is IntegrityError


def test_chunk_spliced_from_another_file_under_the_same_key(blob: bytes) -> None:
    other = seal(PLAINTEXT, chunk_size=CHUNK)  # same key, model, plaintext; new CEK and salt
    _, chunks = _layout(blob)
    _, other_chunks = _layout(other)
    for (start, end), (o_start, o_end) in zip(chunks, other_chunks, strict=True):
        spliced = blob[:start] + other[o_start:o_end] + blob[end:]
        assert _refused(spliced) is IntegrityError
    # header of one file with the body of the other
    assert _refused(blob[: chunks[0][0]] + other[other_chunks[0][0] :]) is IntegrityError


def _edit_header(blob: bytes, section: str, field: str, value: object) -> bytes:
    (length,) = struct.unpack(">I", blob[12:16])
    header = canonical.loads(blob[PREAMBLE_SIZE : PREAMBLE_SIZE + length])
    header[section][field] = value
    text = canonical.dumps(header)
    return blob[:12] + struct.pack(">I", len(text)) + text + blob[PREAMBLE_SIZE + length :]


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("body", "model_id", "m2"),
        ("body", "model_id", "M1"),
        ("body", "chunk_size", 128),
        ("key", "key_version", 2),
        ("key", "nonce", "AAAAAAAAAAAAAAAA"),
        ("key", "salt", "A" * 43),
        ("body", "salt", "A" * 43),
    ],
)
def test_edited_header_fields(blob: bytes, section: str, field: str, value: object) -> None:
    assert _refused(_edit_header(blob, section, field, value)) is IntegrityError


def test_edited_model_id_fails_even_with_a_key_for_that_model(blob: bytes) -> None:
    edited = _edit_header(blob, "body", "model_id", "m2")
    header = Header.decode(edited[PREAMBLE_SIZE : PREAMBLE_SIZE + int.from_bytes(edited[12:16])])
    with pytest.raises(IntegrityError):
        unwrap_content_key(KEY, header)


def test_wrong_key(blob: bytes) -> None:
    with pytest.raises(IntegrityError) as info:
        open_sealed(blob, key=OTHER_KEY)
    assert str(info.value) == INTEGRITY_MESSAGE
    assert KEY.material.hex() not in repr(info.value)


def test_every_failure_is_the_same_error(blob: bytes) -> None:
    messages = set()
    for broken in (_flip(blob, 40, 0), blob[:-1], blob + b"x", _flip(blob, len(blob) - 1, 7)):
        with pytest.raises(IntegrityError) as info:
            open_sealed(broken)
        messages.add((type(info.value), str(info.value), info.value.args))
    with pytest.raises(IntegrityError) as info:
        open_sealed(blob, key=OTHER_KEY)
    messages.add((type(info.value), str(info.value), info.value.args))
    assert len(messages) == 1


def test_key_version_is_requested_from_the_provider() -> None:
    blob = seal(b"abc", key_version=4)
    seen: list[tuple[str, int]] = []

    class Provider:
        def data_key(self, model_id: str, key_version: int):  # type: ignore[no-untyped-def]
            seen.append((model_id, key_version))
            return KEY

    open_sealed_with = Provider()
    import io

    from sealtorch.sealed.reader import SealedReader

    with SealedReader(io.BytesIO(blob)) as reader:
        buffer = reader.decrypt(reader.content_key(open_sealed_with))
        assert bytes(buffer[:3]) == b"abc"
    assert seen == [("m1", 4)]
    # a key for another version of the model fails authentication
    wrong = seal(b"abc", key=OTHER_KEY, key_version=4)
    with pytest.raises(IntegrityError):
        open_sealed(wrong, key=KEY)
    # a provider restricted to another version refuses to hand out the key at all
    with SealedReader(io.BytesIO(blob)) as reader, pytest.raises(Exception, match="version 3"):
        reader.content_key(StaticKey(KEY, key_version=3))


def test_wrapper_bound_to_its_version() -> None:
    wrapper = LocalKeyWrapper(KEY, key_version=2)
    assert wrapper.key_version == 2
    assert KEY.material.hex() not in repr(wrapper)
