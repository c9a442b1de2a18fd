"""The manifest: the private description of a sealed model, first thing in the encrypted body.

Body plaintext layout (``docs/format.md`` § Body plaintext)::

    u32be manifest length | manifest (canonical JSON) | zero padding to a multiple of 64 | payload

The manifest holds everything that is not public: payload kind, offset and size, the
architecture reference, user metadata, and the serving description (inputs, outputs,
preprocessing, labels). It is validated strictly: unknown or missing fields, wrong types and
out-of-range values are refused.

This module needs no PyTorch.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, cast

from sealtorch.errors import ConfigError, PayloadError
from sealtorch.sealed import canonical

__all__ = [
    "DATATYPES",
    "INTERPOLATIONS",
    "MANIFEST_ALIGNMENT",
    "PAYLOAD_ALIGNMENT",
    "PAYLOAD_KINDS",
    "ImagePreprocessSpec",
    "Manifest",
    "TensorSpec",
    "encode_prefix",
    "parse_prefix",
    "parse_tensor_specs",
    "validate_arch_ref",
]

PayloadKind = Literal["safetensors", "torchscript", "torch_export"]
PAYLOAD_KINDS: Final[tuple[str, ...]] = ("safetensors", "torchscript", "torch_export")
#: KServe v2 / Open Inference Protocol tensor data types sealtorch serves.
DATATYPES: Final[tuple[str, ...]] = (
    "FP32",
    "FP16",
    "BF16",
    "INT64",
    "INT32",
    "INT16",
    "INT8",
    "UINT8",
    "BOOL",
    "BYTES",
)
INTERPOLATIONS: Final[tuple[str, ...]] = ("nearest", "bilinear", "bicubic")
MANIFEST_ALIGNMENT: Final = 64
#: ``payload.align`` of an aligned safetensors payload (payload version 2).
PAYLOAD_ALIGNMENT: Final = 64
MAX_MANIFEST_SIZE: Final = 16 * 1024 * 1024
MAX_LABELS: Final = 1_000_000
MAX_TENSOR_SPECS: Final = 256
MAX_DIMS: Final = 32

_U32 = struct.Struct(">I")
_ARCH_HUB = re.compile(r"(torchvision|timm|transformers):([A-Za-z0-9_.-]{1,128})")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
#: Files a model carries besides its tensors (config, tokenizer): at most this many...
MAX_FILES: Final = 64
#: ...of at most this size each.
MAX_FILE_SIZE: Final = 1024 * 1024 * 1024
_ARCH_FACTORY = re.compile(
    r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):([A-Za-z_][A-Za-z0-9_]*)"
)
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}")
_KWARG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def validate_arch_ref(ref: object) -> str:
    """Check the syntax of an architecture reference (``torchvision:NAME``, ``timm:NAME``,
    ``transformers:CLASS``, ``package.module:factory``)."""
    if (
        isinstance(ref, str)
        and len(ref) <= 256
        and (_ARCH_HUB.fullmatch(ref) or _ARCH_FACTORY.fullmatch(ref))
    ):
        return ref
    raise ConfigError(
        f"invalid architecture reference {ref!r}: use torchvision:NAME (e.g. "
        "torchvision:resnet50), timm:NAME (e.g. timm:efficientnet_lite0), transformers:CLASS "
        "(e.g. transformers:GPT2LMHeadModel, with a sealed config.json) or "
        "package.module:factory (a function returning an nn.Module)"
    )


def _bad(message: str) -> ConfigError:
    return ConfigError(message)


def _int(value: object, name: str, *, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _bad(f"{name} must be an integer from {low} to {high}, not {value!r}")
    return value


def _str(value: object, name: str, *, max_length: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        raise _bad(f"{name} must be a non-empty string of at most {max_length} characters")
    return value


def _number(value: object, name: str) -> float:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or abs(value) > 1e15
    ):
        raise _bad(f"{name} must be a finite number")
    return float(value)


def _exact_keys(obj: Mapping[str, Any], name: str, required: set[str], optional: set[str]) -> None:
    keys = set(obj)
    missing = required - keys
    unknown = keys - required - optional
    if missing:
        raise _bad(f"{name} is missing {sorted(missing)}")
    if unknown:
        raise _bad(f"{name} has unknown fields {sorted(unknown)}")


def _object(value: object, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _bad(f"{name} must be an object with string keys")
    return cast(Mapping[str, Any], value)


def _list(value: object, name: str, *, max_items: int, min_items: int = 0) -> Sequence[Any]:
    if not isinstance(value, list | tuple) or not min_items <= len(value) <= max_items:
        raise _bad(f"{name} must be a list of {min_items} to {max_items} items")
    return value


def parse_tensor_specs(value: object, name: str) -> tuple[TensorSpec, ...]:
    """A JSON list of 1 to ``MAX_TENSOR_SPECS`` tensor specs with distinct names (the
    manifest's ``inputs``/``outputs``, ``serve --inputs/--outputs``); ConfigError otherwise."""
    items = _list(value, name, min_items=1, max_items=MAX_TENSOR_SPECS)
    result = tuple(TensorSpec.from_json(item, f"{name}[{i}]") for i, item in enumerate(items))
    if len({spec.name for spec in result}) != len(result):
        raise _bad(f"{name} names must be unique")
    return result


def _json_value(value: object, name: str, depth: int = 0) -> Any:
    """A JSON-compatible copy of an architecture keyword argument (finite floats allowed)."""
    if depth > 3:
        raise _bad(f"{name} is nested too deeply")
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if abs(value) > 2**53 - 1:
            raise _bad(f"{name} is too large an integer")
        return value
    if isinstance(value, float):
        return _number(value, name)
    if isinstance(value, list | tuple):
        return [_json_value(v, f"{name}[]", depth + 1) for v in _list(value, name, max_items=1024)]
    if isinstance(value, Mapping):
        return {
            _str(k, f"{name} key", max_length=128): _json_value(v, f"{name}.{k}", depth + 1)
            for k, v in _object(value, name).items()
        }
    raise _bad(f"{name} must be JSON data (string, number, boolean, null, list or object)")


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output of a served model (KServe v2 naming)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_json(cls, value: object, where: str) -> TensorSpec:
        obj = _object(value, where)
        _exact_keys(obj, where, {"name", "datatype", "shape"}, set())
        name = obj["name"]
        if not isinstance(name, str) or _TENSOR_NAME.fullmatch(name) is None:
            raise _bad(f"{where}.name must match {_TENSOR_NAME.pattern}")
        datatype = obj["datatype"]
        if datatype not in DATATYPES:
            raise _bad(f"{where}.datatype must be one of {', '.join(DATATYPES)}")
        shape = tuple(
            _int(d, f"{where}.shape[]", low=-1, high=2**31 - 1)
            for d in _list(obj["shape"], f"{where}.shape", max_items=MAX_DIMS)
        )
        return cls(name=name, datatype=str(datatype), shape=shape)

    def to_json(self) -> dict[str, Any]:
        return {"datatype": self.datatype, "name": self.name, "shape": list(self.shape)}


@dataclass(frozen=True)
class ImagePreprocessSpec:
    """Image preprocessing the inference server applies (resize, centre crop, normalise)."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @classmethod
    def from_json(cls, value: object, where: str = "preprocess") -> ImagePreprocessSpec:
        obj = _object(value, where)
        _exact_keys(obj, where, {"type", "resize", "crop", "mean", "std"}, {"interpolation"})
        if obj["type"] != "image":
            raise _bad(f"{where}.type must be 'image'")
        resize = _int(obj["resize"], f"{where}.resize", low=1, high=4096)
        crop = _int(obj["crop"], f"{where}.crop", low=1, high=resize)

        def triple(name: str) -> tuple[float, float, float]:
            items = _list(obj[name], f"{where}.{name}", min_items=3, max_items=3)
            a, b, c = (_number(v, f"{where}.{name}[]") for v in items)
            return (a, b, c)

        std = triple("std")
        if min(std) <= 0:
            raise _bad(f"{where}.std values must be positive")
        interpolation = obj.get("interpolation", "bilinear")
        if interpolation not in INTERPOLATIONS:
            raise _bad(f"{where}.interpolation must be one of {', '.join(INTERPOLATIONS)}")
        return cls(
            resize=resize,
            crop=crop,
            mean=triple("mean"),
            std=std,
            interpolation=str(interpolation),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "crop": self.crop,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "resize": self.resize,
            "std": list(self.std),
            "type": "image",
        }


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Manifest:
    """Everything private about a sealed model except the payload bytes themselves."""

    kind: PayloadKind
    payload_offset: int
    payload_size: int
    #: Where every tensor of a safetensors payload starts (64), or None: packed (written
    #: by sealtorch until 2026-12, payload layout 1; tensors only aligned to their element size).
    payload_align: int | None = None
    arch: str | None = None
    arch_kwargs: Mapping[str, Any] = field(default_factory=lambda: _frozen({}))
    metadata: Mapping[str, str] = field(default_factory=lambda: _frozen({}))
    inputs: tuple[TensorSpec, ...] | None = None
    outputs: tuple[TensorSpec, ...] | None = None
    preprocess: ImagePreprocessSpec | None = None
    labels: tuple[str, ...] | None = None
    #: Files carried after the payload, in order: ``(name, size)`` (config, tokenizer...).
    files: tuple[tuple[str, int], ...] | None = None

    # -- building from user input ---------------------------------------------------------

    @classmethod
    def build(
        cls,
        *,
        kind: str,
        payload_size: int,
        payload_align: int | None = None,
        arch: str | None = None,
        arch_kwargs: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
        inputs: Iterable[Mapping[str, Any] | TensorSpec] | None = None,
        outputs: Iterable[Mapping[str, Any] | TensorSpec] | None = None,
        preprocess: Mapping[str, Any] | ImagePreprocessSpec | None = None,
        labels: Iterable[str] | None = None,
        files: Iterable[tuple[str, int]] | None = None,
    ) -> Manifest:
        """Validate user-supplied values (ConfigError with the reason) and lay out the payload."""
        document: dict[str, Any] = {
            "metadata": dict(metadata or {}),
            "payload": {"kind": kind, "offset": 0, "size": payload_size},
        }
        if payload_align is not None:
            document["payload"]["align"] = payload_align
        if arch is not None:
            document["arch"] = {
                "kwargs": _json_value(dict(arch_kwargs or {}), "arch_kwargs"),
                "ref": arch,
            }
        elif arch_kwargs:
            raise ConfigError("architecture keyword arguments need an architecture reference")
        for name, specs in (("inputs", inputs), ("outputs", outputs)):
            if specs is not None:
                document[name] = [
                    s.to_json() if isinstance(s, TensorSpec) else dict(s) for s in specs
                ]
        if preprocess is not None:
            document["preprocess"] = (
                preprocess.to_json()
                if isinstance(preprocess, ImagePreprocessSpec)
                else {
                    **dict(preprocess),
                    "interpolation": preprocess.get("interpolation", "bilinear"),
                }
            )
        if labels is not None:
            document["labels"] = list(labels)
        if files is not None:
            document["files"] = [{"name": name, "size": size} for name, size in files]
        manifest = cls.from_json(document)
        # The offset depends on the manifest's own length: iterate until it is stable.
        for _ in range(4):
            offset = _payload_offset(len(canonical.dumps(manifest.to_json())))
            if offset == manifest.payload_offset:
                return manifest
            manifest = cls(**{**manifest.__dict__, "payload_offset": offset})
        raise AssertionError("manifest layout did not converge")  # pragma: no cover

    # -- JSON ---------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Manifest:
        obj = _object(document, "manifest")
        _exact_keys(
            obj,
            "manifest",
            {"metadata", "payload"},
            {"arch", "inputs", "outputs", "preprocess", "labels", "files"},
        )
        payload = _object(obj["payload"], "payload")
        _exact_keys(payload, "payload", {"kind", "offset", "size"}, {"align"})
        kind = payload["kind"]
        if kind not in PAYLOAD_KINDS:
            raise _bad(f"payload.kind must be one of {', '.join(PAYLOAD_KINDS)}, not {kind!r}")
        offset = _int(payload["offset"], "payload.offset", low=0, high=2**53 - 1)
        size = _int(payload["size"], "payload.size", low=0, high=2**53 - 1)
        align: int | None = None
        if "align" in payload:
            if kind != "safetensors":
                raise _bad(f"payload.align applies to safetensors payloads, not {kind}")
            align = _int(payload["align"], "payload.align", low=1, high=2**31 - 1)
            if align != PAYLOAD_ALIGNMENT:
                raise _bad(f"payload.align must be {PAYLOAD_ALIGNMENT}, not {align}")

        arch: str | None = None
        arch_kwargs: dict[str, Any] = {}
        if "arch" in obj:
            arch_obj = _object(obj["arch"], "arch")
            _exact_keys(arch_obj, "arch", {"ref", "kwargs"}, set())
            arch = validate_arch_ref(arch_obj["ref"])
            kwargs = _object(arch_obj["kwargs"], "arch.kwargs")
            for name in kwargs:
                if _KWARG_NAME.fullmatch(name) is None:
                    raise _bad(f"arch.kwargs key {name!r} is not a Python identifier")
            arch_kwargs = _json_value(kwargs, "arch.kwargs")
            if kind != "safetensors":
                raise _bad(f"a {kind} payload carries its own architecture; drop the arch")

        metadata = _object(obj["metadata"], "metadata")
        if len(metadata) > 1024:
            raise _bad("metadata holds more than 1024 entries")
        for key, value in metadata.items():
            _str(key, "metadata key", max_length=128)
            if not isinstance(value, str) or len(value) > 65536:
                raise _bad(f"metadata value of {key!r} must be a string (at most 64 KiB)")

        def specs(name: str) -> tuple[TensorSpec, ...] | None:
            return parse_tensor_specs(obj[name], name) if name in obj else None

        labels: tuple[str, ...] | None = None
        if "labels" in obj:
            items = _list(obj["labels"], "labels", min_items=1, max_items=MAX_LABELS)
            labels = tuple(_str(label, "labels[]", max_length=1024) for label in items)

        files: tuple[tuple[str, int], ...] | None = None
        if "files" in obj:
            if kind != "safetensors":
                raise _bad(f"files apply to state_dict payloads, not {kind}")
            items = _list(obj["files"], "files", min_items=1, max_items=MAX_FILES)
            entries = []
            for i, item in enumerate(items):
                entry = _object(item, f"files[{i}]")
                _exact_keys(entry, f"files[{i}]", {"name", "size"}, set())
                name = entry["name"]
                if not isinstance(name, str) or _FILE_NAME.fullmatch(name) is None:
                    raise _bad(
                        f"files[{i}].name must be a plain file name ([A-Za-z0-9_.-], at most "
                        f"128 characters), not {name!r}"
                    )
                entries.append(
                    (name, _int(entry["size"], f"files[{i}].size", low=0, high=MAX_FILE_SIZE))
                )
            if len({name for name, _ in entries}) != len(entries):
                raise _bad("files names must be unique")
            files = tuple(entries)

        return cls(
            kind=cast(PayloadKind, kind),
            payload_offset=offset,
            payload_size=size,
            payload_align=align,
            arch=arch,
            arch_kwargs=_frozen(arch_kwargs),
            metadata=_frozen(metadata),
            inputs=specs("inputs"),
            outputs=specs("outputs"),
            preprocess=(
                ImagePreprocessSpec.from_json(obj["preprocess"]) if "preprocess" in obj else None
            ),
            labels=labels,
            files=files,
        )

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "metadata": dict(self.metadata),
            "payload": {
                "kind": self.kind,
                "offset": self.payload_offset,
                "size": self.payload_size,
            },
        }
        if self.payload_align is not None:
            document["payload"]["align"] = self.payload_align
        if self.arch is not None:
            document["arch"] = {"kwargs": _thaw(self.arch_kwargs), "ref": self.arch}
        if self.inputs is not None:
            document["inputs"] = [spec.to_json() for spec in self.inputs]
        if self.outputs is not None:
            document["outputs"] = [spec.to_json() for spec in self.outputs]
        if self.preprocess is not None:
            document["preprocess"] = self.preprocess.to_json()
        if self.labels is not None:
            document["labels"] = list(self.labels)
        if self.files is not None:
            document["files"] = [{"name": name, "size": size} for name, size in self.files]
        return document

    # -- the body prefix ----------------------------------------------------------------------

    @property
    def plaintext_size(self) -> int:
        """Size of the whole body plaintext: prefix, padding, payload and files."""
        return self.payload_offset + self.payload_size + sum(size for _, size in self.files or ())

    def file_ranges(self) -> dict[str, tuple[int, int]]:
        """Each carried file's ``(start, end)`` in the body plaintext (after the payload)."""
        ranges = {}
        position = self.payload_offset + self.payload_size
        for name, size in self.files or ():
            ranges[name] = (position, position + size)
            position += size
        return ranges

    def encode_prefix(self) -> bytes:
        return encode_prefix(self)


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_thaw(v) for v in value]
    return value


def _payload_offset(manifest_length: int) -> int:
    return -(-(4 + manifest_length) // MANIFEST_ALIGNMENT) * MANIFEST_ALIGNMENT


def encode_prefix(manifest: Manifest) -> bytes:
    """``u32be length ‖ canonical manifest ‖ zero padding``: the body bytes before the payload."""
    text = canonical.dumps(manifest.to_json())
    if len(text) > MAX_MANIFEST_SIZE:
        raise ConfigError("the manifest is larger than 16 MiB (too many labels or metadata?)")
    offset = _payload_offset(len(text))
    if offset != manifest.payload_offset:  # pragma: no cover - Manifest.build guarantees it
        raise ConfigError("manifest payload offset does not match its layout")
    return (_U32.pack(len(text)) + text).ljust(offset, b"\x00")


def parse_prefix(plaintext: bytes | mmap.mmap, *, plaintext_size: int) -> Manifest:
    """Parse and validate the manifest at the start of an authenticated body plaintext.

    ``plaintext`` is sliced (which copies for ``bytes`` and ``mmap``), so no view of it is held.
    Raises :class:`PayloadError` (the body authenticated, so the details may be specific).
    """
    try:
        if plaintext_size < 4:
            raise PayloadError("the body is too short to hold a manifest")
        (length,) = _U32.unpack(plaintext[:4])
        if length > MAX_MANIFEST_SIZE or 4 + length > plaintext_size:
            raise PayloadError("the manifest length is out of range")
        text = bytes(plaintext[4 : 4 + length])
        try:
            document = canonical.loads(text, allow_floats=True)
            manifest = Manifest.from_json(document)
        except canonical.NotCanonicalError as exc:
            raise PayloadError(f"the manifest is not canonical JSON ({exc})") from exc
        except ConfigError as exc:
            raise PayloadError(f"the manifest is invalid: {exc}") from exc
        if canonical.dumps(manifest.to_json()) != text:
            raise PayloadError("the manifest is not in its canonical form")
        if manifest.payload_offset != _payload_offset(length):
            raise PayloadError("the manifest's payload offset does not follow its length")
        if manifest.plaintext_size != plaintext_size:
            raise PayloadError("the manifest's payload size does not match the body size")
        if plaintext[4 + length : manifest.payload_offset].strip(b"\x00"):
            raise PayloadError("the padding after the manifest is not zero")
    except PayloadError as exc:
        raise PayloadError(
            f"this sealed model's contents are not understood: {exc} "
            "(was it written by a newer sealtorch?)"
        ) from exc
    return manifest
