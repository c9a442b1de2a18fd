"""Prometheus metrics of the inference server (one registry per server, never the global one).

Label values are bounded: ``model`` is a served model name or ``""`` (requests naming a model
the server does not serve), ``route`` is the route template (``/v2/models/{name}/infer``) or
``unmatched``, so a client cannot create new time series by inventing names.
"""

from __future__ import annotations

from typing import Final

from sealtorch._metrics import CONTENT_TYPE, MetricsRegistry

__all__ = ["CONTENT_TYPE", "ServingMetrics"]

_LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class ServingMetrics(MetricsRegistry):
    """Request counts, latencies, in-flight requests and model load figures."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = self.counter(
            "sealtorch_inference_requests",
            "Inference requests by model and HTTP status",
            ["model", "status"],
        )
        self.latency = self.histogram(
            "sealtorch_inference_request_seconds",
            "Inference request latency (body read, queue, decode, model, encode)",
            ["model"],
            buckets=_LATENCY_BUCKETS,
        )
        self.compute = self.histogram(
            "sealtorch_inference_compute_seconds",
            "Time spent in the model's forward pass",
            ["model"],
            buckets=_LATENCY_BUCKETS,
        )
        self.in_flight = self.gauge(
            "sealtorch_inference_in_flight", "Inference requests being processed or queued"
        )
        self.load_seconds = self.gauge(
            "sealtorch_model_load_seconds",
            "Time to obtain the key, decrypt, build and warm up the model",
            ["model"],
        )
        self.load_phase_seconds = self.gauge(
            "sealtorch_model_load_phase_seconds",
            "Model load time by phase: key_release (attestation and key release), decrypt "
            "(authenticate and decrypt), build (build the module), warmup",
            ["model", "phase"],
        )
        self.ready = self.gauge(
            "sealtorch_model_ready",
            "1 when the model is decrypted, warmed up and serving",
            ["model"],
        )
        self.info = self.gauge(
            "sealtorch_model_info",
            "Served models (sealed=false only for plain models served through the Python API)",
            ["model", "version", "sealed"],
        )
        self.http = self.counter(
            "sealtorch_http_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
        )
        self.grpc = self.counter(
            "sealtorch_grpc_requests",
            "gRPC inference calls by method and status code",
            ["method", "code"],
        )

    def finished(self, model: str, status: int, seconds: float) -> None:
        """An inference request (either protocol) ended with ``status`` (an HTTP status; a gRPC
        call's is that of the same refusal) after ``seconds``; it was counted in flight."""
        self.in_flight.dec()
        self.requests.labels(model, str(status)).inc()
        self.latency.labels(model).observe(seconds)
