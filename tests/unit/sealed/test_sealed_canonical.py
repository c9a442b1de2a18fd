from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sealtorch.sealed import canonical
from sealtorch.sealed.canonical import NotCanonicalError


def test_dumps_sorts_keys_without_whitespace_and_escapes_non_ascii() -> None:
    assert canonical.dumps({"b": [1, -2], "a": "é\n\U0001f600"}) == (
        b'{"a":"\\u00e9\\n\\ud83d\\ude00","b":[1,-2]}'
    )


@pytest.mark.parametrize(
    "text",
    [
        b'{"a": 1}',  # whitespace
        b'{"b":1,"a":2}',  # unsorted
        b'{"a":1,"a":1}',  # duplicate key
        b'{"a":01}',  # leading zero (invalid JSON)
        b'{"a":-0}',  # -0 re-serialises as 0
        b'{"a":1.5}',  # float where none is allowed
        b'{"a":1e5}',
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":"\\u0041"}',  # escaped ASCII letter is not canonical
        '{"a":"é"}'.encode(),  # raw UTF-8 instead of an escape
        b"[1,2]",  # not an object
        b'{"a":1}\n',  # trailing newline
        b'{"a":1}{"b":2}',
        b"",
        b"\xff",
        b'{"a":' + b"[" * 20 + b"]" * 20 + b"}",  # nested too deeply
        b'{"a":' + b"[" * 100000,
    ],
)
def test_loads_rejects_non_canonical(text: bytes) -> None:
    with pytest.raises(NotCanonicalError):
        canonical.loads(text)


def test_floats_only_when_allowed() -> None:
    assert canonical.loads(b'{"a":0.485}', allow_floats=True) == {"a": 0.485}
    with pytest.raises(NotCanonicalError):
        canonical.loads(b'{"a":0.4850}', allow_floats=True)  # not the shortest form


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_round_trip(value: dict[str, object]) -> None:
    encoded = canonical.dumps(value)
    if encoded.count(b"[") + encoded.count(b"{") <= canonical.MAX_DEPTH:
        assert canonical.loads(encoded) == value
