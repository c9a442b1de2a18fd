"""A model ready to serve: its interface (inputs, outputs), warm-up, and inference.

A :class:`ServedModel` is built from a module plus what the sealed manifest declares. Anything
the manifest leaves out is inferred, in this order (``docs/serving.md`` § Model metadata):

inputs
    1. declared at sealing (``inputs=``; a single ``BYTES`` input with ``preprocess`` makes an
       image-only model);
    2. with image ``preprocess``: one ``FP32 [-1, 3, crop, crop]`` input named ``input``;
    3. a ``torch.export`` program: its placeholders (names, dtypes; dynamic dims are -1);
    4. a timm model: its ``pretrained_cfg["input_size"]``;
    5. the first convolution, linear or embedding layer in registration order
       (``Conv2d(3, ...)`` → ``FP32 [-1, 3, -1, -1]``);
    otherwise loading fails and asks for ``inputs=`` at sealing.

outputs
    declared at sealing (checked against the warm-up: count, datatype, rank), or named
    ``output`` / ``output_0``, ``output_1``... (dict outputs keep their keys) with the dtype and
    shape of the warm-up result; the batch dimension is -1 when it follows the input batch.

The warm-up runs the model on zeros (batch 1, and 224 for every other variable dimension),
and once more through the image path for image models. A model that fails its warm-up does
not load. Models with ``labels`` get a ``probabilities`` output (softmax of the labelled
output) and label strings in classification results.

A transformers model (``transformers:CLASS``) follows its config instead
(:mod:`sealtorch.serving.text`): inputs ``input_ids``, ``attention_mask`` (``token_type_ids``
where it has token types), ``INT64 [-1, -1]``; a ``BYTES`` input ``text`` when it carries a
tokenizer; warm-ups at two sequence lengths within its ``max_position_embeddings`` (batch 1
and 2), so that output dimensions that follow the sequence length are -1 as well; a
classifier's labels from ``id2label`` unless labels were given at sealing.
"""

from __future__ import annotations

import io
import itertools
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import torch
from torch import nn

from sealtorch.errors import ConfigError, PayloadError
from sealtorch.payloads.manifest import ImagePreprocessSpec, TensorSpec
from sealtorch.serving.errors import RequestError
from sealtorch.serving.preprocess import ImageDecodeError, preprocess_image
from sealtorch.serving.protocol import shape_text
from sealtorch.serving.tensors import DTYPES, datatype_of
from sealtorch.serving.text import (
    CLASSIFIER,
    TextModel,
    TransformersAdapter,
    config_labels,
    text_inputs,
    transformers_model,
)

if TYPE_CHECKING:
    from sealtorch.api import SealedModel

__all__ = [
    "IMAGE_INPUT",
    "PROBABILITIES",
    "TEXT_INPUT",
    "WARMUP_SIZE",
    "ServedModel",
    "check_model_name",
]

_log = logging.getLogger(__name__)

#: Size used for variable non-batch dimensions during the warm-up inference.
WARMUP_SIZE: Final = 224
#: Name of the encoded-image input of image models (``image_bytes`` if the model uses "image").
IMAGE_INPUT: Final = "image"
#: Name of the text input of transformers models that carry a tokenizer.
TEXT_INPUT: Final = "text"
#: Sequence lengths of a transformers model's two warm-ups (at most its positions).
_TEXT_WARMUP: Final = (16, 8)
#: Name of the softmax output added to models with labels.
PROBABILITIES: Final = "probabilities"
DEFAULT_MAX_IMAGES: Final = 64

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}")
_MODEL_ERRORS = (RuntimeError, ValueError, IndexError, TypeError, AssertionError, KeyError)


def check_model_name(name: str, *, what: str = "model name") -> str:
    """A model name or version must be one URL path segment: letters, digits, ``_ . -``."""
    if _NAME.fullmatch(name) is None:
        raise ConfigError(
            f"{what} {name!r} must be 1-128 letters, digits, '_', '.' or '-' "
            "(starting with a letter or digit)"
        )
    return name


# -- interface inference -----------------------------------------------------------------------


def _symbolic_dims(value: Any) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else -1 for d in value.shape)


def _export_inputs(module: nn.Module) -> list[TensorSpec] | None:
    if not isinstance(module, torch.fx.GraphModule):
        return None
    specs = []
    for index, node in enumerate(n for n in module.graph.nodes if n.op == "placeholder"):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None  # a non-tensor input (an int, a list...): needs a declaration
        name = node.name if _TENSOR_NAME.fullmatch(node.name) else f"input_{index}"
        specs.append(
            TensorSpec(name=name, datatype=datatype_of(value.dtype), shape=_symbolic_dims(value))
        )
    return specs or None


def _int_attribute(module: nn.Module, name: str) -> int:
    value = getattr(module, name, None)
    if not isinstance(value, int):
        raise PayloadError(f"cannot read {name} of the model's first layer; declare its inputs")
    return value


def _first_layer_input(module: nn.Module) -> list[TensorSpec] | None:
    for sub in module.modules():
        kind = getattr(sub, "original_name", type(sub).__name__)  # ScriptModules too
        if kind in ("Conv1d", "Conv2d", "Conv3d"):
            spatial = int(kind[4])
            shape = (-1, _int_attribute(sub, "in_channels"), *([-1] * spatial))
            return [TensorSpec(name="input", datatype="FP32", shape=shape)]
        if kind == "Linear":
            shape = (-1, _int_attribute(sub, "in_features"))
            return [TensorSpec(name="input", datatype="FP32", shape=shape)]
        if kind in ("Embedding", "EmbeddingBag"):
            return [TensorSpec(name="input", datatype="INT64", shape=(-1, -1))]
    return None


def _infer_inputs(module: nn.Module, preprocess: ImagePreprocessSpec | None) -> list[TensorSpec]:
    if preprocess is not None:
        return [
            TensorSpec(
                name="input", datatype="FP32", shape=(-1, 3, preprocess.crop, preprocess.crop)
            )
        ]
    exported = _export_inputs(module)
    if exported is not None:
        return exported
    config = getattr(module, "pretrained_cfg", None)
    if isinstance(config, Mapping):
        size = config.get("input_size")
        if isinstance(size, Sequence) and size and all(isinstance(d, int) for d in size):
            return [TensorSpec(name="input", datatype="FP32", shape=(-1, *size))]
    layer = _first_layer_input(module)
    if layer is not None:
        return layer
    raise PayloadError(
        "cannot tell what this model takes as input; declare its inputs when sealing "
        '(sealtorch encrypt --inputs \'[{"name": "input", "datatype": "FP32", '
        '"shape": [-1, ...]}]\', or encrypt_model(..., inputs=[...]))'
    )


def _eval_mode(module: nn.Module) -> None:
    if not any(sub.training for sub in module.modules()):
        return
    try:
        module.eval()
    except NotImplementedError:  # torch.export graphs refuse eval(); the flags still matter
        for sub in module.modules():
            sub.training = False


def _dummy(spec: TensorSpec, batch: int, size: int = WARMUP_SIZE) -> torch.Tensor:
    shape = [
        (batch if index == 0 else size) if dim == -1 else dim
        for index, dim in enumerate(spec.shape)
    ]
    if spec.name == "attention_mask":  # a transformers model: attend to every token
        return torch.ones(shape, dtype=DTYPES[spec.datatype])
    return torch.zeros(shape, dtype=DTYPES[spec.datatype])


def _is_model_output(value: object) -> bool:
    """A transformers ``ModelOutput`` (which may carry a cache besides its tensors)."""
    return any(
        cls.__name__ == "ModelOutput" and cls.__module__.startswith("transformers.")
        for cls in type(value).__mro__
    )


def _flatten_outputs(value: object) -> list[tuple[str | None, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        return [(None, value)]
    if isinstance(value, Mapping):
        items = list(value.items())
        if _is_model_output(value):  # logits and hidden states; caches are not served
            items = [(k, v) for k, v in items if isinstance(v, torch.Tensor)]
        if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in items):
            return [(str(k), v) for k, v in items]
    if isinstance(value, tuple | list) and all(isinstance(v, torch.Tensor) for v in value):
        fields = getattr(value, "_fields", None)  # NamedTuple
        if fields is not None:
            return list(zip(fields, value, strict=True))
        return [(None, v) for v in value]
    raise PayloadError(
        f"the model returns a {type(value).__name__}; served models must return a tensor, "
        "a tuple/list of tensors, or a dict of named tensors"
    )


def _synthetic_png(width: int, height: int) -> bytes:
    """A deterministic, non-uniform test image (exercises decoding, resizing and cropping)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 7) % 256, (y * 5) % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


# -- the served model --------------------------------------------------------------------------


class ServedModel:
    """A decrypted, warmed-up model and its interface: tensors in, tensors out.

    It knows nothing of the wire format: :mod:`sealtorch.serving.codec` checks requests against
    the interface (:attr:`inputs`, :attr:`outputs`...) and renders the results. Thread-safe:
    :meth:`forward` may run in several threads at once (``torch.inference_mode``, no state is
    changed).
    """

    platform: Final = "pytorch"

    def __init__(
        self,
        *,
        name: str,
        version: str,
        module: nn.Module,
        inputs: tuple[TensorSpec, ...],
        public_inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        image_input: TensorSpec | None,
        preprocess: ImagePreprocessSpec | None,
        text: TextModel | None = None,
        text_input: TensorSpec | None = None,
        labels: tuple[str, ...] | None,
        labelled_output: int | None,
        derived_probabilities: bool,
        sealed: bool,
        max_images: int,
    ) -> None:
        self.name = name
        self.version = version
        self.module = module
        #: Where the weights are (``serve --device``), None for host memory.
        self.device = _device_of(module)
        self.inputs = inputs
        self.public_inputs = public_inputs
        self.outputs = outputs
        self.image_input = image_input
        #: The transformers model behind :attr:`module` (tokenizer, generation), or None.
        self.text = text
        #: The BYTES text input (tokenized with the sealed tokenizer), or None.
        self.text_input = text_input
        self.preprocess = preprocess
        self.labels = labels
        self.labelled_output = labelled_output
        self.derived_probabilities = derived_probabilities
        self.sealed = sealed
        self.max_images = max_images
        self.load_seconds = 0.0
        #: Seconds per load phase: key_release, decrypt, build, warmup (sealed models).
        self.load_phases: dict[str, float] = {}
        self._output_index = {spec.name: i for i, spec in enumerate(outputs)}

    def __repr__(self) -> str:
        return f"ServedModel(name={self.name!r}, version={self.version!r}, sealed={self.sealed})"

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def from_sealed(
        cls,
        sealed: SealedModel,
        *,
        name: str | None = None,
        max_images: int = DEFAULT_MAX_IMAGES,
        inputs: Iterable[TensorSpec] | None = None,
        outputs: Iterable[TensorSpec] | None = None,
    ) -> ServedModel:
        """Serve a model loaded with :func:`sealtorch.api.load_sealed_model`.

        The name defaults to the sealed file's model id; the version is the manifest's
        ``version`` metadata entry, or ``"1"``. ``inputs`` / ``outputs`` replace what the
        manifest declares (``sealtorch serve --inputs/--outputs``).
        """
        manifest = sealed.manifest
        return cls.build(
            sealed.module,
            name=name if name is not None else sealed.info.model_id,
            version=manifest.metadata.get("version", "1"),
            inputs=inputs if inputs is not None else manifest.inputs,
            outputs=outputs if outputs is not None else manifest.outputs,
            preprocess=manifest.preprocess,
            labels=manifest.labels,
            sealed=True,
            max_images=max_images,
            files=sealed.files,
        )

    @classmethod
    def build(
        cls,
        module: nn.Module,
        *,
        name: str,
        version: str = "1",
        inputs: Iterable[TensorSpec] | None = None,
        outputs: Iterable[TensorSpec] | None = None,
        preprocess: ImagePreprocessSpec | None = None,
        labels: Iterable[str] | None = None,
        sealed: bool,
        max_images: int = DEFAULT_MAX_IMAGES,
        files: Mapping[str, bytes] | None = None,
    ) -> ServedModel:
        """Resolve the interface, run the warm-up inference(s) and return the ready model.

        ``sealed`` says whether the weights came from a sealed file; unsealed models are served
        only through this Python API (benchmarks, notebooks), never by ``sealtorch serve``.
        ``files``: the files a transformers model carries (its tokenizer). Raises
        :class:`~sealtorch.errors.PayloadError` if the model does not run on its own declared
        or inferred inputs.
        """
        check_model_name(name)
        check_model_name(version, what="model version")
        if max_images < 1:
            raise ConfigError("max_images must be at least 1")
        _eval_mode(module)
        declared = tuple(inputs) if inputs is not None else None
        label_list = tuple(labels) if labels is not None else None
        sizes = (WARMUP_SIZE, WARMUP_SIZE)
        text: TextModel | None = None
        text_input: TensorSpec | None = None
        hf = transformers_model(module)
        if hf is not None:
            if preprocess is not None:
                raise PayloadError("a transformers model takes no image preprocessing")
            module, declared, text, text_input = _transformers_interface(hf, declared, files)
            if label_list is None and text.kind == CLASSIFIER:
                label_list = config_labels(hf)
            positions = text.max_positions
            first_size, second_size = (
                min(size, positions) if positions else size for size in _TEXT_WARMUP
            )
            sizes = (first_size, second_size)
        tensor_inputs, public_inputs, image_input = _resolve_inputs(module, declared, preprocess)

        first = _warm_up(module, name, [_dummy(spec, 1, sizes[0]) for spec in tensor_inputs])
        second = None
        declared_outputs = tuple(outputs) if outputs is not None else None
        if declared_outputs is None and any(
            spec.shape and spec.shape[0] == -1 for spec in tensor_inputs
        ):
            second = _warm_up(module, name, [_dummy(spec, 2, sizes[1]) for spec in tensor_inputs])
        output_specs = _resolve_outputs(name, first, second, declared_outputs)

        labelled: int | None = None
        derived = False
        if label_list is not None:
            labelled = _labelled_output(name, output_specs, len(label_list))
            spec = output_specs[labelled]
            if spec.datatype in ("FP16", "FP32", "FP64", "BF16") and not any(
                o.name == PROBABILITIES for o in output_specs
            ):
                output_specs = (
                    *output_specs,
                    TensorSpec(name=PROBABILITIES, datatype=spec.datatype, shape=spec.shape),
                )
                derived = True
        model = cls(
            name=name,
            version=version,
            module=module,
            inputs=tensor_inputs,
            public_inputs=public_inputs,
            outputs=output_specs,
            image_input=image_input,
            preprocess=preprocess,
            text=text,
            text_input=text_input,
            labels=label_list,
            labelled_output=labelled,
            derived_probabilities=derived,
            sealed=sealed,
            max_images=max_images,
        )
        if preprocess is not None:
            model._warm_up_images()
        return model

    def _warm_up_images(self) -> None:
        assert self.preprocess is not None  # noqa: S101 - only called for image models
        crop = self.preprocess.crop
        image = preprocess_image(_synthetic_png(crop + 7, crop + 3), self.preprocess)
        batch = image.unsqueeze(0).to(DTYPES[self.inputs[0].datatype])
        _warm_up(self.module, self.name, [batch])

    # -- inference (tensors in, tensors out) ------------------------------------------------

    def images(self, elements: Sequence[bytes], where: str) -> torch.Tensor:
        """The input batch of encoded images (decoded, preprocessed, stacked)."""
        assert self.preprocess is not None  # noqa: S101 - image_input implies preprocess
        images = []
        for index, data in enumerate(elements):
            try:
                images.append(preprocess_image(data, self.preprocess))
            except ImageDecodeError as exc:
                raise RequestError(f"{where}[{index}]: {exc}") from exc
        return torch.stack(images).to(DTYPES[self.inputs[0].datatype])

    def forward(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The model's outputs for ``tensors`` (its :attr:`inputs`, in order), without the
        derived probabilities (:meth:`output` computes them). Call from a worker thread."""
        try:
            produced = _run(self.module, tensors, self.device)
        except _MODEL_ERRORS as exc:
            # The model's own message may describe its private layers (weight shapes...):
            # never pass it on, and log only its type.
            _log.info("model %s rejected an input (%s)", self.name, type(exc).__name__)
            raise RequestError(
                f"model {self.name!r} could not run on this input; check the shapes and "
                f"datatypes against GET /v2/models/{self.name}"
            ) from exc
        except PayloadError as exc:
            raise RuntimeError(f"model {self.name} returned an unexpected structure") from exc
        real = len(self.outputs) - (1 if self.derived_probabilities else 0)
        if len(produced) != real:
            raise RuntimeError(
                f"model {self.name} returned {len(produced)} outputs; its warm-up returned {real}"
            )
        return [tensor for _, tensor in produced]

    def output_position(self, name: str) -> int | None:
        """The position of output ``name`` in :attr:`outputs`, or None."""
        return self._output_index.get(name)

    def output(self, produced: Sequence[torch.Tensor], position: int) -> torch.Tensor:
        """Output ``position`` of a :meth:`forward` result (the derived probabilities too)."""
        if position < len(produced):
            return produced[position]
        assert self.labelled_output is not None  # noqa: S101 - only derived probabilities
        return torch.softmax(produced[self.labelled_output], dim=-1)

    def is_labelled(self, position: int) -> bool:
        """Whether output ``position`` is ranked over :attr:`labels` (classification)."""
        return position == self.labelled_output or (
            self.derived_probabilities and position == len(self.outputs) - 1
        )


# -- helpers of build() ------------------------------------------------------------------------


def _transformers_interface(
    hf: Any, declared: tuple[TensorSpec, ...] | None, files: Mapping[str, bytes] | None
) -> tuple[nn.Module, tuple[TensorSpec, ...], TextModel, TensorSpec | None]:
    """(the adapter to call, its tensor inputs, the text model, the BYTES text input).

    Declared tensor inputs replace the defaults (their names are forward's arguments); a
    declared BYTES input names the text input.
    """
    encoded = [spec for spec in declared or () if spec.datatype == "BYTES"]
    if len(encoded) > 1 or any(spec.shape != (-1,) for spec in encoded):
        raise PayloadError(
            "a transformers model takes at most one BYTES (text) input, of shape [-1]"
        )
    specs = tuple(spec for spec in declared or () if spec.datatype != "BYTES") or text_inputs(hf)
    names = [spec.name for spec in specs]
    text = TextModel.from_files(hf, files or {}, names)
    adapter = TransformersAdapter(hf, names, text.kind)
    text_input = None
    if text.tokenizer is not None:
        text_name = encoded[0].name if encoded else TEXT_INPUT
        if text_name in names:
            raise PayloadError(f"the text input {text_name!r} clashes with a tensor input")
        text_input = TensorSpec(name=text_name, datatype="BYTES", shape=(-1,))
    elif encoded:
        raise PayloadError(
            f"input {encoded[0].name!r} is text (BYTES), but the sealed model carries no "
            "tokenizer files"
        )
    return adapter, specs, text, text_input


def _resolve_inputs(
    module: nn.Module,
    declared: tuple[TensorSpec, ...] | None,
    preprocess: ImagePreprocessSpec | None,
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], TensorSpec | None]:
    """(inputs the module is called with, inputs a request may send, the image input)."""
    image_tensor = (
        TensorSpec(name="input", datatype="FP32", shape=(-1, 3, preprocess.crop, preprocess.crop))
        if preprocess is not None
        else None
    )
    if declared is not None:
        encoded = [spec for spec in declared if spec.datatype == "BYTES"]
        if encoded:
            if preprocess is None or image_tensor is None:
                raise PayloadError(
                    f"input {encoded[0].name!r} is BYTES, which sealtorch serves only as "
                    "encoded images: seal the model with image preprocessing (preprocess=)"
                )
            if len(declared) != 1 or len(encoded[0].shape) != 1:
                raise PayloadError(
                    "an encoded-image (BYTES) input must be the model's only input, of shape [-1]"
                )
            only = TensorSpec(name=encoded[0].name, datatype="BYTES", shape=(-1,))
            return (image_tensor,), (), only
        for spec in declared:
            if spec.datatype not in DTYPES:  # pragma: no cover - the manifest checks it
                raise PayloadError(f"input {spec.name!r} has unsupported datatype {spec.datatype}")
        tensor_inputs = declared
    else:
        tensor_inputs = tuple(_infer_inputs(module, preprocess))
    image: TensorSpec | None = None
    if preprocess is not None:
        if len(tensor_inputs) != 1:
            raise PayloadError(
                "image preprocessing needs a model with exactly one input tensor; "
                f"this one declares {len(tensor_inputs)}"
            )
        (spec,) = tensor_inputs
        expected = (3, preprocess.crop, preprocess.crop)
        if len(spec.shape) != 4 or any(
            want not in (-1, got) for want, got in zip(spec.shape[1:], expected, strict=True)
        ):
            raise PayloadError(
                f"input {spec.name!r} is declared {shape_text(spec.shape)}, but the image "
                f"preprocessing produces [batch, 3, {preprocess.crop}, {preprocess.crop}]"
            )
        names = {spec.name for spec in tensor_inputs}
        image_name = IMAGE_INPUT if IMAGE_INPUT not in names else f"{IMAGE_INPUT}_bytes"
        image = TensorSpec(name=image_name, datatype="BYTES", shape=(-1,))
    return tensor_inputs, tensor_inputs, image


def _device_of(module: nn.Module) -> torch.device | None:
    """The accelerator the module's weights are on (``serve --device``), None for host memory."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return None if tensor.device.type == "cpu" else tensor.device
    return None


def _run(
    module: nn.Module, tensors: Sequence[torch.Tensor], device: torch.device | None
) -> list[tuple[str | None, torch.Tensor]]:
    """The module's flattened outputs: inputs go to ``device``, outputs come back to the host
    (neither happens for a model in host memory)."""
    if device is not None:
        tensors = [tensor.to(device) for tensor in tensors]
    with torch.inference_mode():
        produced = _flatten_outputs(module(*tensors))
    if device is None:
        return produced
    return [(name, tensor.cpu()) for name, tensor in produced]


def _warm_up(
    module: nn.Module, name: str, tensors: list[torch.Tensor]
) -> list[tuple[str | None, torch.Tensor]]:
    try:
        return _run(module, tensors, _device_of(module))
    except _MODEL_ERRORS as exc:
        shapes = ", ".join(f"{datatype_of(t.dtype)} {shape_text(list(t.shape))}" for t in tensors)
        raise PayloadError(
            f"model {name!r} failed its warm-up inference on zeros ({shapes}): "
            f"{type(exc).__name__}. Declare the model's inputs (and outputs) when sealing "
            "so that they match what it takes"
        ) from exc


def _resolve_outputs(
    name: str,
    first: list[tuple[str | None, torch.Tensor]],
    second: list[tuple[str | None, torch.Tensor]] | None,
    declared: tuple[TensorSpec, ...] | None,
) -> tuple[TensorSpec, ...]:
    for output_name, tensor in first:
        try:
            datatype_of(tensor.dtype)
        except ValueError as exc:
            raise PayloadError(f"model {name!r}: output {output_name or ''} {exc}") from exc
    if declared is not None:
        if len(declared) != len(first):
            raise PayloadError(
                f"model {name!r} declares {len(declared)} outputs but returns {len(first)}"
            )
        for spec, (_, tensor) in zip(declared, first, strict=True):
            actual = datatype_of(tensor.dtype)
            if spec.datatype != actual or len(spec.shape) != tensor.dim():
                raise PayloadError(
                    f"model {name!r} declares output {spec.name!r} as {spec.datatype} "
                    f"{shape_text(spec.shape)}, but returns {actual} "
                    f"{shape_text(list(tensor.shape))}"
                )
        return declared
    specs = []
    for index, (key, tensor) in enumerate(first):
        if key is not None and _TENSOR_NAME.fullmatch(key):
            output_name = key
        else:
            output_name = "output" if len(first) == 1 else f"output_{index}"
        shape = list(tensor.shape)
        other = second[index][1] if second is not None else None
        # Dimensions that follow the input batch (or a transformers model's sequence length).
        if other is not None and other.dim() == tensor.dim():
            shape = [-1 if a != b else a for a, b in zip(shape, other.shape, strict=True)]
        specs.append(
            TensorSpec(name=output_name, datatype=datatype_of(tensor.dtype), shape=tuple(shape))
        )
    if len({spec.name for spec in specs}) != len(specs):
        raise PayloadError(f"model {name!r} returns outputs with clashing names")
    return tuple(specs)


def _labelled_output(name: str, outputs: Sequence[TensorSpec], count: int) -> int:
    for index, spec in enumerate(outputs):
        if 1 <= len(spec.shape) <= 2 and spec.shape[-1] == count:
            return index
    shapes = ", ".join(f"{spec.name} {shape_text(spec.shape)}" for spec in outputs)
    raise PayloadError(
        f"model {name!r} has {count} labels but no output of shape [{count}] or "
        f"[batch, {count}] ({shapes}); check the labels given at sealing"
    )
