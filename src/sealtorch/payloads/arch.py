"""Architecture references: how a sealed state_dict becomes an ``nn.Module`` again.

* ``torchvision:NAME`` - ``torchvision.models.get_model(NAME, weights=None, **kwargs)``
* ``timm:NAME`` - ``timm.create_model(NAME, pretrained=False, **kwargs)``
* ``transformers:CLASS`` - rebuilt from the sealed ``config.json`` through transformers' Auto
  class tables (:mod:`sealtorch.payloads.hf_arch`)
* ``package.module:factory`` - ``factory(**kwargs)`` after importing ``package.module``

Models are built on the ``meta`` device (no memory, no random initialisation) and then take
the decrypted tensors with ``load_state_dict(strict=True, assign=True)``, so their parameters
are views of the decrypted buffer. A model that keeps something on ``meta`` afterwards (e.g. a
non-persistent buffer computed in ``__init__``) is built again normally on the CPU.

A reference read from a sealed file is data, and data must never name code that the loading
machine - an enclave - imports or calls. So the loading side builds only what it allows itself:

* ``torchvision:NAME`` and ``timm:NAME``, known model names of the installed library, built
  without pretrained weights; keyword arguments that make either library read or download
  weights, checkpoints or pretrained configuration are refused (:func:`check_arch_kwargs`).
  Both libraries resolve the strings their builders take (timm's ``act_layer="gelu"``,
  ``norm_layer``, ``attn_layer``, ``global_pool``, ``feature_cls``...) through closed tables
  of their own layers, never by importing a name.
* ``package.module:factory`` only if the deployment lists it (``sealtorch serve --allow-arch``,
  in an enclave part of the measured command line; ``load_model(allowed_archs=...)``); a
  reference the caller passes itself (``load_model(arch=...)``, ``encrypt_model(arch=...)``)
  is the caller's own choice. Anything else is refused before anything is imported. The
  factory receives the file's ``kwargs`` (JSON data) as keyword arguments.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from sealtorch.errors import ConfigError, PayloadError
from sealtorch.payloads.manifest import validate_arch_ref

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "HUB_SOURCES",
    "build_module",
    "check_allowed_archs",
    "check_arch_allowed",
    "check_arch_kwargs",
    "check_state_dict_matches",
    "load_into_module",
]

_log = logging.getLogger(__name__)

#: Model libraries whose known model names any sealed file may name.
HUB_SOURCES: Final = ("torchvision", "timm", "transformers")
#: Keyword arguments with which torchvision or timm builders read or download weights, a
#: checkpoint or pretrained configuration (``pretrained_cfg`` may name a Hub repository or
#: file; ``checkpoint_path`` is unpickled by timm). A sealed model carries its own weights.
_LOADING_KWARGS: Final = frozenset(
    {
        "cache_dir",
        "checkpoint_path",
        "model_dir",
        "pretrained",
        "pretrained_backbone",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_model_args",
        "pretrained_strict",
        "progress",
        "weights",
        "weights_backbone",
    }
)
#: ...and any other argument whose name starts like these (e.g. a library's next version).
_LOADING_PREFIXES: Final = ("pretrained", "weights", "checkpoint")
#: What a builder may raise for arguments it does not accept (wrapped into PayloadError).
_BUILD_ERRORS: Final = (
    ArithmeticError,
    AssertionError,
    AttributeError,
    LookupError,
    RuntimeError,
    TypeError,
    ValueError,
)


def check_allowed_archs(refs: Iterable[str]) -> frozenset[str]:
    """Validate a deployment's list of allowed factories: ``package.module:factory`` each."""
    allowed = set()
    for ref in refs:
        validate_arch_ref(ref)
        if ref.partition(":")[0] in HUB_SOURCES:
            raise ConfigError(
                f"--allow-arch {ref}: torchvision: and timm: models are always allowed "
                "(transformers: ones too); "
                "--allow-arch (allowed_archs) lists package.module:factory references"
            )
        allowed.add(ref)
    return frozenset(allowed)


def check_arch_allowed(ref: str, *, allowed_archs: Collection[str]) -> str:
    """Return ``ref`` if this machine may build it; otherwise refuse it without importing."""
    validate_arch_ref(ref)
    if ref.partition(":")[0] in HUB_SOURCES or ref in allowed_archs:
        return ref
    raise PayloadError(
        f"the sealed architecture {ref} is not allowed on this machine: a sealed model may "
        "name torchvision:NAME, timm:NAME, or a package.module:factory that the loading side "
        f"allows explicitly. If you trust {ref}, allow it: sealtorch serve --allow-arch {ref} "
        f"(in an enclave, in its measured command line), or load_model(..., "
        f"allowed_archs=[{ref!r}])"
    )


def check_arch_kwargs(ref: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse keyword arguments that make torchvision or timm load weights or configuration."""
    source = ref.partition(":")[0]
    if source not in HUB_SOURCES:
        return
    if source == "transformers" and kwargs:
        raise ConfigError(
            f"{ref} takes no architecture kwargs: the model is built from its sealed config.json"
        )
    loading = sorted(
        name for name in kwargs if name in _LOADING_KWARGS or name.startswith(_LOADING_PREFIXES)
    )
    if loading:
        raise ConfigError(
            f"architecture kwargs may not set {loading}: they make {source} read or download "
            "weights, a checkpoint or pretrained configuration; a sealed model carries its own "
            "weights"
        )


def _factory(ref: str, *, allowed_archs: Collection[str]) -> tuple[Any, dict[str, Any]]:
    """The callable a reference names plus fixed keyword arguments."""
    check_arch_allowed(ref, allowed_archs=allowed_archs)
    source, _, name = ref.partition(":")
    if source == "torchvision":
        try:
            import torchvision.models
        except ImportError as exc:
            raise PayloadError(f"{ref} needs torchvision; install sealtorch[vision]") from exc
        if name not in torchvision.models.list_models():
            raise PayloadError(f"torchvision has no model {name!r} (see torchvision.models)")
        return torchvision.models.get_model, {"name": name, "weights": None}
    if source == "timm":
        try:
            import timm
        except ImportError as exc:
            raise PayloadError(f"{ref} needs timm; install sealtorch[vision]") from exc
        if not timm.is_model(name):
            raise PayloadError(f"timm has no model {name!r} (see timm.list_models())")
        return timm.create_model, {"model_name": name, "pretrained": False}
    if source == "transformers":
        raise PayloadError(
            f"{ref} is built from the model's config.json: seal a Hugging Face save_pretrained "
            "directory (which carries it)"
        )
    try:
        module = importlib.import_module(source)
    except ImportError as exc:
        raise PayloadError(
            f"cannot import {source!r} for architecture {ref}: install it on this machine"
        ) from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise PayloadError(f"{source} has no callable {name!r} (architecture {ref})")
    return factory, {}


def build_module(
    ref: str,
    kwargs: Mapping[str, Any],
    *,
    device: str = "cpu",
    allowed_archs: Collection[str] = (),
) -> nn.Module:
    """Call the factory of ``ref`` (on ``device``, e.g. ``meta``) and check it is a Module.

    ``ref`` must be a torchvision or timm model, or one of ``allowed_archs``
    (:func:`check_arch_allowed`); nothing is imported otherwise.
    """
    import torch
    from torch import nn

    check_arch_allowed(ref, allowed_archs=allowed_archs)
    check_arch_kwargs(ref, kwargs)
    factory, fixed = _factory(ref, allowed_archs=allowed_archs)
    clash = set(fixed) & set(kwargs)
    if clash:
        raise ConfigError(f"architecture kwargs may not set {sorted(clash)}")
    try:
        with torch.device(device):
            module = factory(**fixed, **dict(kwargs))
    except _BUILD_ERRORS as exc:
        raise PayloadError(f"building {ref} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise PayloadError(f"{ref} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def _mismatch(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        name
        for name in set(expected) & set(state_dict)
        if expected[name].shape != state_dict[name].shape
        or expected[name].dtype != state_dict[name].dtype
    )
    if not (missing or unexpected or wrong):
        return None
    parts = []
    for label, names in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape/dtype", wrong),
    ):
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            shown = ", ".join(names[:5]) + more
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


def check_state_dict_matches(
    ref: str,
    kwargs: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    *,
    allowed_archs: Collection[str] = (),
) -> None:
    """Refuse (at sealing time) a state_dict that the architecture cannot load."""
    module = build_module(ref, kwargs, device="meta", allowed_archs=allowed_archs)
    problem = _mismatch(module, state_dict)
    if problem:
        raise PayloadError(
            f"the state_dict does not match architecture {ref} ({problem}); "
            "check --arch / --arch-kwargs"
        )


def load_into_module(
    ref: str,
    kwargs: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    *,
    allowed_archs: Collection[str] = (),
) -> nn.Module:
    """Build ``ref`` and give it ``state_dict``'s tensors without copying them when possible."""
    module = build_module(ref, kwargs, device="meta", allowed_archs=allowed_archs)
    problem = _mismatch(module, state_dict)
    if problem:
        raise PayloadError(f"the sealed state_dict does not match {ref} ({problem})")
    module.load_state_dict(state_dict, strict=True, assign=True)
    leftover = [
        name
        for name, tensor in (*module.named_parameters(), *module.named_buffers())
        if tensor.is_meta
    ]
    if leftover:
        _log.info(
            "%s keeps %d tensors outside its state_dict (e.g. %s); building it on the CPU",
            ref,
            len(leftover),
            leftover[0],
        )
        module = build_module(ref, kwargs, device="cpu", allowed_archs=allowed_archs)
        module.load_state_dict(state_dict, strict=True, assign=True)
    module.eval()
    module.requires_grad_(False)
    return module
