"""What the HTTP app, the model loader and the server runner share: models, readiness, pool.

Models are added by the loader thread while the app already answers health probes; the dict
is replaced, never mutated, so readers need no lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType

from sealtorch.errors import ConfigError
from sealtorch.serving.errors import (
    ModelNotFoundError,
    ModelNotReadyError,
    ServerBusyError,
    show,
)
from sealtorch.serving.metrics import ServingMetrics
from sealtorch.serving.model import ServedModel

__all__ = ["ServerState"]


class ServerState:
    """The served models (by name), readiness and the inference thread pool."""

    def __init__(self, names: Sequence[str], *, workers: int, metrics: ServingMetrics) -> None:
        if len(set(names)) != len(names):
            duplicate = next(name for name in names if list(names).count(name) > 1)
            raise ConfigError(
                f"two models would be served as {duplicate!r}; give them distinct --name values"
            )
        self.names: tuple[str, ...] = tuple(names)
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="sealtorch-infer"
        )
        self.pending = 0  # requests admitted and not finished (REST and gRPC)
        self._pending_lock = threading.Lock()
        self._models: MappingProxyType[str, ServedModel] = MappingProxyType({})
        self._lock = threading.Lock()
        self._all_loaded = False
        self.stopping = False
        for name in self.names:
            metrics.ready.labels(name).set(0)

    # -- loader side --------------------------------------------------------------------------

    def add(self, model: ServedModel) -> None:
        if model.name not in self.names:
            raise ConfigError(f"model {model.name!r} was not announced to the server")
        with self._lock:
            self._models = MappingProxyType({**self._models, model.name: model})
            self._all_loaded = set(self._models) == set(self.names)
        self.metrics.ready.labels(model.name).set(1)
        self.metrics.load_seconds.labels(model.name).set(model.load_seconds)
        for phase, seconds in model.load_phases.items():
            self.metrics.load_phase_seconds.labels(model.name, phase).set(seconds)
        self.metrics.info.labels(model.name, model.version, str(model.sealed).lower()).set(1)

    def close(self) -> None:
        self.stopping = True
        self.executor.shutdown(wait=True, cancel_futures=False)

    # -- request side -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._all_loaded and not self.stopping

    @property
    def models(self) -> MappingProxyType[str, ServedModel]:
        return self._models

    @contextlib.contextmanager
    def admitted(self, limit: int) -> Iterator[None]:
        """Count one request as pending while it runs; 503 when ``limit`` already are.

        Thread-safe: REST requests are admitted on the event loop, gRPC requests in the gRPC
        server's threads, against the same count.
        """
        with self._pending_lock:
            if self.pending >= limit:
                raise ServerBusyError(f"{self.pending} requests are already queued; retry shortly")
            self.pending += 1
        try:
            yield
        finally:
            with self._pending_lock:
                self.pending -= 1

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Whether the model serves: False while it loads or the server stops; 404 for an
        unknown name or version (both protocols answer from this)."""
        if name not in self._models and name in self.names:
            return False
        self.lookup(name, version)
        return not self.stopping

    def known(self, name: str) -> bool:
        return name in self.names

    def lookup(self, name: str, version: str | None = None) -> ServedModel:
        """The ready model, or 404 (unknown name or version) / 503 (still loading)."""
        model = self._models.get(name)
        if model is None:
            if name in self.names:
                raise ModelNotReadyError(f"model {name!r} is still loading; retry shortly")
            raise ModelNotFoundError(
                f"no model {show(name)} is served here (served: "
                f"{', '.join(repr(n) for n in self.names) or 'none'})"
            )
        if version is not None and version != model.version:
            raise ModelNotFoundError(
                f"model {name!r} has no version {show(version)}; it serves version "
                f"{model.version!r}"
            )
        return model
