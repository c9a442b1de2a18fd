"""The shared Prometheus machinery (sealtorch._metrics) and what the servers build on it."""

from __future__ import annotations

import pytest

from sealtorch._metrics import CONTENT_TYPE, LabelCache, MetricsRegistry, bounded_label
from sealtorch.keycache.metrics import CacheMetrics
from sealtorch.keyserver.metrics import Metrics


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/v1/keys/release", "/v1/keys/release"),
        ("r" * 64, "r" * 64),
        ("r" * 65, "other"),
        ("/x\n# HELP injected", "other"),
        ("\x00", "other"),
    ],
)
def test_bounded_label(value: str, expected: str) -> None:
    assert bounded_label(value) == expected


def test_client_chosen_routes_cannot_create_time_series() -> None:
    metrics = Metrics()
    for i in range(300):
        metrics.observe_request("/" + "a" * 64 + str(i), "GET", 404, 0.001)
    text = metrics.render().decode()
    series = 'sealtorch_keyserver_requests_total{method="GET",route="other",status="404"}'
    assert f"{series} 300.0" in text
    assert text.count("sealtorch_keyserver_requests_total{") == 1


def test_label_cache_resolves_once_and_stays_bounded() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("t_requests", "Requests", ["route"])
    children = LabelCache(counter, limit=2)
    assert children("/a") is children("/a")
    children("/b")
    children("/c")  # over the limit: resolved, counted, not remembered
    children("/c").inc(2)
    assert len(children) == 2
    assert 't_requests_total{route="/c"} 2.0' in registry.render().decode()


def test_registries_are_private_to_each_server() -> None:
    first, second = CacheMetrics(), CacheMetrics()
    first.observe_decision("release", "allow", [], 3)
    assert b"sealtorch_keycache_keys_released_total 3.0" in first.render()
    assert b"sealtorch_keycache_keys_released_total 0.0" in second.render()
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_histogram_uses_the_declared_buckets() -> None:
    registry = MetricsRegistry()
    registry.histogram("t_seconds", "Time", ["route"], buckets=(0.5, 2)).labels("/a").observe(1)
    text = registry.render().decode()
    assert 't_seconds_bucket{le="0.5",route="/a"} 0.0' in text
    assert 't_seconds_bucket{le="2.0",route="/a"} 1.0' in text
    assert 't_seconds_bucket{le="+Inf",route="/a"} 1.0' in text
