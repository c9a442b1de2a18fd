"""Sealed sets (format v2) from the attacker's side: the host holding the files swaps, drops,
duplicates, truncates, edits or mixes them between sets. Each is refused with a clear error,
before any key is requested where the headers suffice, and nothing is returned."""

from __future__ import annotations

import contextlib
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import KEY, OTHER_KEY
from sealtorch.errors import ConfigError, FormatError, IntegrityError, PayloadError
from sealtorch.keys import DataKey, KeyProvider
from sealtorch.sealed.header import (
    SET_FORMAT_VERSION,
    Header,
    KeyBlock,
    SetBlock,
    ShardHeader,
    parse_preamble_version,
)
from sealtorch.sealed.keywrap import LocalKeyWrapper
from sealtorch.sealed.reader import SealedReader, read_header
from sealtorch.sealed.sets import SealedSetWriter, member_path, plan_parts, set_paths

CHUNK = 64
PLAINTEXT = bytes(random.Random(3).randrange(256) for _ in range(1000))
SIZES = [300, 400, 300]


class CountingKeys(KeyProvider):
    """Counts key requests: checks that need no key must refuse before asking for one."""

    def __init__(self, key: DataKey) -> None:
        self.key = key
        self.calls = 0

    def data_key(self, model_id: str, key_version: int) -> DataKey:
        self.calls += 1
        return self.key


def write_set(first: Path, data: bytes = PLAINTEXT, sizes: list[int] = SIZES) -> list[Path]:
    with SealedSetWriter(
        first,
        model_id="m1",
        sizes=sizes,
        wrapper=LocalKeyWrapper(KEY, key_version=1),
        chunk_size=CHUNK,
    ) as writer:
        for start in range(0, len(data), 77):  # pieces that straddle files and chunks
            writer.write(data[start : start + 77])
    return set_paths(first, len(sizes))


def open_set(first: Path, keys: KeyProvider | DataKey = KEY) -> bytes:
    with SealedReader(first) as reader:
        buffer = reader.decrypt(reader.content_key(keys))
        data = bytes(buffer[: reader.plaintext_size])
        streamed = b"".join(bytes(p) for p in reader.iter_plaintext(reader.content_key(keys)))
        assert streamed == data
        return data


@pytest.fixture
def sealed_set(tmp_path: Path) -> list[Path]:
    return write_set(tmp_path / "model.sealed")


def refused(first: Path, match: str) -> IntegrityError | ConfigError:
    keys = CountingKeys(KEY)
    with pytest.raises((IntegrityError, ConfigError), match=match) as info:
        open_set(first, keys)
    assert keys.calls == 0, "refused only after asking for the key"
    return info.value


def test_round_trip_and_layout(sealed_set: list[Path]) -> None:
    first = sealed_set[0]
    assert [p.name for p in sealed_set] == [
        "model.sealed",
        "model.sealed.00002-of-00003",
        "model.sealed.00003-of-00003",
    ]
    assert open_set(first) == PLAINTEXT
    for path in sealed_set:
        assert parse_preamble_version(path.read_bytes()[:16])[0] == SET_FORMAT_VERSION
    header = read_header(first)
    assert header.body.set is not None
    assert header.body.set.count == 3
    assert len(header.body.set.digests) == 2
    with SealedReader(first) as reader:
        assert reader.plaintext_size == len(PLAINTEXT)
        assert reader.file_size == sum(p.stat().st_size for p in sealed_set)
    # No tensor name, no plaintext byte in any file.
    for path in sealed_set:
        assert PLAINTEXT[:32] not in path.read_bytes()


def test_a_later_file_is_not_a_model_by_itself(sealed_set: list[Path]) -> None:
    with pytest.raises(ConfigError, match="file 2 of 3 of a sealed set: open the set's first"):
        SealedReader(sealed_set[1])


def test_missing_file(sealed_set: list[Path]) -> None:
    sealed_set[2].unlink()
    refused(sealed_set[0], r"file 3 of 3 \(model.sealed.00003-of-00003\) is missing")


def test_swapped_files(sealed_set: list[Path]) -> None:
    a, b = sealed_set[1], sealed_set[2]
    temp = a.with_suffix(".tmp")
    a.rename(temp)
    b.rename(a)
    temp.rename(b)
    refused(sealed_set[0], r"file 2 of 3 .* holds file 3 of 3 \(swapped or duplicated")


def test_duplicated_file(sealed_set: list[Path]) -> None:
    shutil.copyfile(sealed_set[1], sealed_set[2])
    refused(sealed_set[0], r"file 3 of 3 .* holds file 2 of 3")


def test_first_file_swapped_for_a_later_one(sealed_set: list[Path]) -> None:
    shutil.copyfile(sealed_set[1], sealed_set[0])
    with pytest.raises(ConfigError, match="file 2 of 3 of a sealed set"):
        open_set(sealed_set[0])


def test_file_from_another_sealing_of_the_same_model(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ours = write_set(tmp_path / "a" / "model.sealed")
    theirs = write_set(tmp_path / "b" / "model.sealed")
    shutil.copyfile(theirs[1], ours[1])  # same model, same key, same sizes: another version
    refused(ours[0], r"file 2 of 3 .* belongs to another sealed set")
    # Their first file with (partly) our later files fails the same way.
    shutil.copyfile(theirs[0], ours[0])
    refused(ours[0], r"file 3 of 3 .* belongs to another sealed set")


def test_truncated_and_extended_files(sealed_set: list[Path]) -> None:
    original = sealed_set[2].read_bytes()
    for data in (original[:-1], original[:-17], original + b"\0"):
        sealed_set[2].write_bytes(data)
        refused(sealed_set[0], "is truncated or extended")
    sealed_set[2].write_bytes(original)
    assert open_set(sealed_set[0]) == PLAINTEXT


def test_every_flipped_byte_fails(sealed_set: list[Path]) -> None:
    for path in sealed_set:
        original = path.read_bytes()
        for position in range(0, len(original), 7):
            data = bytearray(original)
            data[position] ^= 0x01
            path.write_bytes(bytes(data))
            # A bad magic in the first file is "not a sealed model", as for single files.
            with pytest.raises((IntegrityError, ConfigError, FormatError)):
                open_set(sealed_set[0])
        path.write_bytes(original)
    assert open_set(sealed_set[0]) == PLAINTEXT


def test_wrong_key(sealed_set: list[Path]) -> None:
    with pytest.raises(IntegrityError):
        open_set(sealed_set[0], OTHER_KEY)


def test_edited_digest_list_fails_authentication(sealed_set: list[Path]) -> None:
    """Rewriting the first file's digest list to accept a foreign file breaks the key wrap."""
    first = sealed_set[0]
    blob = first.read_bytes()
    header = read_header(first)
    assert header.body.set is not None
    digests = list(header.body.set.digests)
    digests[0] = bytes(32)
    edited = Header(
        body=type(header.body)(
            **{
                **header.body.__dict__,
                "set": SetBlock(
                    set_id=header.body.set.set_id, index=0, count=3, digests=tuple(digests)
                ),
            }
        ),
        key=header.key,
    )
    old_length = len(header.encode())
    first.write_bytes(edited.encode() + blob[old_length:])
    with pytest.raises(IntegrityError):
        open_set(first)


def test_plan_parts() -> None:
    assert plan_parts(100) == [100]
    assert plan_parts(100, boundaries=[30, 60]) == [30, 30, 40]
    assert plan_parts(100, max_size=40) == [40, 40, 20]
    assert plan_parts(100, boundaries=[50], max_size=30) == [30, 20, 30, 20]
    assert plan_parts(100, boundaries=[0, 100, 120]) == [100]
    with pytest.raises(ConfigError, match="at most 512"):
        plan_parts(10_000, max_size=1)


def test_nothing_appears_when_sealing_fails(tmp_path: Path) -> None:
    first = tmp_path / "model.sealed"
    writer = SealedSetWriter(
        first,
        model_id="m1",
        sizes=SIZES,
        wrapper=LocalKeyWrapper(KEY, key_version=1),
        chunk_size=CHUNK,
    )
    writer.write(PLAINTEXT[:500])
    writer.__exit__(RuntimeError, RuntimeError("source failed"), None)
    assert list(tmp_path.iterdir()) == []
    # Too few bytes: finishing refuses, and nothing appears either.
    writer = SealedSetWriter(
        first,
        model_id="m1",
        sizes=SIZES,
        wrapper=LocalKeyWrapper(KEY, key_version=1),
        chunk_size=CHUNK,
    )
    writer.write(PLAINTEXT[:500])
    with pytest.raises(PayloadError, match="announced"):
        writer.finish()
    assert list(tmp_path.iterdir()) == []
    assert member_path(first, 0, 3) == first


DATA = Path(__file__).resolve().parents[2] / "data" / "sealed"


def test_the_stored_sealed_set_still_loads() -> None:
    """A set written by an earlier sealtorch (tests/data/sealed/README.md) loads bit for bit."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    import sealtorch

    first = DATA / "small-cnn-set-v2.sealed"
    assert sealtorch.inspect_sealed(first).file_count == 2
    loaded = sealtorch.load_state_dict(first, key=bytes(range(32)))
    expected = load_file(DATA / "small-cnn.safetensors")
    assert list(loaded) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
        assert loaded[name].data_ptr() % 64 == 0


def test_rewrap_a_set(sealed_set: list[Path], tmp_path: Path) -> None:
    """Key rotation rewrites the first file's key block only; the other files are unchanged
    (copied next to a new destination)."""
    import sealtorch

    first = sealed_set[0]
    others = [p.read_bytes() for p in sealed_set[1:]]
    new_key = DataKey(bytes(range(2, 34)))
    info = sealtorch.rewrap(first, key=KEY, new_key=new_key)
    assert info.key_version == 2
    assert info.file_count == 3
    assert [p.read_bytes() for p in sealed_set[1:]] == others
    assert open_set(first, new_key) == PLAINTEXT
    with pytest.raises(IntegrityError):
        open_set(first, KEY)
    copy = tmp_path / "elsewhere.sealed"
    sealtorch.rewrap(first, key=new_key, new_key=KEY, new_key_version=3, destination=copy)
    assert open_set(copy) == PLAINTEXT
    assert [p.read_bytes() for p in set_paths(copy, 3)[1:]] == others

    class RemoteRewrap:  # the key server's rewrap sees the first file's header, set included
        def __init__(self) -> None:
            self.seen: list[Header] = []

        def rewrap(self, header: Header) -> KeyBlock:
            self.seen.append(header)
            with SealedReader(copy) as reader:
                cek = reader.content_key(KEY)
            return LocalKeyWrapper(DataKey(bytes(range(5, 37))), key_version=9).wrap(
                model_id=header.model_id, body_digest=header.body.digest, cek=cek
            )

    remote = RemoteRewrap()
    sealtorch.rewrap(copy, key=None, new_key=remote)  # type: ignore[arg-type]
    assert [h.body.set.index for h in remote.seen if h.body.set] == [0]
    assert open_set(copy, DataKey(bytes(range(5, 37)))) == PLAINTEXT


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.text(max_size=70),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(
    set_block=st.dictionaries(
        st.sampled_from(["count", "digests", "id", "index", "extra"]), _JSON, max_size=5
    ),
    with_key=st.booleans(),
)
def test_any_set_block_is_parsed_or_refused_as_an_integrity_error(
    set_block: dict[str, object], with_key: bool
) -> None:
    """Whatever a host writes into a version 2 header, parsing raises IntegrityError or
    returns a valid header - never another exception."""
    from sealtorch.sealed import canonical

    body = {
        "chunk_size": 64,
        "model_id": "m1",
        "plaintext_size": 10,
        "salt": "A" * 43,
        "set": set_block,
        "suite": "AES-256-GCM/HKDF-SHA256/v1",
    }
    document: dict[str, object] = {"body": body}
    if with_key:
        document["key"] = {
            "key_version": 1,
            "nonce": "A" * 16,
            "salt": "A" * 43,
            "wrapped_cek": "A" * 64,
        }
    try:
        text = canonical.dumps(document)
    except (ValueError, TypeError):
        return
    for decode in (lambda t: Header.decode(t, version=2), ShardHeader.decode):
        with contextlib.suppress(IntegrityError):
            decode(text)
