"""Prometheus metrics of the key server (``GET /metrics``).

Each app gets its own :class:`Metrics` (its own registry), so tests can build many apps in one
process. With several worker processes (``keyserver serve --workers N``) the CLI points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start; every worker then
writes its values there and ``/metrics``, served by any worker, aggregates all of them.

No label ever holds a secret or a client-chosen string: routes are path *templates*, decisions
and reason codes come from fixed vocabularies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from sealtorch._metrics import (
    CONTENT_TYPE,
    MULTIPROC_ENV,
    LabelCache,
    MetricsRegistry,
    RequestObserver,
)
from sealtorch._metrics import bounded_label as _label
from sealtorch.attestation.policy import INSECURE_FLAGS

__all__ = ["CONTENT_TYPE", "MULTIPROC_ENV", "Metrics"]

_LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics(MetricsRegistry):
    """The key server's counters and histograms."""

    def __init__(self) -> None:
        super().__init__(multiprocess=True)
        self.requests = self.counter(
            "sealtorch_keyserver_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
        )
        self.latency = self.histogram(
            "sealtorch_keyserver_request_duration_seconds",
            "HTTP request handling time by route template",
            ["route"],
            buckets=_LATENCY_BUCKETS,
        )
        self.decisions = self.counter(
            "sealtorch_keyserver_release_decisions",
            "Release and renewal decisions (allow, partial, deny) and refused requests (refuse)",
            ["action", "decision"],
        )
        self.reasons = self.counter(
            "sealtorch_keyserver_release_reasons",
            "Reason codes of denied models and refused release/renew requests",
            ["reason"],
        )
        self.keys_released = self.counter(
            "sealtorch_keyserver_keys_released",
            "Data keys released (HPKE-sealed to an attested enclave)",
        )
        self.admin_auth_failures = self.counter(
            "sealtorch_keyserver_admin_auth_failures",
            "Admin requests refused for a missing or invalid bearer token",
            ["status"],
        )
        self.admin_scope_refusals = self.counter(
            "sealtorch_keyserver_admin_scope_refusals",
            "Admin requests refused because the token lacks the scope the action needs",
            ["action"],
        )
        self.insecure_policy_sets = self.counter(
            "sealtorch_keyserver_insecure_policy_sets",
            "Policies set with an *_insecure flag turned on, by flag",
            ["flag"],
        )
        self.insecure_policies = self.gauge(
            "sealtorch_keyserver_insecure_policies",
            "Live models whose current policy turns on an *_insecure flag, by flag (read from "
            "the key store when /metrics is scraped)",
            ["flag"],
            multiprocess_mode="mostrecent",
        )
        self.simulated_tee_trusted = self.gauge(
            "sealtorch_keyserver_simulated_tee_trusted",
            "1 while simulated-TEE evidence is trusted (allow_simulated_tee_insecure), else 0",
            multiprocess_mode="mostrecent",
        )
        self.simulated_tee_releases = self.counter(
            "sealtorch_keyserver_simulated_tee_releases",
            "Release requests decided on simulated-TEE evidence, by decision "
            "(allow, partial, deny, refuse)",
            ["decision"],
        )
        for flag in INSECURE_FLAGS:
            self.insecure_policy_sets.labels(flag)
        self._observe_request = RequestObserver(self.requests, self.latency)
        self._decision_children = LabelCache(self.decisions)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self._observe_request(seconds, route, method, status)

    def set_insecure_policies(self, counts: Mapping[str, int]) -> None:
        """The gauge of current insecure policies; every known flag gets a value (0 too)."""
        for flag in INSECURE_FLAGS:
            self.insecure_policies.labels(flag).set(counts.get(flag, 0))

    def observe_decision(self, action: str, decision: str, reasons: list[str]) -> None:
        self._decision_children(action, decision).inc()
        for reason in reasons:
            self.reasons.labels(_label(reason)).inc()
