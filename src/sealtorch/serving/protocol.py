"""Open Inference Protocol (KServe v2) inference requests: parsing and validation.

This module knows the *shape* of a request, not the model: it turns the HTTP body into an
:class:`InferenceRequest` or raises :class:`~sealtorch.serving.errors.RequestError` (HTTP 400)
with a message that says what is wrong. Checking the request against a model's inputs is the
job of :mod:`sealtorch.serving.codec`. No PyTorch, no web framework.

Supported on top of the JSON form (``docs/serving.md``):

* the *binary tensor data* extension: with the ``Inference-Header-Content-Length`` HTTP header,
  the body is the JSON header followed by raw tensors, each input announcing its size with the
  ``binary_data_size`` parameter (little-endian; BYTES elements as 4-byte length + bytes);
* output parameters ``classification`` (top-k, the classification extension) and
  ``binary_data``; the request parameter ``binary_data_output``.

Other parameters are accepted and ignored, as the protocol allows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from sealtorch.serving.errors import PayloadTooLargeError, RequestError, show
from sealtorch.serving.jsondata import DEFAULT_MAX_JSON_ELEMENTS, load_request_json

__all__ = [
    "DATATYPES",
    "MAX_DIMS",
    "InferenceRequest",
    "Parameters",
    "RequestInput",
    "RequestedOutput",
    "binary_output_default",
    "check_target",
    "classification_count",
    "parse_inference_request",
    "render_error",
    "render_response",
    "shape_text",
    "wants_binary",
]

#: Every tensor data type of the protocol (the model decides which of them it takes).
DATATYPES: Final = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
)
MAX_DIMS: Final = 32
MAX_TENSORS: Final = 256
MAX_ID_LENGTH: Final = 1024
MAX_PARAMETERS: Final = 64
_MAX_DIM: Final = 2**63 - 1

Parameters = Mapping[str, str | int | float | bool]
_EMPTY: Final[Parameters] = MappingProxyType({})


@dataclass(frozen=True)
class RequestInput:
    """One input tensor of a request, not yet converted: ``data`` is its JSON data (Python
    values; a large array of numbers is a :class:`~sealtorch.serving.jsondata.JsonArray`, read
    when the tensor is decoded), ``raw`` its binary data."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    parameters: Parameters = field(default_factory=lambda: _EMPTY)
    data: Any = None
    raw: bytes | None = None

    @property
    def element_count(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class RequestedOutput:
    """One output the client asks for, with its parameters (``classification``...)."""

    name: str
    parameters: Parameters = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True)
class InferenceRequest:
    """A structurally valid inference request."""

    inputs: tuple[RequestInput, ...]
    outputs: tuple[RequestedOutput, ...] | None = None
    id: str | None = None
    parameters: Parameters = field(default_factory=lambda: _EMPTY)
    #: The model (and version) the body names, as the kserve SDK and KServe transformers send
    #: it; the route checks it against the URL (:func:`check_target`).
    model_name: str | None = None
    model_version: str | None = None


def check_target(request: InferenceRequest, name: str, version: str | None) -> None:
    """Refuse a body that names another model or version than the URL (or gRPC field)."""
    if request.model_name is not None and request.model_name != name:
        raise RequestError(
            f"the request body names model {show(request.model_name)}, but it was sent to "
            f"model {show(name)}; leave model_name out or make them agree"
        )
    if request.model_version is not None and request.model_version != version:
        raise RequestError(
            f"the request body names model version {show(request.model_version)}, but it was "
            f"sent to version {show(version)}; leave model_version out or make them agree"
        )


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(f"{where} must be a JSON object")
    return value


def _keys(obj: Mapping[str, Any], where: str, allowed: frozenset[str]) -> None:
    unknown = set(obj) - allowed
    if unknown:
        names = ", ".join(show(name) for name in sorted(unknown)[:5])
        raise RequestError(
            f"{where} has unknown field(s) {names}; allowed: {', '.join(sorted(allowed))}"
        )


def _string(value: object, where: str, *, limit: int = 256) -> str:
    if not isinstance(value, str) or not value:
        raise RequestError(f"{where} must be a non-empty string")
    if len(value) > limit:
        raise RequestError(f"{where} is longer than {limit} characters")
    return value


def _parameters(value: object, where: str) -> Parameters:
    if value is None:
        return _EMPTY
    obj = _object(value, where)
    if len(obj) > MAX_PARAMETERS:
        raise RequestError(f"{where} holds more than {MAX_PARAMETERS} parameters")
    for key, item in obj.items():
        if not isinstance(item, str | int | float | bool) or (
            isinstance(item, float) and not math.isfinite(item)
        ):
            raise RequestError(
                f"{where}.{show(key)} must be a string, a finite number or a boolean"
            )
    return MappingProxyType(obj)


def _shape(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise RequestError(f"{where} must be a list of at most {MAX_DIMS} dimensions")
    for dim in value:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= _MAX_DIM:
            raise RequestError(f"{where} must hold non-negative integers, not {show(dim)}")
    return tuple(value)


def _binary_size(parameters: Parameters, where: str) -> int | None:
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise RequestError(f"{where}.parameters.binary_data_size must be a non-negative integer")
    return size


_REQUEST_FIELDS: Final = frozenset(
    {"id", "parameters", "inputs", "outputs", "model_name", "model_version"}
)
_INPUT_FIELDS: Final = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_FIELDS: Final = frozenset({"name", "parameters"})


def parse_inference_request(
    body: bytes | bytearray,
    *,
    json_length: int | None = None,
    max_json_elements: int = DEFAULT_MAX_JSON_ELEMENTS,
) -> InferenceRequest:
    """Parse an inference request body.

    ``json_length`` is the value of the ``Inference-Header-Content-Length`` header (binary
    tensor data extension): the JSON header is the first ``json_length`` bytes and the rest holds
    the binary inputs, in input order. A JSON header holding more than ``max_json_elements``
    values is refused with HTTP 413 before it is parsed (:mod:`sealtorch.serving.jsondata`).
    """
    view = memoryview(body)
    if json_length is None:
        header, binary = body, view[:0]
    else:
        if not 0 < json_length <= len(body):
            raise RequestError(
                "Inference-Header-Content-Length must be between 1 and the body size"
            )
        header, binary = body[:json_length], view[json_length:]
    try:
        loaded = load_request_json(header, max_elements=max_json_elements)
    except PayloadTooLargeError:
        raise
    except RequestError as exc:
        raise RequestError(_binary_hint(str(exc), body, json_length)) from exc
    document = _object(loaded, "the request")
    _keys(document, "the request", _REQUEST_FIELDS)

    targets = [
        _string(document[key], key) if key in document else None
        for key in ("model_name", "model_version")
    ]
    request_id = document.get("id")
    if request_id is not None and (
        not isinstance(request_id, str) or len(request_id) > MAX_ID_LENGTH
    ):
        raise RequestError(f"id must be a string of at most {MAX_ID_LENGTH} characters")

    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not 1 <= len(raw_inputs) <= MAX_TENSORS:
        raise RequestError(f"inputs must be a list of 1 to {MAX_TENSORS} input tensors")
    inputs: list[RequestInput] = []
    offset = 0
    for index, item in enumerate(raw_inputs):
        where = f"inputs[{index}]"
        obj = _object(item, where)
        _keys(obj, where, _INPUT_FIELDS)
        for required in ("name", "shape", "datatype"):
            if required not in obj:
                raise RequestError(f"{where} is missing {show(required)}")
        name = _string(obj["name"], f"{where}.name")
        datatype = obj["datatype"]
        if datatype not in DATATYPES:
            raise RequestError(
                f"{where}.datatype must be one of {', '.join(DATATYPES)}, not {show(datatype)}"
            )
        shape = _shape(obj["shape"], f"{where}.shape")
        parameters = _parameters(obj.get("parameters"), f"{where}.parameters")
        size = _binary_size(parameters, where)
        raw: bytes | None = None
        if size is not None:
            if "data" in obj:
                raise RequestError(f"{where} has both data and binary_data_size; send one")
            if json_length is None:
                raise RequestError(
                    f"{where} uses binary_data_size, which needs the "
                    "Inference-Header-Content-Length header"
                )
            if offset + size > len(binary):
                raise RequestError(f"{where}.binary_data_size runs past the end of the body")
            raw = bytes(binary[offset : offset + size])
            offset += size
        elif "data" not in obj:
            raise RequestError(f"{where} is missing 'data'")
        inputs.append(
            RequestInput(
                name=name,
                datatype=str(datatype),
                shape=shape,
                parameters=parameters,
                data=obj.get("data"),
                raw=raw,
            )
        )
    if offset != len(binary):
        raise RequestError(
            f"the body holds {len(binary) - offset} bytes after the last binary input"
        )
    names = [spec.name for spec in inputs]
    if len(set(names)) != len(names):
        raise RequestError("inputs repeat a name; each input tensor appears once")

    outputs: tuple[RequestedOutput, ...] | None = None
    if "outputs" in document:
        raw_outputs = document["outputs"]
        if not isinstance(raw_outputs, list) or len(raw_outputs) > MAX_TENSORS:
            raise RequestError(f"outputs must be a list of at most {MAX_TENSORS} outputs")
        parsed = []
        for index, item in enumerate(raw_outputs):
            where = f"outputs[{index}]"
            obj = _object(item, where)
            _keys(obj, where, _OUTPUT_FIELDS)
            if "name" not in obj:
                raise RequestError(f"{where} is missing 'name'")
            parsed.append(
                RequestedOutput(
                    name=_string(obj["name"], f"{where}.name"),
                    parameters=_parameters(obj.get("parameters"), f"{where}.parameters"),
                )
            )
        if len({o.name for o in parsed}) != len(parsed):
            raise RequestError("outputs repeat a name; ask for each output once")
        outputs = tuple(parsed)

    return InferenceRequest(
        inputs=tuple(inputs),
        outputs=outputs,
        id=request_id,
        parameters=_parameters(document.get("parameters"), "parameters"),
        model_name=targets[0],
        model_version=targets[1],
    )


def _binary_hint(message: str, body: bytes | bytearray, json_length: int | None) -> str:
    """Say what is likely wrong when a body that carries binary tensor data does not parse."""
    if json_length is not None:
        return (
            f"{message}: the first {json_length} bytes (Inference-Header-Content-Length) are not "
            "the JSON header; the header must give the exact length of the JSON part"
        )
    if b"binary_data_size" in body[:65536] and body.lstrip()[:1] == b"{":
        return (
            f"{message}: a body with binary tensor data (binary_data_size) needs the "
            "Inference-Header-Content-Length header with the length of its JSON part"
        )
    return message


def classification_count(parameters: Parameters, where: str) -> int | None:
    """The ``classification`` parameter of a requested output (top-k), if any."""
    count = parameters.get("classification")
    if count is None:
        return None
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise RequestError(f"{where}.parameters.classification must be a positive integer")
    return count


def wants_binary(parameters: Parameters, default: bool, where: str) -> bool:
    """The ``binary_data`` flag of a requested output (binary tensor data extension)."""
    flag = parameters.get("binary_data", default)
    if not isinstance(flag, bool):
        raise RequestError(f"{where}.parameters.binary_data must be true or false")
    return flag


def binary_output_default(request: InferenceRequest) -> bool:
    flag = request.parameters.get("binary_data_output", False)
    if not isinstance(flag, bool):
        raise RequestError("parameters.binary_data_output must be true or false")
    return flag


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def render_response(
    document: Mapping[str, Any], binary: Sequence[bytes]
) -> tuple[bytes, int | None]:
    """The response body and, with binary outputs, the JSON header length.

    Non-finite floats are written as ``NaN``/``Infinity`` (as Python, NumPy and most inference
    clients read them); the rest is strict JSON.
    """
    header = json.dumps(document, separators=(",", ":"), allow_nan=True).encode("utf-8")
    if not binary:
        return header, None
    return header + b"".join(binary), len(header)


def render_error(message: str) -> bytes:
    return json.dumps({"error": message}, separators=(",", ":")).encode("utf-8")
