"""Reading the JSON of an inference request with bounded memory and CPU.

``json.loads`` turns every number into a Python object: 32 bytes or more for a 4-byte FP32
element, all alive at once, and one C call that holds the GIL for as long as it parses (a
53 MiB body took 1.9 GiB and 25 s of CPU). Here instead:

1. the request's values are counted from its separators before anything is parsed (each comma
   once), and a request with more than ``max_elements`` is refused (HTTP 413) with a pointer to
   the binary tensor data extension;
2. in a large body, every ``"data": [...]`` array free of strings and objects (a tensor's data,
   flat or nested) is cut out of the text and left unparsed as a :class:`JsonArray`; the rest —
   names, shapes, parameters, small arrays, strings — is parsed by ``json.loads`` as before, and
   may hold at most :data:`MAX_STRUCTURE_VALUES` values;
3. a :class:`JsonArray` is parsed later by :mod:`sealtorch.serving.tensors`, a chunk of about
   :data:`CHUNK_BYTES` at a time, straight into the tensor, once its layout has been checked
   against the input's shape.

Strictness is that of ``json.loads``: each chunk is parsed by it, cut at a comma between two
values, and must hold exactly as many values as separators + 1; the text around the cut-out
arrays must be valid JSON with a placeholder in their place. The text must be UTF-8.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from typing import Any, Final

from sealtorch.serving.errors import PayloadTooLargeError, RequestError, show

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_MAX_JSON_ELEMENTS",
    "MAX_STRUCTURE_VALUES",
    "SMALL_ARRAY",
    "SMALL_BODY",
    "JsonArray",
    "load_request_json",
]

#: Default of ``--max-json-elements``: values a JSON request may hold (16 MiB of FP32).
DEFAULT_MAX_JSON_ELEMENTS: Final = 1 << 22
#: Values a request may hold outside its tensor data arrays (names, shapes, strings...).
MAX_STRUCTURE_VALUES: Final = 1 << 16
#: Bytes of JSON text parsed at a time (a few milliseconds of GIL, a few MiB of objects).
CHUNK_BYTES: Final = 256 * 1024
#: Bodies up to this size are parsed in one ``json.loads`` (bounded by their size anyway).
SMALL_BODY: Final = 64 * 1024
#: Data arrays shorter than this stay in the text parsed by ``json.loads``.
SMALL_ARRAY: Final = 1024

# A JSON string (skipped whole, so nothing inside one is ever taken for structure), or the start
# of the array value of a "data" member.
_SCAN: Final = re.compile(rb'"data"[ \t\r\n]*:[ \t\r\n]*\[|"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_TRAILING: Final = b" \t\r\n,"
_UTF8_BOM: Final = "\ufeff"


class JsonArray:
    """A tensor's JSON data array, not parsed yet: ``source[start:end]`` is its text, from
    ``[`` to ``]`` (checked for layout and values only when it is read), with ``separators``
    commas."""

    __slots__ = ("chunk_bytes", "end", "separators", "source", "start")

    def __init__(
        self,
        source: bytes | bytearray,
        start: int,
        end: int,
        *,
        separators: int | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.source = source
        self.start = start
        self.end = end
        self.separators = source.count(b",", start, end) if separators is None else separators
        self.chunk_bytes = chunk_bytes

    def __repr__(self) -> str:
        return f"JsonArray({self.end - self.start} bytes)"

    @property
    def flat(self) -> bool:
        """Whether the array holds no arrays (only its own brackets)."""
        return self.source.find(b"[", self.start + 1, self.end) == -1

    def layout(self) -> bytes:
        """The text without values or whitespace: brackets and commas (``[[,],[,]]``)."""
        return self._without(_VALUE_BYTES)

    def holds_values(self) -> bool:
        """Whether anything but brackets, commas and whitespace is in the text."""
        return bool(self._without(_LAYOUT_BYTES))

    def _without(self, delete: bytes) -> bytes:
        source, end, size = self.source, self.end, self.chunk_bytes
        return b"".join(
            bytes(source[position : min(position + size, end)]).translate(None, delete)
            for position in range(self.start, end, size)
        )

    def chunks(self, where: str) -> Iterator[tuple[list[Any], frozenset[type] | None]]:
        """The values in order (row-major when nested), a list per chunk of text, each with the
        Python types it holds when its text tells them (:func:`_kinds`), else ``None``.

        Raises :class:`RequestError` for text that is not valid JSON. The caller checks the
        layout first: the brackets of a nested array are read as whitespace here.
        """
        source, position, end, size = self.source, self.start + 1, self.end - 1, self.chunk_bytes
        view = memoryview(source)
        nested = not self.flat
        while position < end:
            cut = -1
            if end - position > size:
                cut = source.find(b",", position + size, end)
            stop = end if cut == -1 else cut
            piece = view[position:stop]
            if nested:
                piece = memoryview(bytes(piece).translate(_BRACKETS_TO_SPACES))
            values = _loads_piece(piece, where)
            if not values:  # only whitespace between two commas (one piece cut at each)
                raise RequestError(f"{where}.data is not valid JSON (a value is missing)")
            yield values, _kinds(source, position, stop)
            position = stop + 1


_VALUE_BYTES: Final = bytes(b for b in range(256) if b not in b"[],")
_LAYOUT_BYTES: Final = b"[], \t\r\n"
_BRACKETS_TO_SPACES: Final = bytes.maketrans(b"[]", b"  ")


_NUMBERS: Final = frozenset({int, float})
_INTEGERS: Final = frozenset({int})
_FLOAT_SYNTAX: Final = re.compile(rb"[.eEIN]")  # a fraction, an exponent, Infinity, NaN


def _kinds(source: bytes | bytearray, start: int, end: int) -> frozenset[type] | None:
    """The Python types ``json.loads`` made of the valid JSON values of ``source[start:end]``
    (no strings, objects or arrays: a cut-out array), told from the text, which is cheaper
    than asking each value: ``{int}`` when every value is an integer, ``{int, float}`` when
    they are numbers and one at least is not an integer (``int`` may then be absent: no rule
    depends on it), ``None`` (unknown) when ``true``, ``false`` or ``null`` is among them:
    of all the valid tokens only those hold a ``u`` or an ``l``."""
    if source.find(b"u", start, end) != -1 or source.find(b"l", start, end) != -1:
        return None
    return _NUMBERS if _FLOAT_SYNTAX.search(source, start, end) else _INTEGERS


def _loads_piece(piece: memoryview, where: str) -> list[Any]:
    try:
        values = json.loads("[" + str(piece, "utf-8") + "]")
    except UnicodeDecodeError as exc:
        raise RequestError("the request body is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise RequestError(f"{where}.data is not valid JSON ({exc.msg})") from exc
    except ValueError as exc:  # an integer with more digits than Python converts
        raise RequestError(f"{where}.data holds a number that cannot be read ({exc})") from exc
    if not isinstance(values, list):  # pragma: no cover - "[...]" always parses to a list
        raise RequestError(f"{where}.data must be a JSON array")
    return values


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise RequestError(f"the request JSON repeats the key {show(key)}")
        result[key] = value
    return result


def _loads(text: bytes | bytearray) -> Any:
    try:
        decoded = text.decode("utf-8")
        if decoded.startswith(_UTF8_BOM):  # RFC 8259 lets a parser ignore one
            decoded = decoded[1:]
        return json.loads(decoded, object_pairs_hook=_reject_duplicates)
    except RecursionError as exc:
        raise RequestError("the request JSON is nested too deeply") from exc
    except UnicodeDecodeError as exc:
        raise RequestError("the request body is not UTF-8 text") from exc
    except ValueError as exc:  # json.JSONDecodeError
        raise RequestError(f"the request body is not valid JSON ({exc})") from exc


def _too_much_structure() -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the JSON request holds more than {MAX_STRUCTURE_VALUES:,} values outside arrays of "
        "numbers (strings, objects, mixed arrays); send tensors as arrays of numbers, or with "
        "the binary tensor data extension"
    )


def _count_values(values: int, limit: int) -> None:
    """Refuse a request whose JSON holds more than ``limit`` values (separators + 1)."""
    if values > limit:
        raise PayloadTooLargeError(
            f"the JSON request holds {values:,} values; the limit is {limit:,} "
            "(--max-json-elements). Send large tensors with the binary tensor data extension "
            "(the Inference-Header-Content-Length header: raw little-endian bytes after the "
            "JSON; docs/serving.md)"
        )


def load_request_json(
    text: bytes | bytearray,
    *,
    max_elements: int,
    small_body: int = SMALL_BODY,
    small_array: int = SMALL_ARRAY,
    chunk_bytes: int = CHUNK_BYTES,
) -> Any:
    """The request document, with each large tensor data array left as a :class:`JsonArray`.

    A body of at most ``small_body`` bytes, and data arrays shorter than ``small_array``, are
    parsed by ``json.loads`` at once; :class:`JsonArray` objects are read ``chunk_bytes`` at a
    time (tests make all three small). Raises :class:`PayloadTooLargeError` (413) for more than
    ``max_elements`` values, or more than :data:`MAX_STRUCTURE_VALUES` outside data arrays, and
    :class:`RequestError` for text that is not UTF-8 JSON.
    """
    if len(text) <= small_body:
        _count_values(text.count(b",") + 1, max_elements)
        return _loads(text)
    parts: list[bytes | bytearray] = []
    arrays: list[JsonArray] = []
    base = secrets.randbits(96) + (1 << 100)  # placeholders a client cannot guess
    position = done = matches = 0
    structure_commas = array_commas = 0  # every comma of the text is counted once
    while (match := _SCAN.search(text, position)) is not None:
        matches += 1
        if matches > MAX_STRUCTURE_VALUES:  # strings: the scan itself stays bounded
            raise _too_much_structure()
        if text[match.end() - 1] != ord("["):
            position = match.end()  # a string
            continue
        start = match.end() - 1
        end = _run_end(text, start)  # the array and what follows it up to the next member
        position = end
        while end > start and text[end - 1] in _TRAILING:
            end -= 1
        if end - start < small_array or text[end - 1] != ord("]"):
            continue  # small, or not an array of numbers: parsed with the rest
        separators = text.count(b",", start, end)
        if not separators:
            continue  # at most one value
        structure_commas += text.count(b",", done, start)
        array_commas += separators
        parts += (text[done:start], str(base + len(arrays)).encode())
        arrays.append(JsonArray(text, start, end, separators=separators, chunk_bytes=chunk_bytes))
        done = end
    structure_commas += text.count(b",", done, len(text))
    _count_values(structure_commas + array_commas + 1, max_elements)
    if structure_commas + 1 > MAX_STRUCTURE_VALUES:
        raise _too_much_structure()
    if not arrays:
        structure = text
    else:
        parts.append(text[done:])
        structure = b"".join(parts)
    document = _loads(structure)
    if arrays:
        _restore(document, base, arrays)
    return document


def _run_end(text: bytes | bytearray, start: int) -> int:
    """Where the run of text from ``start`` without strings or objects ends."""
    end = len(text)
    for stop in (b'"', b"{", b"}"):
        found = text.find(stop, start, end)
        if found != -1:
            end = found
    return end


def _restore(document: Any, base: int, arrays: list[JsonArray]) -> None:
    """Put the cut-out arrays back: as :class:`JsonArray` where they are an input's data,
    parsed (strictly, as the rest) anywhere else."""

    def placeholder(value: Any) -> JsonArray | None:
        if type(value) is int and base <= value < base + len(arrays):
            return arrays[value - base]
        return None

    inputs = document.get("inputs") if isinstance(document, dict) else None
    if isinstance(inputs, list):
        for item in inputs:
            if isinstance(item, dict) and (array := placeholder(item.get("data"))) is not None:
                item["data"] = array
    stack: list[Any] = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            entries: Any = node.items()
        elif isinstance(node, list):
            entries = enumerate(node)
        else:
            continue
        for key, value in list(entries):
            array = placeholder(value)
            if array is not None:
                node[key] = _loads(array.source[array.start : array.end])
            elif isinstance(value, dict | list):
                stack.append(value)
