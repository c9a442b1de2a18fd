"""The key cache's HTTP app on a real Unix socket, and ``sealtorch keycache status``/``serve``
from the command line (the cache here gets its keys from a scripted upstream)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from keycache_units import Host, StubUpstream, released, result_with

from _fixtures.clock import FakeClock
from _fixtures.keyserver import ServerThread
from sealtorch.attestation import make_verifiers
from sealtorch.cli import cli
from sealtorch.keycache import KeyCache, KeyCacheApp, LocalReleaseService
from sealtorch.keycache.upstream import Refused


class Served:
    def __init__(self, cache: KeyCache, socket: Path, metrics_socket: Path) -> None:
        self.cache = cache
        self.socket = socket
        self.metrics_socket = metrics_socket

    def http(self, metrics: bool = False) -> httpx.Client:
        path = self.metrics_socket if metrics else self.socket
        return httpx.Client(
            base_url="http://sealtorch.local", transport=httpx.HTTPTransport(uds=str(path))
        )


@pytest.fixture
def upstream(clock: FakeClock) -> StubUpstream:
    return StubUpstream(clock)


@pytest.fixture
def served(
    tmp_path: Path, host: Host, clock: FakeClock, upstream: StubUpstream
) -> Iterator[Served]:
    cache = KeyCache(upstream=upstream, clock=clock, tee="sim", measurement=host.cache.mrenclave)
    service = LocalReleaseService(
        holdings=cache.holdings,
        verifiers=make_verifiers(sim_trusted_keys=[host.app.public_key]),
        clock=clock,
        observer=cache.metrics.observe_decision,
    )
    full = KeyCacheApp(cache, service, max_request_bytes=8192)
    metrics_only = KeyCacheApp(cache, service, metrics_only=True)
    with (
        ServerThread(full, uds=tmp_path / "kc.sock"),
        ServerThread(metrics_only, uds=tmp_path / "metrics.sock"),
    ):
        yield Served(cache, tmp_path / "kc.sock", tmp_path / "metrics.sock")


def _grant(clock: FakeClock, host: Host, upstream: StubUpstream, served: Served) -> None:
    upstream.outcomes.append(
        result_with(clock, [released("m1", host.policy(), expires=clock() + timedelta(minutes=10))])
    )
    served.cache.refresh_once()


def test_health_readiness_and_status(
    served: Served, clock: FakeClock, host: Host, upstream: StubUpstream
) -> None:
    with served.http() as http:
        assert http.get("/healthz").json() == {"status": "ok", "simulated_tee": True}
        starting = http.get("/readyz")
        assert starting.status_code == 503
        assert starting.json()["error"]["reasons"] == ["starting"]
        _grant(clock, host, upstream, served)
        assert http.get("/readyz").json() == {"status": "ready", "simulated_tee": True}
        status = http.get("/v1/keycache/status").json()
        assert status["state"] == "ready"
        assert status["models"][0]["model_id"] == "m1"
        assert status["attestation"]["measurement"] == host.cache.mrenclave
        metrics = http.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        assert "sealtorch_keycache_models_held 1.0" in metrics.text
        assert 'sealtorch_keycache_refreshes_total{how="release",outcome="ok"} 1.0' in metrics.text


def test_metrics_listener_serves_no_keys(served: Served) -> None:
    with served.http(metrics=True) as http:
        assert http.get("/metrics").status_code == 200
        assert http.get("/v1/keycache/status").status_code == 200
        for path in ("/v1/attestation/challenge", "/v1/keys/release", "/v1/keys/renew"):
            refused = http.post(path, json={})
            assert refused.status_code == 404
            assert refused.json()["error"]["code"] == "not_found"


def test_bodies_are_capped_even_without_content_length(served: Served) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"x" * 1024

    with served.http() as http:
        response = http.post("/v1/keys/release", content=chunks())
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"


def test_unexpected_errors_are_a_plain_500(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> Any:
        raise RuntimeError("secret internals")

    app_service = served.cache  # the service is reached through the app; break the cache status
    monkeypatch.setattr(app_service, "status", broken)
    with served.http() as http:
        response = http.get("/v1/keycache/status")
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "code": "internal_error",
            "message": "internal error; see the key cache log",
            "reasons": [],
        }
    }
    assert "secret internals" not in caplog.text


# -- the command line ----------------------------------------------------------------------------


def test_status_command(
    served: Served, clock: FakeClock, host: Host, upstream: StubUpstream
) -> None:
    _grant(clock, host, upstream, served)
    runner = CliRunner()
    shown = runner.invoke(cli, ["keycache", "status", "--socket", str(served.socket)])
    assert shown.exit_code == 0, shown.output
    assert "state:          ready" in shown.output
    assert "m1" in shown.output
    as_json = runner.invoke(cli, ["keycache", "status", "--socket", str(served.socket), "--json"])
    assert json.loads(as_json.output)["models"][0]["key_versions"] == [1]
    ready = runner.invoke(
        cli, ["keycache", "status", "--socket", str(served.socket), "--require-ready"]
    )
    assert ready.exit_code == 0


def test_status_command_on_a_refused_cache(served: Served, upstream: StubUpstream) -> None:
    upstream.outcomes.append(
        Refused(
            "the key server refused this key cache: evidence refused (attestation_key_untrusted)",
            code="attestation_key_untrusted",
            reasons=("attestation_key_untrusted",),
        )
    )
    served.cache.refresh_once()
    result = CliRunner().invoke(
        cli,
        ["keycache", "status", "--socket", str(served.socket), "--require-ready"],
    )
    assert result.exit_code == 3
    assert "state:          denied" in result.output
    assert "reasons:      attestation_key_untrusted" in result.output


def test_status_command_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli, ["keycache", "status", "--socket", str(tmp_path / "none.sock")])
    assert missing.exit_code == 1
    assert "cannot reach the key cache" in missing.output
    both = runner.invoke(cli, ["keycache", "status", "--socket", "a", "--url", "http://b:1"])
    assert both.exit_code == 2
    neither = runner.invoke(cli, ["keycache", "status"])
    assert neither.exit_code == 2


def test_serve_refuses_bad_settings_before_starting(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "keycache", "serve", "--keyserver", "https://keys.test:8443", "--tee", "sim",
            "--socket", str(tmp_path / "kc.sock"), "--tcp", "0.0.0.0:7443",
            "--trust-sim-key", "ed25519:" + "11" * 32,
        ],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "loopback" in result.output
    assert not (tmp_path / "kc.sock").exists()


def test_help_teaches_with_examples() -> None:
    runner = CliRunner()
    group = runner.invoke(cli, ["keycache", "--help"])
    assert "serve" in group.output
    assert "status" in group.output
    serve = runner.invoke(cli, ["keycache", "serve", "--help"])
    for needle in ("--keyserver", "--socket-group", "--persist", "ready: URL", "Examples:"):
        assert needle in serve.output
    status = runner.invoke(cli, ["keycache", "status", "--help"])
    assert "never key material" in status.output


def test_unix_transport_closes_sockets_whose_connect_failed(tmp_path: Path) -> None:
    import gc

    from sealtorch._uds import UnixSocketTransport

    transport = UnixSocketTransport(str(tmp_path / "nobody-listens.sock"))
    with (
        httpx.Client(base_url="http://sealtorch.local", transport=transport) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.get("/healthz")
    gc.collect()  # a leaked socket would raise a ResourceWarning here (warnings are errors)
