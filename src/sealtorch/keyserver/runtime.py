"""What the key server's app and its routes share per app: :class:`Runtime`
(``app.state.runtime``), and the signature of an endpoint that both the app's short path and
its FastAPI route run (:data:`Endpoint`).

It sits below both :mod:`sealtorch.keyserver.app` and :mod:`sealtorch.keyserver.routes`, so
the routes never import the app that mounts them.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from starlette.types import Scope

from sealtorch.keyserver.metrics import Metrics
from sealtorch.keyserver.service import ErrorKind, KeyService, ServiceError
from sealtorch.keyserver.settings import KeyServerSettings

__all__ = ["Endpoint", "Runtime"]

_T = TypeVar("_T")


@dataclass
class Runtime:
    """Per-app state (``app.state.runtime``)."""

    settings: KeyServerSettings
    metrics: Metrics
    limiter: anyio.CapacityLimiter
    service: KeyService | None = None
    owned: list[Any] = field(default_factory=list)

    def require_service(self) -> KeyService:
        if self.service is None:  # pragma: no cover - only before startup finished
            raise ServiceError(ErrorKind.UNAVAILABLE, "starting", "the key server is starting")
        return self.service

    async def run(self, function: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """Run blocking service code in the worker thread pool."""
        call = functools.partial(function, *args, **kwargs)
        return await anyio.to_thread.run_sync(call, limiter=self.limiter)


#: One endpoint's whole work: ``(runtime, scope, body) -> (status, JSON body)``; raises
#: :class:`ServiceError` (or ``RequestValidationError``), which the app answers in the
#: protocol's error shape.
Endpoint = Callable[[Runtime, Scope, bytes], Awaitable[tuple[int, bytes]]]
