"""The inference server: sealed models behind the Open Inference Protocol (REST and gRPC).

>>> from sealtorch.serving import InferenceServer, SealedModelSource, ServerSettings
>>> source = SealedModelSource("resnet50.sealed", key="resnet50.key")  # doctest: +SKIP
>>> InferenceServer(ServerSettings(port=8080), [source]).run()  # doctest: +SKIP

``sealtorch serve`` is this, with the key coming from ``--keys`` (attested) or ``--key-file``.
Importing this package is cheap; PyTorch, FastAPI and uvicorn load on first use of a name.
See ``docs/serving.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from sealtorch.serving.codec import InferenceResult
    from sealtorch.serving.errors import (
        ModelNotFoundError,
        ModelNotReadyError,
        PayloadTooLargeError,
        RequestError,
        ServerBusyError,
    )
    from sealtorch.serving.keysource import parse_keys_url, resolve_key_source
    from sealtorch.serving.model import ServedModel
    from sealtorch.serving.preprocess import ImageDecodeError, preprocess_image
    from sealtorch.serving.protocol import InferenceRequest, parse_inference_request
    from sealtorch.serving.server import (
        InferenceServer,
        ModelSource,
        SealedModelSource,
        ServerSettings,
    )

_LAZY: dict[str, str] = {
    "InferenceServer": "sealtorch.serving.server",
    "ModelSource": "sealtorch.serving.server",
    "SealedModelSource": "sealtorch.serving.server",
    "ServerSettings": "sealtorch.serving.server",
    "ServedModel": "sealtorch.serving.model",
    "InferenceResult": "sealtorch.serving.codec",
    "InferenceRequest": "sealtorch.serving.protocol",
    "parse_inference_request": "sealtorch.serving.protocol",
    "RequestError": "sealtorch.serving.errors",
    "ModelNotFoundError": "sealtorch.serving.errors",
    "ModelNotReadyError": "sealtorch.serving.errors",
    "PayloadTooLargeError": "sealtorch.serving.errors",
    "ServerBusyError": "sealtorch.serving.errors",
    "ImageDecodeError": "sealtorch.serving.preprocess",
    "preprocess_image": "sealtorch.serving.preprocess",
    "parse_keys_url": "sealtorch.serving.keysource",
    "resolve_key_source": "sealtorch.serving.keysource",
}

__all__ = [
    "ImageDecodeError",
    "InferenceRequest",
    "InferenceResult",
    "InferenceServer",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "ModelSource",
    "PayloadTooLargeError",
    "RequestError",
    "SealedModelSource",
    "ServedModel",
    "ServerBusyError",
    "ServerSettings",
    "parse_inference_request",
    "parse_keys_url",
    "preprocess_image",
    "resolve_key_source",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sealtorch.serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
