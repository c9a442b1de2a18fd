from __future__ import annotations

import struct
from typing import Any

import pytest

from sealtorch._demo.pretrained import IMAGENET_PREPROCESS
from sealtorch.errors import ConfigError, PayloadError
from sealtorch.payloads.manifest import (
    ImagePreprocessSpec,
    Manifest,
    TensorSpec,
    parse_prefix,
    validate_arch_ref,
)
from sealtorch.sealed import canonical

FULL: dict[str, Any] = {
    "kind": "safetensors",
    "payload_size": 1000,
    "arch": "timm:efficientnet_lite0",
    "arch_kwargs": {"num_classes": 10, "drop_rate": 0.2, "names": ["a", None, True]},
    "metadata": {"owner": "me", "note": "ünïcode ✓"},
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
    "outputs": [TensorSpec(name="logits", datatype="FP32", shape=(-1, 1000))],
    "preprocess": IMAGENET_PREPROCESS,
    "labels": [f"class {i}" for i in range(1000)],
}


def _body(manifest: Manifest, payload: bytes | None = None) -> bytes:
    data = payload if payload is not None else bytes(manifest.payload_size)
    return manifest.encode_prefix() + data


def test_full_manifest_round_trip() -> None:
    manifest = Manifest.build(**FULL)
    body = _body(manifest)
    assert manifest.payload_offset % 64 == 0
    assert len(body) == manifest.plaintext_size
    parsed = parse_prefix(body, plaintext_size=len(body))
    assert parsed == manifest
    assert parsed.arch_kwargs == {"num_classes": 10, "drop_rate": 0.2, "names": ["a", None, True]}
    assert parsed.inputs is not None
    assert parsed.inputs[0].shape == (-1, 3, 224, 224)
    assert parsed.labels is not None
    assert len(parsed.labels) == 1000
    assert parsed.metadata["note"] == "ünïcode ✓"


def test_minimal_manifest() -> None:
    manifest = Manifest.build(kind="torchscript", payload_size=0)
    assert manifest.to_json() == {
        "metadata": {},
        "payload": {"kind": "torchscript", "offset": 128, "size": 0},
    }
    body = _body(manifest)
    assert parse_prefix(body, plaintext_size=len(body)) == manifest


@pytest.mark.parametrize("extra", [0, 1, 50, 59, 60, 61, 64, 200])
def test_offset_is_stable_across_length_boundaries(extra: int) -> None:
    manifest = Manifest.build(kind="safetensors", payload_size=5, metadata={"k": "x" * extra})
    prefix = manifest.encode_prefix()
    assert len(prefix) == manifest.payload_offset
    (length,) = struct.unpack(">I", prefix[:4])
    assert manifest.payload_offset == -(-(4 + length) // 64) * 64


def test_preprocess_is_what_the_inference_server_reads() -> None:
    spec = Manifest.build(**FULL).preprocess
    assert isinstance(spec, ImagePreprocessSpec)
    served = ImagePreprocessSpec.from_json(spec.to_json())
    assert served.resize == 256
    assert served.crop == 224
    assert served.mean == pytest.approx((0.485, 0.456, 0.406))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "pickle"}, "payload.kind"),
        ({"arch": "resnet50"}, "invalid architecture reference"),
        ({"arch": "torchvision:"}, "invalid architecture reference"),
        ({"arch_kwargs": {"bad key": 1}}, "not a Python identifier"),
        ({"arch_kwargs": {"x": float("nan")}}, "finite"),
        ({"arch_kwargs": {"x": object()}}, "JSON data"),
        ({"arch_kwargs": {"x": [[[[[1]]]]]}}, "nested too deeply"),
        ({"metadata": {"k": 1}}, "must be a string"),
        ({"metadata": {"": "v"}}, "non-empty"),
        ({"inputs": []}, "list of 1"),
        ({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1]}]}, "datatype"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-2]}]}, "shape"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "y": 1}]}, "unknown"),
        ({"inputs": [{"name": "bad name", "datatype": "FP32", "shape": []}]}, "name"),
        (
            {"outputs": [{"name": "x", "datatype": "FP32", "shape": []}] * 2},
            "unique",
        ),
        ({"preprocess": {**IMAGENET_PREPROCESS, "crop": 300}}, "crop"),
        ({"preprocess": {**IMAGENET_PREPROCESS, "std": [1, 0, 1]}}, "positive"),
        ({"preprocess": {**IMAGENET_PREPROCESS, "mean": [1, 2]}}, "mean"),
        ({"preprocess": {**IMAGENET_PREPROCESS, "type": "audio"}}, "type"),
        ({"preprocess": {**IMAGENET_PREPROCESS, "interpolation": "lanczos"}}, "interpolation"),
        ({"preprocess": {**IMAGENET_PREPROCESS, "rotate": 90}}, "unknown"),
        ({"labels": []}, "labels"),
        ({"labels": ["ok", 3]}, "labels"),
    ],
)
def test_invalid_user_values_are_config_errors(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Manifest.build(**{**FULL, **change})


def test_arch_only_for_state_dicts_and_kwargs_need_arch() -> None:
    with pytest.raises(ConfigError, match="carries its own architecture"):
        Manifest.build(kind="torchscript", payload_size=1, arch="timm:resnet18")
    with pytest.raises(ConfigError, match="need an architecture reference"):
        Manifest.build(kind="safetensors", payload_size=1, arch_kwargs={"a": 1})


@pytest.mark.parametrize(
    "ref", ["torchvision:resnet50", "timm:efficientnet_lite0", "my_pkg.models:build", "m:f"]
)
def test_valid_arch_refs(ref: str) -> None:
    assert validate_arch_ref(ref) == ref


@pytest.mark.parametrize(
    "ref", ["", "resnet50", "torchvision:", ":f", "a b:c", "pkg.:f", "pkg:f.g", "x" * 300, 3]
)
def test_invalid_arch_refs(ref: object) -> None:
    with pytest.raises(ConfigError, match="architecture reference"):
        validate_arch_ref(ref)


def _rebody(document: dict[str, Any], payload_size: int = 10) -> bytes:
    text = canonical.dumps(document)
    offset = -(-(4 + len(text)) // 64) * 64
    return (struct.pack(">I", len(text)) + text).ljust(offset, b"\0") + bytes(payload_size)


def _document(**payload: Any) -> dict[str, Any]:
    return {
        "metadata": {},
        "payload": {"kind": "safetensors", "offset": 128, "size": 10, **payload},
    }


def test_parse_prefix_accepts_a_hand_built_body() -> None:
    body = _rebody(_document())
    assert parse_prefix(body, plaintext_size=len(body)).payload_size == 10


@pytest.mark.parametrize(
    ("body_fn", "message"),
    [
        (lambda: _rebody(_document(size=11)), "size does not match"),
        (lambda: _rebody(_document(offset=192)), "offset does not follow"),
        (lambda: _rebody({**_document(), "extra": 1}), "unknown fields"),
        (lambda: _rebody({"payload": _document()["payload"]}), "missing"),
        (lambda: b"\x00\x00", "too short"),
        (lambda: b"\xff\xff\xff\xff" + bytes(100), "length is out of range"),
        (lambda: b"\x00\x00\x00\x02{}" + bytes(58), "missing"),
        (lambda: b"\x00\x00\x00\x03{ }" + bytes(57), "not canonical"),
    ],
)
def test_parse_prefix_rejects(body_fn: Any, message: str) -> None:
    body = body_fn()
    with pytest.raises(PayloadError, match=message) as info:
        parse_prefix(body, plaintext_size=len(body))
    assert "newer sealtorch" in str(info.value)


def test_nonzero_padding_is_rejected() -> None:
    body = bytearray(_rebody(_document()))
    body[100] = 1
    with pytest.raises(PayloadError, match="padding"):
        parse_prefix(bytes(body), plaintext_size=len(body))


def test_schema_level_canonical_form_is_required() -> None:
    """Integers where floats belong, or an omitted default, are refused (one encoding only)."""
    preprocess = {**IMAGENET_PREPROCESS, "mean": [0, 0, 0]}
    body = _rebody({**_document(), "preprocess": preprocess})
    with pytest.raises(PayloadError, match="canonical form"):
        parse_prefix(body, plaintext_size=len(body))
    no_default = {k: v for k, v in IMAGENET_PREPROCESS.items() if k != "interpolation"}
    body = _rebody({**_document(), "preprocess": no_default})
    with pytest.raises(PayloadError, match="canonical form"):
        parse_prefix(body, plaintext_size=len(body))


def test_carried_files_follow_the_payload() -> None:
    manifest = Manifest.build(
        kind="safetensors",
        payload_size=100,
        arch="transformers:GPT2LMHeadModel",
        files=[("config.json", 30), ("tokenizer.json", 0), ("vocab.txt", 7)],
    )
    start = manifest.payload_offset + 100
    assert manifest.file_ranges() == {
        "config.json": (start, start + 30),
        "tokenizer.json": (start + 30, start + 30),
        "vocab.txt": (start + 30, start + 37),
    }
    assert manifest.plaintext_size == start + 37
    body = manifest.encode_prefix() + bytes(137)
    assert parse_prefix(body, plaintext_size=len(body)) == manifest
    # The files belong to the body: a body without them (or with more) is refused.
    with pytest.raises(PayloadError, match="does not match the body size"):
        parse_prefix(body[:-1], plaintext_size=len(body) - 1)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([("../config.json", 1)], "plain file name"),
        ([("sub/config.json", 1)], "plain file name"),
        ([(".hidden", 1)], "plain file name"),
        ([("a", 1), ("a", 2)], "unique"),
        ([("a", -1)], "files\\[0\\].size"),
        ([("a", 2**30 + 1)], "files\\[0\\].size"),
        ([], "files must be a list of 1"),
        ([(f"f{i}", 1) for i in range(65)], "files must be a list of 1 to 64"),
    ],
)
def test_carried_files_are_validated(files: list[tuple[str, int]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Manifest.build(kind="safetensors", payload_size=10, files=files)


def test_carried_files_only_with_state_dicts() -> None:
    with pytest.raises(ConfigError, match="files apply to state_dict payloads"):
        Manifest.build(kind="torchscript", payload_size=10, files=[("config.json", 1)])


def test_transformers_references() -> None:
    assert validate_arch_ref("transformers:BertForSequenceClassification")
    for bad in (
        "transformers:",
        "transformers:a b",
        "transformers:x/y",
    ):
        with pytest.raises(ConfigError, match="transformers:CLASS"):
            validate_arch_ref(bad)


def test_a_transformers_reference_is_never_imported_as_a_factory() -> None:
    """``transformers:NAME`` also has the syntax of ``package.module:factory``; it must never
    be resolved by importing ``transformers`` and calling ``NAME``."""
    from sealtorch.payloads.arch import build_module, check_allowed_archs

    with pytest.raises(PayloadError, match=r"built from the model's config\.json"):
        build_module("transformers:AutoModel", {})
    with pytest.raises(ConfigError, match="always allowed"):
        check_allowed_archs(["transformers:pipeline"])
