"""``transformers:CLASS`` architecture references: a model rebuilt from its sealed config.

The class is never imported by name from the file. The sealed ``config.json`` names a
``model_type``, which must be one of transformers' own configuration classes
(``CONFIG_MAPPING``); ``CLASS`` must then be the class that one of the allowed Auto classes
maps that configuration to:

* ``AutoModel`` (``MODEL_MAPPING``), e.g. ``BertModel``
* ``AutoModelForSequenceClassification``, e.g. ``BertForSequenceClassification``
* ``AutoModelForCausalLM``, e.g. ``GPT2LMHeadModel``

so only classes that ship with the installed transformers are built, through its own tables.
Never ``trust_remote_code``: a config with ``auto_map`` (code in a Hub repository) is refused,
as are quantization configs and attention implementations other than ``eager`` and ``sdpa``
(others may fetch kernels from the Hub). The model is built by
``CLASS.from_pretrained(None, config=..., state_dict=...)``: transformers' own loading path
(dtype, tied weights such as GPT-2's ``lm_head.weight``, non-persistent buffers), with the
decrypted tensors used in place - nothing is read from disk or the network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from sealtorch.errors import ConfigError, PayloadError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "AUTO_CLASSES",
    "check_transformers_arch",
    "choose_transformers_arch",
    "default_transformers_arch",
    "load_transformers_model",
    "parse_config",
]

_log = logging.getLogger(__name__)

#: The Auto classes whose mappings decide which transformers classes a sealed model may name.
AUTO_CLASSES: Final = (
    ("AutoModel", "MODEL_MAPPING"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING"),
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING"),
)
_ATTENTION: Final = ("eager", "sdpa")
_REFUSED_KEYS: Final = {
    "auto_map": "it names code in a Hub repository (trust_remote_code), which sealtorch never runs",
    "quantization_config": "quantized checkpoints are not supported",
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise PayloadError(
            "a transformers: architecture needs transformers; install sealtorch[hf]"
        ) from exc
    return transformers


def parse_config(data: bytes | Mapping[str, Any]) -> Any:
    """Build the transformers configuration object from ``config.json`` (bytes or parsed)."""
    transformers = _transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if isinstance(data, bytes | bytearray):
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PayloadError(f"the sealed config.json is not JSON: {exc}") from exc
    else:
        document = dict(data)
    if not isinstance(document, dict):
        raise PayloadError("the sealed config.json is not a JSON object")
    document = dict(document)
    for key, reason in _REFUSED_KEYS.items():
        if key in document:
            raise PayloadError(f"refusing config.json with {key!r}: {reason}")
    for key in ("attn_implementation", "_attn_implementation"):
        value = document.get(key)
        if value is not None and value not in _ATTENTION:
            raise PayloadError(
                f"refusing config.json with {key}={value!r}: sealtorch builds models with "
                f"{' or '.join(_ATTENTION)} attention only"
            )
    model_type = document.pop("model_type", None)
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise PayloadError(
            f"config.json has model_type {model_type!r}, which transformers "
            f"{transformers.__version__} does not know"
        )
    try:
        return transformers.AutoConfig.for_model(model_type, **document)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise PayloadError(f"config.json is not a valid {model_type} config: {exc}") from exc


def _allowed_classes(config: Any) -> dict[str, Any]:
    """Class name -> class, for every allowed Auto class that maps this configuration."""
    from transformers.models.auto import modeling_auto

    classes: dict[str, Any] = {}
    for _, mapping_name in AUTO_CLASSES:
        mapping = getattr(modeling_auto, mapping_name)
        if type(config) not in mapping:
            continue
        found = mapping[type(config)]
        for cls in found if isinstance(found, list | tuple) else (found,):
            classes[cls.__name__] = cls
    return classes


def _resolve(ref: str, config: Any) -> Any:
    source, _, name = ref.partition(":")
    if source != "transformers":
        raise ConfigError(f"{ref} is not a transformers: reference")
    allowed = _allowed_classes(config)
    cls = allowed.get(name)
    if cls is None:
        names = ", ".join(sorted(allowed)) or "none"
        raise PayloadError(
            f"transformers:{name} is not a class that {', '.join(a for a, _ in AUTO_CLASSES)} "
            f"builds for model_type {config.model_type!r} (allowed: {names})"
        )
    return cls


def default_transformers_arch(config: Any) -> str:
    """``transformers:CLASS`` from the config's ``architectures`` (the first allowed one)."""
    allowed = _allowed_classes(config)
    for name in getattr(config, "architectures", None) or ():
        if name in allowed:
            return f"transformers:{name}"
    names = ", ".join(sorted(allowed)) or "none"
    raise ConfigError(
        f"config.json's architectures {getattr(config, 'architectures', None)} name no class "
        f"sealtorch builds for model_type {config.model_type!r}: pass --arch "
        f"transformers:CLASS (one of {names})"
    )


def check_transformers_arch(
    ref: str, config: Any, tensors: Mapping[str, tuple[tuple[int, ...], str]]
) -> None:
    """Refuse, at sealing time, weights that ``ref`` cannot load (names and shapes)."""
    import torch

    cls = _resolve(ref, config)
    with torch.device("meta"):
        model = cls._from_config(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(set(expected) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(n for n in set(expected) & set(tensors) if expected[n] != tensors[n][0])
    problems = [
        f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
        for label, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        )
        if names
    ]
    if problems:
        raise PayloadError(f"the weights do not match {ref} ({'; '.join(problems)})")


def choose_transformers_arch(
    config_json: Mapping[str, Any],
    tensors: Mapping[str, tuple[tuple[int, ...], str]],
    arch: str | None,
    *,
    check: bool,
) -> str:
    """At sealing time: the ``transformers:CLASS`` of a Hugging Face directory - ``arch``, or
    the first allowed class of its config's ``architectures`` - checked against its weights."""
    if arch is not None and not arch.startswith("transformers:"):
        raise ConfigError(
            f"a Hugging Face directory is rebuilt from its config: use --arch "
            f"transformers:CLASS (or none: it follows config.json), not {arch}"
        )
    try:
        config = parse_config(config_json)
    except PayloadError as exc:
        raise ConfigError(str(exc)) from exc
    ref = arch if arch is not None else default_transformers_arch(config)
    if check:
        check_transformers_arch(ref, config, tensors)
    return ref


def load_transformers_model(
    ref: str,
    config_json: bytes,
    state_dict: dict[str, torch.Tensor],
    *,
    generation_config_json: bytes | None = None,
    device: torch.device | None = None,
) -> nn.Module:
    """Build ``ref`` from the sealed config and give it the sealed tensors (in place); a sealed
    ``generation_config.json`` becomes the model's generation defaults, as ``from_pretrained``
    of the directory would make it. ``device``: where the tensors already are (a GPU), so that
    transformers leaves them there instead of copying them to the host."""
    config = parse_config(config_json)
    cls = _resolve(ref, config)
    placement = {} if device is None else {"device_map": {"": device}}
    try:
        model, info = cls.from_pretrained(
            None, config=config, state_dict=state_dict, output_loading_info=True, **placement
        )
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError, OSError) as exc:
        raise PayloadError(f"building {ref} failed: {type(exc).__name__}: {exc}") from exc
    problems = {k: sorted(v) for k, v in info.items() if v and k != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise PayloadError(
            f"the sealed weights do not match {ref}: {problems or info['error_msgs']}"
        )
    if generation_config_json is not None and getattr(model, "generation_config", None):
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_dict(json.loads(generation_config_json))
        except (UnicodeDecodeError, ValueError, TypeError) as exc:
            raise PayloadError(f"the sealed generation_config.json is invalid: {exc}") from exc
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.empty_cache()  # transformers' allocator warm-up for device_map
    model.eval()
    model.requires_grad_(False)
    _log.debug("built %s from the sealed config", ref)
    return model  # type: ignore[no-any-return]
