"""sealtorch: deploy PyTorch models confidentially.

The public Python API. Importing ``sealtorch`` is cheap: PyTorch and the server stacks are only
imported when a function that needs them is first used.

>>> import sealtorch
>>> key = sealtorch.generate_key()
>>> sealtorch.encrypt_model(
...     model.state_dict(),
...     "model.sealed",
...     model_id="resnet50",
...     key=key,
...     arch="torchvision:resnet50",
... )  # doctest: +SKIP
>>> model = sealtorch.load_model("model.sealed", key=key)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sealtorch._version import __version__
from sealtorch.errors import Error
from sealtorch.keys import DataKey, KeyFile, KeyProvider, StaticKey, generate_key

if TYPE_CHECKING:  # pragma: no cover
    from sealtorch.api import (
        decrypt_model,
        encrypt_model,
        inspect_sealed,
        load_model,
        load_sealed_model,
        load_state_dict,
        rewrap,
    )

# Public names that live in modules importing heavy dependencies, loaded on first access.
_LAZY: dict[str, str] = {
    "encrypt_model": "sealtorch.api",
    "load_state_dict": "sealtorch.api",
    "load_model": "sealtorch.api",
    "load_sealed_model": "sealtorch.api",
    "decrypt_model": "sealtorch.api",
    "inspect_sealed": "sealtorch.api",
    "rewrap": "sealtorch.api",
}

__all__ = [
    "DataKey",
    "Error",
    "KeyFile",
    "KeyProvider",
    "StaticKey",
    "__version__",
    "decrypt_model",
    "encrypt_model",
    "generate_key",
    "inspect_sealed",
    "load_model",
    "load_sealed_model",
    "load_state_dict",
    "rewrap",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sealtorch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
