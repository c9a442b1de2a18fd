"""Prometheus metrics of the key server (``GET /metrics``).

Each app gets its own :class:`Metrics` (its own registry), so tests can build many apps in one
process. With several worker processes (``keyserver serve --workers N``) the CLI points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start; every worker then
writes its values there and ``/metrics``, served by any worker, aggregates all of them.

No label ever holds a secret or a client-chosen string: routes are path *templates*, decisions
and reason codes come from fixed vocabularies.
"""

from __future__ import annotations

import os
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

__all__ = ["CONTENT_TYPE", "MULTIPROC_ENV", "Metrics"]

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
_LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
_MAX_LABEL = 64


def _label(value: str) -> str:
    return value if len(value) <= _MAX_LABEL and value.isprintable() else "other"


class Metrics:
    """The key server's counters and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "sealtorch_keyserver_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sealtorch_keyserver_request_duration_seconds",
            "HTTP request handling time by route template",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decisions = Counter(
            "sealtorch_keyserver_release_decisions",
            "Release and renewal decisions (allow, partial, deny) and refused requests (refuse)",
            ["action", "decision"],
            registry=self.registry,
        )
        self.reasons = Counter(
            "sealtorch_keyserver_release_reasons",
            "Reason codes of denied models and refused release/renew requests",
            ["reason"],
            registry=self.registry,
        )
        self.keys_released = Counter(
            "sealtorch_keyserver_keys_released",
            "Data keys released (HPKE-sealed to an attested enclave)",
            registry=self.registry,
        )
        self.admin_auth_failures = Counter(
            "sealtorch_keyserver_admin_auth_failures",
            "Admin requests refused for a missing or invalid bearer token",
            ["status"],
            registry=self.registry,
        )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(_label(route), method, str(status)).inc()
        self.latency.labels(_label(route)).observe(seconds)

    def observe_decision(self, action: str, decision: str, reasons: list[str]) -> None:
        self.decisions.labels(action, decision).inc()
        for reason in reasons:
            self.reasons.labels(_label(reason)).inc()

    def render(self) -> bytes:
        """The exposition text (all workers' values in multiprocess mode)."""
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
