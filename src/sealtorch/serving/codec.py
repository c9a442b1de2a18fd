"""The Open Inference Protocol codec: requests → model tensors, model tensors → responses.

A request travels ``app/grpc → decode → ServedModel.forward → encode``. This module is the
only place that knows both the protocol and a model's interface: :func:`decode` checks a parsed
request (:class:`~sealtorch.serving.protocol.InferenceRequest`, from a REST body or a gRPC
message) against the model's inputs and builds the tensors; :func:`select_outputs` picks the
requested outputs of a forward pass, ranks them for the classification extension and says
which go out as raw bytes; :func:`render` writes the REST response (the gRPC service renders
the same :class:`OutputTensor` list into its message). Model metadata and the read-only
model configuration are rendered here too, for both protocols.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import torch

from sealtorch.serving.errors import RequestError, show
from sealtorch.serving.protocol import (
    InferenceRequest,
    Parameters,
    RequestInput,
    binary_output_default,
    classification_count,
    shape_text,
    wants_binary,
)
from sealtorch.serving.tensors import (
    DTYPES,
    datatype_of,
    decode_base64_elements,
    decode_bytes_elements,
    decode_tensor,
    encode_binary,
    encode_bytes_binary,
    encode_json,
)

if TYPE_CHECKING:
    from sealtorch.payloads.manifest import TensorSpec
    from sealtorch.serving.model import ServedModel

__all__ = [
    "EXTENSIONS",
    "PLATFORM",
    "InferenceResult",
    "OutputTensor",
    "decode",
    "infer",
    "model_config",
    "model_metadata",
    "render",
    "run",
    "select_outputs",
    "server_metadata",
]

#: The platform reported in model metadata.
PLATFORM: Final = "pytorch"
#: Protocol extensions the server supports (server metadata).
EXTENSIONS: Final = ("classification", "binary_tensor_data", "model_configuration", "generate")
#: Protocol datatype → Triton model configuration data type (``/config``).
_CONFIG_TYPES: Final = {name: f"TYPE_{name}" for name in DTYPES} | {"BYTES": "TYPE_STRING"}


@dataclass(frozen=True)
class InferenceResult:
    """A REST response document plus the binary output parts (binary tensor data extension)."""

    document: dict[str, Any]
    binary: tuple[bytes, ...]
    compute_seconds: float


@dataclass(frozen=True)
class OutputTensor:
    """One output of a response, before it is written in either protocol's form.

    Numeric outputs carry ``tensor``; classification results (``BYTES``) carry ``elements``.
    ``binary``: whether the client asked for it as raw bytes (REST binary extension).
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    tensor: torch.Tensor | None = None
    elements: tuple[bytes, ...] | None = None
    binary: bool = False

    def raw(self) -> bytes:
        """Little-endian row-major bytes (BYTES: 4-byte length + bytes per element)."""
        if self.elements is not None:
            return encode_bytes_binary(self.elements)
        assert self.tensor is not None  # noqa: S101 - one of the two is set
        return encode_binary(self.tensor)


# -- metadata ----------------------------------------------------------------------------------


def server_metadata() -> dict[str, Any]:
    """The server metadata response of the protocol."""
    from sealtorch import __version__

    return {"name": "sealtorch", "version": __version__, "extensions": list(EXTENSIONS)}


def _public_inputs(model: ServedModel) -> list[TensorSpec]:
    inputs = list(model.public_inputs)
    for extra in (model.image_input, model.text_input):
        if extra is not None and extra not in inputs:
            inputs.append(extra)
    return inputs


def model_metadata(model: ServedModel) -> dict[str, Any]:
    """The model metadata response of the protocol."""
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": PLATFORM,
        "inputs": [spec.to_json() for spec in _public_inputs(model)],
        "outputs": [spec.to_json() for spec in model.outputs],
    }


def _config_tensor(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "data_type": _CONFIG_TYPES[spec.datatype], "dims": list(spec.shape)}


def model_config(model: ServedModel) -> dict[str, Any]:
    """A minimal, read-only model configuration in Triton's JSON form (``/config``).

    ``max_batch_size`` is 0 and ``dims`` are the full shapes (batch dimension included, -1
    where any size goes): sealtorch runs each request as it comes, never batching requests
    together, and a request may carry any batch its shapes allow.
    """
    return {
        "name": model.name,
        "platform": PLATFORM,
        "backend": PLATFORM,
        "version_policy": {"specific": {"versions": [model.version]}},
        "max_batch_size": 0,
        "input": [_config_tensor(spec) for spec in _public_inputs(model)],
        "output": [_config_tensor(spec) for spec in model.outputs],
    }


# -- decode --------------------------------------------------------------------------------------


def decode(model: ServedModel, request: InferenceRequest) -> list[torch.Tensor]:
    """The tensors to call the model with, checked against its inputs (400 otherwise)."""
    given = {item.name: item for item in request.inputs}
    image_input = model.image_input
    if image_input is not None and image_input.name in given:
        if len(given) != 1:
            raise RequestError(
                f"send either the encoded images ({image_input.name!r}) or the "
                "tensor input(s), not both"
            )
        return [_image_batch(model, given[image_input.name])]
    text_input = model.text_input
    if text_input is not None and text_input.name in given:
        if len(given) != 1:
            raise RequestError(
                f"send either the text ({text_input.name!r}) or the token tensors, not both"
            )
        return _text_batch(model, given[text_input.name])
    expected = [spec.name for spec in model.public_inputs]
    unknown = [name for name in given if name not in expected]
    if unknown:
        accepted = expected + [s.name for s in (image_input, text_input) if s is not None]
        raise RequestError(
            f"model {model.name!r} has no input {show(unknown[0])}; its inputs are "
            f"{', '.join(repr(n) for n in accepted)}"
        )
    missing = [name for name in expected if name not in given]
    if missing:
        raise RequestError(f"input {missing[0]!r} of model {model.name!r} is missing")
    tensors = [_tensor(spec, given[spec.name], f"input {spec.name!r}") for spec in model.inputs]
    positions = model.text.max_positions if model.text is not None else None
    if positions is not None:
        for spec, tensor in zip(model.inputs, tensors, strict=True):
            if tensor.dim() >= 2 and tensor.shape[1] > positions:
                raise RequestError(
                    f"input {spec.name!r} holds {tensor.shape[1]} tokens per sequence; model "
                    f"{model.name!r} takes at most {positions}"
                )
    return tensors


def _tensor(spec: TensorSpec, item: RequestInput, where: str) -> torch.Tensor:
    if item.datatype != spec.datatype:
        raise RequestError(
            f"{where} has datatype {item.datatype}, but the model takes {spec.datatype}"
        )
    if len(item.shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape, item.shape, strict=True)
    ):
        raise RequestError(
            f"{where} has shape {shape_text(item.shape)}, but the model takes "
            f"{shape_text(spec.shape)} (-1: any size)"
        )
    return decode_tensor(
        datatype=item.datatype, shape=item.shape, data=item.data, raw=item.raw, where=where
    )


def _image_batch(model: ServedModel, item: RequestInput) -> torch.Tensor:
    where = f"input {item.name!r}"
    if item.datatype != "BYTES":
        raise RequestError(f"{where} must be BYTES (encoded images), not {item.datatype}")
    if len(item.shape) != 1 or not 1 <= item.shape[0] <= model.max_images:
        raise RequestError(
            f"{where} must have shape [N] with 1 <= N <= {model.max_images} images, "
            f"not {shape_text(item.shape)}"
        )
    content_type = item.parameters.get("content_type")
    if content_type not in (None, "base64"):
        raise RequestError(f"{where}.parameters.content_type must be 'base64' if given")
    elements = decode_bytes_elements(shape=item.shape, data=item.data, raw=item.raw, where=where)
    if item.raw is None or content_type == "base64":
        elements = decode_base64_elements(elements, where)
    return model.images(elements, where)


def _text_batch(model: ServedModel, item: RequestInput) -> list[torch.Tensor]:
    """Texts (BYTES, UTF-8) tokenized with the model's sealed tokenizer."""
    where = f"input {item.name!r}"
    assert model.text is not None  # noqa: S101 - text_input implies text
    if item.datatype != "BYTES":
        raise RequestError(f"{where} must be BYTES (UTF-8 text), not {item.datatype}")
    if len(item.shape) != 1 or not 1 <= item.shape[0] <= model.max_images:
        raise RequestError(
            f"{where} must have shape [N] with 1 <= N <= {model.max_images} texts, "
            f"not {shape_text(item.shape)}"
        )
    elements = decode_bytes_elements(shape=item.shape, data=item.data, raw=item.raw, where=where)
    texts = []
    for index, element in enumerate(elements):
        try:
            texts.append(bytes(element).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise RequestError(f"{where}[{index}] is not UTF-8 text") from exc
    return model.text.encode(texts)


# -- encode --------------------------------------------------------------------------------------


def select_outputs(
    model: ServedModel,
    request: InferenceRequest,
    produced: Sequence[torch.Tensor],
    *,
    binary_default: bool | None = None,
) -> list[OutputTensor]:
    """The outputs the request asks for (all of them by default), classified if asked.

    ``binary_default``: whether outputs go out as raw bytes unless they say otherwise; None
    reads the request's ``binary_data_output`` parameter (REST).
    """
    default = binary_output_default(request) if binary_default is None else binary_default
    requested: list[tuple[str, Parameters]]
    if request.outputs is None:
        requested = [(spec.name, {}) for spec in model.outputs[: len(produced)]]
    else:
        requested = [(out.name, out.parameters) for out in request.outputs]
    outputs: list[OutputTensor] = []
    for index, (name, parameters) in enumerate(requested):
        where = f"outputs[{index}]"
        position = model.output_position(name)
        if position is None:
            raise RequestError(
                f"model {model.name!r} has no output {show(name)}; its outputs are "
                f"{', '.join(repr(spec.name) for spec in model.outputs)}"
            )
        tensor = model.output(produced, position)
        count = classification_count(parameters, where)
        as_binary = wants_binary(parameters, default, where)
        if count is not None:
            labels = model.labels if model.is_labelled(position) else None
            strings = _classify(tensor, count, labels, where)
            outputs.append(
                OutputTensor(
                    name=name,
                    datatype="BYTES",
                    shape=(*tensor.shape[:-1], min(count, tensor.shape[-1])),
                    elements=tuple(s.encode("utf-8") for row in strings for s in row),
                    binary=as_binary,
                )
            )
        else:
            outputs.append(
                OutputTensor(
                    name=name,
                    datatype=datatype_of(tensor.dtype),
                    shape=tuple(tensor.shape),
                    tensor=tensor,
                    binary=as_binary,
                )
            )
    return outputs


def _classify(
    tensor: torch.Tensor, count: int, labels: Sequence[str] | None, where: str
) -> list[list[str]]:
    """Top-k as ``"<value>:<index>[:<label>]"`` strings (the classification extension)."""
    if tensor.dim() not in (1, 2) or tensor.shape[-1] == 0:
        raise RequestError(
            f"{where}: classification needs an output of shape [classes] or "
            f"[batch, classes], not {shape_text(list(tensor.shape))}"
        )
    rows = tensor.unsqueeze(0) if tensor.dim() == 1 else tensor
    k = min(count, rows.shape[-1])
    values, indices = torch.sort(rows, dim=-1, descending=True, stable=True)
    floating = tensor.is_floating_point()
    result = []
    for row_values, row_indices in zip(
        values[:, :k].tolist(), indices[:, :k].tolist(), strict=True
    ):
        row = []
        for value, index in zip(row_values, row_indices, strict=True):
            text = f"{float(value)!r}:{index}" if floating else f"{int(value)}:{index}"
            if labels is not None:
                text += f":{labels[index]}"
            row.append(text)
        result.append(row)
    return result


def render(
    model: ServedModel,
    request: InferenceRequest,
    outputs: Sequence[OutputTensor],
    compute_seconds: float,
) -> InferenceResult:
    """The REST response: JSON outputs, or binary parts for outputs that asked for them."""
    entries: list[dict[str, Any]] = []
    binary: list[bytes] = []
    for output in outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
        }
        if output.binary:
            part = output.raw()
            entry["parameters"] = {"binary_data_size": len(part)}
            binary.append(part)
        elif output.elements is not None:
            entry["data"] = [element.decode("utf-8") for element in output.elements]
        else:
            assert output.tensor is not None  # noqa: S101 - one of the two is set
            entry["data"] = encode_json(output.tensor)
        entries.append(entry)
    document: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if request.id is not None:
        document["id"] = request.id
    document["outputs"] = entries
    return InferenceResult(document=document, binary=tuple(binary), compute_seconds=compute_seconds)


# -- the whole path ------------------------------------------------------------------------------


def run(
    model: ServedModel, request: InferenceRequest, *, binary_default: bool | None = None
) -> tuple[list[OutputTensor], float]:
    """decode → forward → select outputs (a worker thread, never the event loop); returns the
    outputs and the seconds spent in the forward pass."""
    tensors = decode(model, request)
    start = time.perf_counter()
    produced = model.forward(tensors)
    compute = time.perf_counter() - start
    return select_outputs(model, request, produced, binary_default=binary_default), compute


def infer(model: ServedModel, request: InferenceRequest) -> InferenceResult:
    """One REST request: decode → forward → encode."""
    outputs, compute = run(model, request)
    return render(model, request, outputs, compute)
