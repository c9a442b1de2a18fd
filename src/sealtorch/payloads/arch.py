"""Architecture references: how a sealed state_dict becomes an ``nn.Module`` again.

* ``torchvision:NAME`` - ``torchvision.models.get_model(NAME, weights=None, **kwargs)``
* ``timm:NAME`` - ``timm.create_model(NAME, pretrained=False, **kwargs)``
* ``package.module:factory`` - ``factory(**kwargs)`` after importing ``package.module``

Models are built on the ``meta`` device (no memory, no random initialisation) and then take
the decrypted tensors with ``load_state_dict(strict=True, assign=True)``, so their parameters
are views of the decrypted buffer. A model that keeps something on ``meta`` afterwards (e.g. a
non-persistent buffer computed in ``__init__``) is built again normally on the CPU.

A reference names code that runs on the loading machine. It comes from the authenticated
manifest, i.e. from the model owner; the module must already be installed there.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sealtorch.errors import ConfigError, PayloadError
from sealtorch.payloads.manifest import validate_arch_ref

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["build_module", "check_state_dict_matches", "load_into_module"]

_log = logging.getLogger(__name__)


def _factory(ref: str) -> tuple[Any, dict[str, Any]]:
    """The callable a reference names plus fixed keyword arguments."""
    validate_arch_ref(ref)
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


def build_module(ref: str, kwargs: Mapping[str, Any], *, device: str = "cpu") -> nn.Module:
    """Call the factory of ``ref`` (on ``device``, e.g. ``meta``) and check it is a Module."""
    import torch
    from torch import nn

    factory, fixed = _factory(ref)
    clash = set(fixed) & set(kwargs)
    if clash:
        raise ConfigError(f"architecture kwargs may not set {sorted(clash)}")
    try:
        with torch.device(device):
            module = factory(**fixed, **dict(kwargs))
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
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
    ref: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
) -> None:
    """Refuse (at sealing time) a state_dict that the architecture cannot load."""
    module = build_module(ref, kwargs, device="meta")
    problem = _mismatch(module, state_dict)
    if problem:
        raise PayloadError(
            f"the state_dict does not match architecture {ref} ({problem}); "
            "check --arch / --arch-kwargs"
        )


def load_into_module(
    ref: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
) -> nn.Module:
    """Build ``ref`` and give it ``state_dict``'s tensors without copying them when possible."""
    module = build_module(ref, kwargs, device="meta")
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
        module = build_module(ref, kwargs, device="cpu")
        module.load_state_dict(state_dict, strict=True, assign=True)
    module.eval()
    module.requires_grad_(False)
    return module
