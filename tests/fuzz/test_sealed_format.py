"""Property-based tests of the sealed format: round trips and single-byte damage anywhere."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealtorch.errors import INTEGRITY_MESSAGE, FormatError, IntegrityError
from sealtorch.keys import DataKey
from sealtorch.sealed.keywrap import LocalKeyWrapper
from sealtorch.sealed.reader import SealedReader
from sealtorch.sealed.writer import SealedWriter

KEY = DataKey(bytes(range(32)))


def _seal(data: bytes, chunk_size: int, cuts: list[int]) -> bytes:
    out = io.BytesIO()
    with SealedWriter(
        out,
        model_id="fuzz",
        plaintext_size=len(data),
        wrapper=LocalKeyWrapper(KEY),
        chunk_size=chunk_size,
    ) as writer:
        previous = 0
        for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
            writer.write(data[previous:cut])
            previous = cut
    return out.getvalue()


def _open(blob: bytes) -> bytes:
    with SealedReader(io.BytesIO(blob)) as reader:
        buffer = reader.decrypt(reader.content_key(KEY))
        return bytes(buffer[: reader.header.body.plaintext_size])


@given(
    data=st.binary(max_size=2000),
    chunk_exponent=st.integers(6, 9),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
)
def test_round_trip(data: bytes, chunk_exponent: int, cuts: list[int]) -> None:
    assert _open(_seal(data, 1 << chunk_exponent, cuts)) == data


@settings(max_examples=300)
@given(
    data=st.binary(min_size=1, max_size=600),
    position=st.integers(min_value=0),
    replacement=st.integers(1, 255),
)
def test_any_changed_byte_is_refused(data: bytes, position: int, replacement: int) -> None:
    blob = bytearray(_seal(data, 64, []))
    position %= len(blob)
    blob[position] ^= replacement
    expected = FormatError if position < 10 else IntegrityError  # magic, version | the rest
    with pytest.raises(expected) as info:
        _open(bytes(blob))
    if expected is IntegrityError:
        assert str(info.value) == INTEGRITY_MESSAGE


@given(data=st.binary(max_size=600), cut=st.integers(min_value=1))
def test_any_truncation_or_extension_is_refused(data: bytes, cut: int) -> None:
    blob = _seal(data, 64, [])
    for damaged in (blob[: cut % len(blob)], blob + bytes(1 + cut % 100)):
        try:
            _open(damaged)
        except (IntegrityError, FormatError):
            continue
        raise AssertionError("a truncated or extended file was accepted")
