"""Canonical JSON, the encoding of the sealed header and of the body manifest.

Rules (``docs/format.md`` § Canonical JSON): UTF-8 that is pure ASCII (every non-ASCII
character escaped as ``\\uXXXX``, lowercase hex, surrogate pairs beyond the BMP), object keys
sorted by code point, separators ``,`` and ``:`` without whitespace, integers without leading
zeros, no ``NaN``/``Infinity``, no duplicate keys. Floats are allowed only where a schema says so
and are written in the shortest round-trip form (Python's ``repr``).

The parser re-serialises what it parsed and requires byte equality, so every document has
exactly one accepted encoding.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

__all__ = ["MAX_DEPTH", "NotCanonicalError", "dumps", "loads"]

#: Deepest nesting any sealtorch document uses is 4; anything deeper is refused before parsing.
MAX_DEPTH = 8


class NotCanonicalError(ValueError):
    """The bytes are not the canonical JSON encoding of an object (message is for debugging)."""


def dumps(value: Any) -> bytes:
    """The canonical encoding of ``value`` (a JSON object built from dict/list/str/int/float)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _reject_constant(name: str) -> NoReturn:
    raise NotCanonicalError(f"{name} is not allowed")


def _reject_float(text: str) -> NoReturn:
    raise NotCanonicalError(f"floating-point number {text} is not allowed here")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise NotCanonicalError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _check_depth(data: bytes) -> None:
    depth = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > MAX_DEPTH:
                raise NotCanonicalError("nested too deeply")
        elif byte in (0x5D, 0x7D):
            depth -= 1


def loads(data: bytes | memoryview, *, allow_floats: bool = False) -> dict[str, Any]:
    """Parse canonical JSON holding an object; raise :class:`NotCanonicalError` otherwise."""
    raw = bytes(data)
    _check_depth(raw)
    try:
        text = raw.decode("ascii")
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
            parse_float=float if allow_floats else _reject_float,
        )
    except NotCanonicalError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise NotCanonicalError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise NotCanonicalError("the document must be a JSON object")
    try:
        again = dumps(value)
    except (ValueError, TypeError) as exc:  # pragma: no cover - parse output always serialises
        raise NotCanonicalError("cannot re-serialise") from exc
    if again != raw:
        raise NotCanonicalError("not in canonical form")
    return value
