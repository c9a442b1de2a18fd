"""Prometheus metrics of the key cache (``GET /metrics``).

Each cache gets its own registry. Labels come from fixed vocabularies (route templates,
decisions, reason codes, refresh outcomes) — never a client-chosen string, never a secret.
"""

from __future__ import annotations

from typing import Final

from sealtorch._metrics import CONTENT_TYPE, LabelCache, MetricsRegistry, RequestObserver
from sealtorch._metrics import bounded_label as _label

__all__ = ["CONTENT_TYPE", "CacheMetrics"]

_LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


class CacheMetrics(MetricsRegistry):
    """Counters and gauges of one key cache."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = self.counter(
            "sealtorch_keycache_requests",
            "Local HTTP requests by route and status code",
            ["route", "status"],
        )
        self.latency = self.histogram(
            "sealtorch_keycache_request_duration_seconds",
            "Local request handling time by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
        )
        self.decisions = self.counter(
            "sealtorch_keycache_release_decisions",
            "Local release/renew decisions (allow, partial, deny) and refused requests (refuse)",
            ["action", "decision"],
        )
        self.reasons = self.counter(
            "sealtorch_keycache_release_reasons",
            "Reason codes of locally denied models and refused local requests",
            ["reason"],
        )
        self.keys_released = self.counter(
            "sealtorch_keycache_keys_released",
            "Data keys released to local enclaves (HPKE-sealed)",
        )
        self.refreshes = self.counter(
            "sealtorch_keycache_refreshes",
            "Refreshes from the key server by how (release, renew) and outcome",
            ["how", "outcome"],
        )
        self.models_held = self.gauge(
            "sealtorch_keycache_models_held", "Models with at least one key whose lease is running"
        )
        self.keys_held = self.gauge("sealtorch_keycache_keys_held", "Key versions held in memory")
        self.keyserver_reachable = self.gauge(
            "sealtorch_keycache_keyserver_reachable",
            "1 if the last refresh reached the key server, else 0",
        )
        self.attested = self.gauge(
            "sealtorch_keycache_attested",
            "1 if the key server accepted this cache's attestation at the last contact",
        )
        self.next_lease_expiry = self.gauge(
            "sealtorch_keycache_next_lease_expiry_timestamp_seconds",
            "Unix time at which the earliest held lease ends (0 when nothing is held)",
        )
        self.last_renewal = self.gauge(
            "sealtorch_keycache_last_renewal_timestamp_seconds",
            "Unix time of the last successful refresh from the key server",
        )
        self.simulated_tee_trusted = self.gauge(
            "sealtorch_keycache_simulated_tee_trusted",
            "1 while simulated-TEE evidence of local enclaves is trusted "
            "(allow_simulated_tee_insecure), else 0",
        )
        self.simulated_tee_releases = self.counter(
            "sealtorch_keycache_simulated_tee_releases",
            "Local release requests decided on simulated-TEE evidence, by decision "
            "(allow, partial, deny, refuse)",
            ["decision"],
        )
        self._observe_request = RequestObserver(self.requests, self.latency)
        self._decision_children = LabelCache(self.decisions)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self._observe_request(seconds, route, status)

    def observe_decision(self, action: str, decision: str, reasons: list[str], keys: int) -> None:
        self._decision_children(action, decision).inc()
        for reason in reasons:
            self.reasons.labels(_label(reason)).inc()
        if keys:
            self.keys_released.inc(keys)
