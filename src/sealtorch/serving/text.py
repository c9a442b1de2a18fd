"""Hugging Face models behind the protocol: named tensor inputs, text in, and their outputs.

A sealed ``transformers:CLASS`` model is served through :class:`TransformersAdapter`, which
calls it with keyword tensors (``input_ids``, ``attention_mask`` and ``token_type_ids`` where
the model takes them: ``INT64 [-1, -1]``, the sequence length dynamic) and returns named
outputs, never a cache:

* a sequence classifier: ``logits`` (labels from the config's ``id2label``);
* a causal LM: ``logits`` (computed without a KV cache: generation has its own route,
  :mod:`sealtorch.serving.generate`);
* a base model (``AutoModel``): ``last_hidden_state``, ``pooler_output`` where it has one, and
  ``embeddings``, the mean of ``last_hidden_state`` over the attention mask.

:class:`TextModel` adds text: the sealed tokenizer is built in memory from the sealed
``tokenizer.json`` (``tokenizers.Tokenizer.from_str``) and the class transformers' own table
maps the config's ``model_type`` (or the sealed ``tokenizer_config.json``) to; nothing named by
the files is imported from anywhere else, and remote code is never run. A tokenizer without
``tokenizer.json`` (vocabulary files only) is built by that class's ``from_pretrained`` from a
private temporary directory (mode 0700, removed at once; inside an enclave the temporary
directory is the enclave's own encrypted or in-memory mount).
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from sealtorch.errors import PayloadError
from sealtorch.payloads.manifest import TensorSpec
from sealtorch.serving.errors import RequestError

__all__ = [
    "CAUSAL_LM",
    "CLASSIFIER",
    "ENCODER",
    "TextModel",
    "TransformersAdapter",
    "transformers_model",
]

_log = logging.getLogger(__name__)

CLASSIFIER: Final = "sequence-classification"
CAUSAL_LM: Final = "causal-lm"
ENCODER: Final = "embeddings"
#: Tensor inputs a transformers model is served with, in this order, where its forward takes them.
_TEXT_INPUTS: Final = ("input_ids", "attention_mask", "token_type_ids")
#: Files of a tokenizer (the others a directory carries are configs, chat templates...).
_TOKENIZER_FILES: Final = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
#: The chat template ``save_pretrained`` writes beside tokenizer_config.json (transformers >= 4.50).
_CHAT_TEMPLATE: Final = "chat_template.jinja"
#: tokenizer_config.json entries that are not constructor arguments (or name code).
_NOT_KWARGS: Final = ("tokenizer_class", "backend", "auto_map", "tokenizer_file")
_KIND_MAPPINGS: Final = (
    (CLASSIFIER, "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING"),
    (CAUSAL_LM, "MODEL_FOR_CAUSAL_LM_MAPPING"),
    (ENCODER, "MODEL_MAPPING"),
)


def transformers_model(module: nn.Module) -> Any | None:
    """``module`` if it is a transformers model (a ``PreTrainedModel``), else None.

    transformers is only looked at when something already imported it (a sealed
    ``transformers:`` model did); other models never import it.
    """
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return None
    return module if isinstance(module, transformers.PreTrainedModel) else None


def model_kind(model: Any) -> str:
    """What a transformers model is served as: classifier, causal LM or embeddings."""
    from transformers.models.auto import modeling_auto

    config_type = type(model.config)
    for kind, mapping_name in _KIND_MAPPINGS:
        mapping = getattr(modeling_auto, mapping_name)
        if config_type not in mapping:
            continue
        found = mapping[config_type]
        if type(model) in (found if isinstance(found, list | tuple) else (found,)):
            return kind
    raise PayloadError(
        f"{type(model).__name__} is not a sequence classifier, causal LM or base model of "
        "transformers' Auto classes; sealtorch cannot serve it"
    )


def max_positions(config: Any) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings``), or None."""
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def text_inputs(model: Any) -> tuple[TensorSpec, ...]:
    """``input_ids``, ``attention_mask`` (and ``token_type_ids`` for models with token types)
    as ``INT64 [-1, -1]``: those the model's forward takes."""
    parameters = inspect.signature(model.forward).parameters
    names = [name for name in _TEXT_INPUTS if name in parameters]
    if "token_type_ids" in names and not getattr(model.config, "type_vocab_size", 0):
        names.remove("token_type_ids")  # e.g. GPT-2 takes it but has no token types
    if "input_ids" not in names:
        raise PayloadError(f"{type(model).__name__}.forward takes no input_ids")
    return tuple(TensorSpec(name=name, datatype="INT64", shape=(-1, -1)) for name in names)


def config_labels(model: Any) -> tuple[str, ...] | None:
    """A classifier's labels from its config's ``id2label``, in id order."""
    id2label = getattr(model.config, "id2label", None)
    if not isinstance(id2label, Mapping) or not id2label:
        return None
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        return None
    if sorted(by_id) != list(range(len(by_id))):
        return None
    return tuple(by_id[i] for i in range(len(by_id)))


class TransformersAdapter(nn.Module):
    """Calls a transformers model with named tensors; returns its outputs by name, no cache."""

    def __init__(self, model: nn.Module, input_names: Sequence[str], kind: str) -> None:
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)
        self.kind = kind
        parameters = inspect.signature(model.forward).parameters
        unknown = [name for name in self.input_names if name not in parameters]
        if unknown:
            raise PayloadError(
                f"{type(model).__name__}.forward takes no {unknown[0]!r}; declare inputs among "
                f"{', '.join(n for n in _TEXT_INPUTS if n in parameters)}"
            )
        self._no_cache = "use_cache" in parameters

    def forward(self, *tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named outputs, on the CPU (the model may sit on a GPU: the inputs go there)."""
        device: Any = self.model.device
        kwargs: dict[str, Any] = {
            name: tensor.to(device) for name, tensor in zip(self.input_names, tensors, strict=True)
        }
        if self._no_cache:
            kwargs["use_cache"] = False
        out = self.model(**kwargs, return_dict=True)
        if self.kind != ENCODER:
            return {"logits": out.logits.cpu()}
        hidden = out.last_hidden_state
        result = {"last_hidden_state": hidden}
        pooled = getattr(out, "pooler_output", None)
        if isinstance(pooled, torch.Tensor):
            result["pooler_output"] = pooled
        result["embeddings"] = mean_pool(hidden, kwargs.get("attention_mask"))
        return {name: tensor.cpu() for name, tensor in result.items()}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``hidden`` ``[batch, tokens, width]`` over the tokens ``mask`` keeps."""
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


# -- the sealed tokenizer ----------------------------------------------------------------------


def _json_file(files: Mapping[str, bytes], name: str) -> dict[str, Any]:
    data = files.get(name)
    if data is None:
        return {}
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"the sealed {name} is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise PayloadError(f"the sealed {name} is not a JSON object")
    return document


def _tokenizer_class(name: object, model_type: str) -> Any:
    """The tokenizer class of transformers' own table: the one ``tokenizer_config.json``
    names if transformers ships it, else the one the table gives for ``model_type``."""
    from transformers.models.auto.tokenization_auto import (
        TOKENIZER_MAPPING_NAMES,
        tokenizer_class_from_name,
    )

    names: dict[str, str | None] = dict(TOKENIZER_MAPPING_NAMES)
    shipped = {value for value in names.values() if isinstance(value, str)}
    chosen = name if isinstance(name, str) else None
    if chosen == "PreTrainedTokenizerFast":
        chosen = "TokenizersBackend"  # its name in transformers 5
    if chosen is not None and chosen.endswith("Fast") and chosen[:-4] in shipped:
        chosen = chosen[:-4]  # transformers 5 folds the fast classes into the plain names
    if chosen is None or chosen not in shipped:
        if name is not None:
            _log.info("tokenizer_class %r is not one transformers ships; using the table's", name)
        chosen = names.get(model_type) or "TokenizersBackend"
    cls = tokenizer_class_from_name(chosen)
    if cls is None:
        raise PayloadError(f"transformers cannot build its tokenizer class {chosen}")
    return cls


def build_tokenizer(files: Mapping[str, bytes], model_type: str) -> Any | None:
    """The sealed tokenizer, or None when the model carries none."""
    if not any(name in files for name in _TOKENIZER_FILES):
        return None
    settings = _json_file(files, "tokenizer_config.json")
    if "auto_map" in settings:
        raise PayloadError(
            "refusing tokenizer_config.json with 'auto_map': it names code in a Hub "
            "repository (trust_remote_code), which sealtorch never runs"
        )
    cls = _tokenizer_class(settings.get("tokenizer_class"), model_type)
    data = files.get("tokenizer.json")
    try:
        if data is not None:
            from tokenizers import Tokenizer

            kwargs = {k: v for k, v in settings.items() if k not in _NOT_KWARGS}
            for key, value in _json_file(files, "special_tokens_map.json").items():
                kwargs.setdefault(key, value)
            template = files.get(_CHAT_TEMPLATE)
            if template is not None:  # wins over tokenizer_config.json's, as in transformers
                kwargs["chat_template"] = template.decode("utf-8")
            return cls(tokenizer_object=Tokenizer.from_str(data.decode("utf-8")), **kwargs)
        return _tokenizer_from_directory(cls, files)
    except PayloadError:
        raise
    except (ValueError, TypeError, KeyError, OSError, RuntimeError, UnicodeDecodeError) as exc:
        raise PayloadError(
            f"cannot build the sealed tokenizer ({cls.__name__}): {type(exc).__name__}: {exc}"
        ) from exc


def _tokenizer_from_directory(cls: Any, files: Mapping[str, bytes]) -> Any:
    """A vocabulary-file tokenizer through ``cls.from_pretrained`` (the class
    ``AutoTokenizer`` would choose from transformers' table) of a private temporary
    directory (0700, removed before returning)."""
    directory = Path(tempfile.mkdtemp(prefix="sealtorch-tokenizer-"))  # mode 0700
    try:
        for name, data in files.items():
            if "/" in name or name.startswith(".") or name == "config.json":
                continue
            if name.endswith((".json", ".txt", ".model", ".tiktoken")) or name == _CHAT_TEMPLATE:
                path = directory / name
                with path.open("xb") as out:
                    path.chmod(0o600)
                    out.write(data)
        return cls.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class TextModel:
    """Text in for a served transformers model: its kind, tokenizer and sequence limit."""

    def __init__(
        self,
        model: Any,
        *,
        kind: str,
        tokenizer: Any | None,
        input_names: Sequence[str],
    ) -> None:
        self.model = model
        self.kind = kind
        self.tokenizer = tokenizer
        self.input_names = tuple(input_names)
        self.max_positions = max_positions(model.config)
        # A Rust tokenizer refuses concurrent calls that set padding or truncation.
        self._lock = threading.Lock()

    @classmethod
    def from_files(
        cls, model: Any, files: Mapping[str, bytes], input_names: Sequence[str]
    ) -> TextModel:
        kind = model_kind(model)
        tokenizer = build_tokenizer(files, model.config.model_type)
        return cls(model, kind=kind, tokenizer=tokenizer, input_names=input_names)

    def max_length(self) -> int | None:
        """The most tokens one text may have: the model's positions (and the tokenizer's)."""
        limits = [self.max_positions] if self.max_positions is not None else []
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1 << 30:
            limits.append(tokenizer_limit)
        return min(limits) if limits else None

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """The model's tensor inputs for a batch of texts (padded, truncated to the model's
        positions), in :attr:`input_names` order."""
        if self.tokenizer is None:  # pragma: no cover - text_input implies a tokenizer
            raise RequestError("this model carries no tokenizer; send token ids")
        if len(texts) > 1 and self.tokenizer.pad_token is None:
            raise RequestError(
                "this model's tokenizer has no padding token: send one text per request"
            )
        limit = self.max_length()
        try:
            with self._lock:
                encoded = self.tokenizer(
                    list(texts),
                    padding=len(texts) > 1,
                    truncation=limit is not None,
                    max_length=limit,
                    return_tensors="pt",
                )
        except (ValueError, TypeError) as exc:
            raise RequestError(f"the text cannot be tokenized ({type(exc).__name__})") from exc
        if encoded["input_ids"].shape[-1] == 0:
            raise RequestError("the text holds no tokens (an empty text?)")
        tensors = []
        for name in self.input_names:
            tensor = encoded.get(name)
            if tensor is None:
                if name == "token_type_ids":
                    tensor = torch.zeros_like(encoded["input_ids"])
                elif name == "attention_mask":
                    tensor = torch.ones_like(encoded["input_ids"])
                else:
                    raise RequestError(f"the tokenizer does not produce {name!r}")
            tensors.append(tensor.to(torch.int64))
        return tensors

    def tokenize_prompt(self, text: str, *, special_tokens: bool = True) -> dict[str, torch.Tensor]:
        """A generation prompt's ``input_ids`` and ``attention_mask`` (batch 1, as
        ``tokenizer(text, return_tensors="pt")`` gives them). ``special_tokens=False``: none
        added (a chat template's text writes its own, as ``apply_chat_template`` tokenizes)."""
        if self.tokenizer is None:  # pragma: no cover - generation implies a tokenizer
            raise RequestError("this model carries no tokenizer")
        with self._lock:
            encoded = self.tokenizer(text, add_special_tokens=special_tokens, return_tensors="pt")
        if encoded["input_ids"].shape[-1] == 0:
            raise RequestError("the prompt holds no tokens")
        return {name: encoded[name] for name in ("input_ids", "attention_mask") if name in encoded}
