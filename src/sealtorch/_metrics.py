"""Prometheus machinery shared by the key server, the key cache and the inference server.

Each server builds its own :class:`MetricsRegistry` (never ``prometheus_client``'s global
registry), so tests can build many servers in one process. The servers' metric modules only
declare their metrics (names, help texts, labels, buckets) on it.

Label values must come from fixed vocabularies; :func:`bounded_label` keeps one that a client
could influence (a route, a reason code) from creating unbounded time series.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final, Generic, Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics import MetricWrapperBase

__all__ = [
    "CONTENT_TYPE",
    "MULTIPROC_ENV",
    "LabelCache",
    "MetricsRegistry",
    "RequestObserver",
    "bounded_label",
]

#: The exposition format of ``render()`` (Prometheus text format 0.0.4).
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
#: Set by ``keyserver serve --workers N`` to a directory where every worker writes its values.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
_MAX_LABEL: Final = 64
_MAX_CHILDREN: Final = 256

_M = TypeVar("_M", bound=MetricWrapperBase)


def bounded_label(value: str) -> str:
    """``value`` as a label value, or ``"other"`` if it is longer than 64 characters or not
    printable."""
    return value if len(value) <= _MAX_LABEL and value.isprintable() else "other"


class MetricsRegistry:
    """One server's registry: declare metrics with :meth:`counter`, :meth:`gauge` and
    :meth:`histogram`, expose them with :meth:`render`.

    ``multiprocess=True``: when :data:`MULTIPROC_ENV` is set, :meth:`render` aggregates the
    values every process wrote to that directory (any worker can answer ``/metrics``).
    """

    def __init__(self, *, multiprocess: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._multiprocess = multiprocess

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, documentation, labels, registry=self.registry)

    def gauge(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        *,
        multiprocess_mode: Literal["all", "mostrecent"] = "all",
    ) -> Gauge:
        """``multiprocess_mode="mostrecent"``: with several worker processes, the value the
        latest writer set (for a value every process computes from shared state)."""
        return Gauge(
            name,
            documentation,
            labels,
            registry=self.registry,
            multiprocess_mode=multiprocess_mode,
        )

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> Histogram:
        return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)

    def render(self) -> bytes:
        """The exposition text (every process's values in multiprocess mode)."""
        if self._multiprocess and os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


class LabelCache(Generic[_M]):
    """``metric.labels(*values)``, resolved once per label values (``labels()`` is slow-ish
    on a hot path). At most ``limit`` children are remembered; others are resolved each time.
    """

    def __init__(self, metric: _M, *, limit: int = _MAX_CHILDREN) -> None:
        self._metric = metric
        self._limit = limit
        self._children: dict[tuple[str, ...], _M] = {}

    def __call__(self, *values: str) -> _M:
        child = self._children.get(values)
        if child is None:
            child = self._metric.labels(*values)
            if len(self._children) < self._limit:
                self._children[values] = child
        return child

    def __len__(self) -> int:
        """How many label values are remembered (at most ``limit``)."""
        return len(self._children)


class RequestObserver:
    """Counts a request (``requests``: labels route, then ``labels``) and observes its duration
    (``latency``: label route). The route is bounded (:func:`bounded_label`); both children are
    resolved once per distinct ``(route, *labels)`` — this runs for every request.
    """

    def __init__(
        self, requests: Counter, latency: Histogram, *, limit: int = _MAX_CHILDREN
    ) -> None:
        self._requests = requests
        self._latency = latency
        self._limit = limit
        self._children: dict[tuple[object, ...], tuple[Counter, Histogram]] = {}

    def __call__(self, seconds: float, route: str, *labels: object) -> None:
        key = (route, *labels)
        children = self._children.get(key)
        if children is None:
            label = bounded_label(route)
            children = (self._requests.labels(label, *labels), self._latency.labels(label))
            if len(self._children) < self._limit:
                self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
