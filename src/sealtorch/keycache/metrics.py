"""Prometheus metrics of the key cache (``GET /metrics``).

Each cache gets its own registry. Labels come from fixed vocabularies (route templates,
decisions, reason codes, refresh outcomes) — never a client-chosen string, never a secret.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

__all__ = ["CONTENT_TYPE", "CacheMetrics"]

CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
_LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
_MAX_LABEL = 64


def _label(value: str) -> str:
    return value if len(value) <= _MAX_LABEL and value.isprintable() else "other"


class CacheMetrics:
    """Counters and gauges of one key cache."""

    def __init__(self) -> None:
        self._children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._decision_children: dict[tuple[str, str], Counter] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sealtorch_keycache_requests",
            "Local HTTP requests by route and status code",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "sealtorch_keycache_request_duration_seconds",
            "Local request handling time by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "sealtorch_keycache_release_decisions",
            "Local release/renew decisions (allow, partial, deny) and refused requests (refuse)",
            ["action", "decision"],
            registry=r,
        )
        self.reasons = Counter(
            "sealtorch_keycache_release_reasons",
            "Reason codes of locally denied models and refused local requests",
            ["reason"],
            registry=r,
        )
        self.keys_released = Counter(
            "sealtorch_keycache_keys_released",
            "Data keys released to local enclaves (HPKE-sealed)",
            registry=r,
        )
        self.refreshes = Counter(
            "sealtorch_keycache_refreshes",
            "Refreshes from the key server by how (release, renew) and outcome",
            ["how", "outcome"],
            registry=r,
        )
        self.models_held = Gauge(
            "sealtorch_keycache_models_held",
            "Models with at least one key whose lease is running",
            registry=r,
        )
        self.keys_held = Gauge(
            "sealtorch_keycache_keys_held", "Key versions held in memory", registry=r
        )
        self.keyserver_reachable = Gauge(
            "sealtorch_keycache_keyserver_reachable",
            "1 if the last refresh reached the key server, else 0",
            registry=r,
        )
        self.attested = Gauge(
            "sealtorch_keycache_attested",
            "1 if the key server accepted this cache's attestation at the last contact",
            registry=r,
        )
        self.next_lease_expiry = Gauge(
            "sealtorch_keycache_next_lease_expiry_timestamp_seconds",
            "Unix time at which the earliest held lease ends (0 when nothing is held)",
            registry=r,
        )
        self.last_renewal = Gauge(
            "sealtorch_keycache_last_renewal_timestamp_seconds",
            "Unix time of the last successful refresh from the key server",
            registry=r,
        )

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        children = self._children.get((route, status))
        if children is None:  # resolved once per (route, status): labels() is slow-ish
            children = (
                self.requests.labels(_label(route), str(status)),
                self.latency.labels(_label(route)),
            )
            if len(self._children) < 256:
                self._children[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_decision(self, action: str, decision: str, reasons: list[str], keys: int) -> None:
        child = self._decision_children.get((action, decision))
        if child is None:
            child = self.decisions.labels(action, decision)
            self._decision_children[(action, decision)] = child  # fixed vocabularies: bounded
        child.inc()
        for reason in reasons:
            self.reasons.labels(_label(reason)).inc()
        if keys:
            self.keys_released.inc(keys)

    def render(self) -> bytes:
        return generate_latest(self.registry)
