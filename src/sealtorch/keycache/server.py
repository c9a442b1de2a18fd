"""Building and running a key cache process: ``sealtorch keycache serve``.

:func:`build_cache` turns :class:`~sealtorch.keycache.settings.KeyCacheSettings` into a
:class:`~sealtorch.keycache.cache.KeyCache` and its
:class:`~sealtorch.keycache.service.LocalReleaseService` (attester, upstream client, local
verifiers, sealed state). :func:`run` starts it: restore, attest and fetch, bind the listeners,
print the ready line, serve until SIGTERM/SIGINT (SIGHUP refreshes at once).

Listeners (served by the small HTTP/1.1 server in :mod:`sealtorch._http_fast`):

* the Unix socket (``--socket``), created under a restrictive umask and then set to its mode
  (0600, or 0660 with ``--socket-group``) — never briefly open to everyone;
* optional loopback TCP (``--tcp``), HTTPS when ``--tls-cert``/``--tls-key`` are given;
* optional metrics listener (``--metrics``): health, status and ``/metrics`` only, no keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from sealtorch._http_fast import HttpServer, run_server
from sealtorch._listen import host_port, listen_tcp, listen_unix, socket_url, tls_context
from sealtorch.attestation import EvidenceProvider, attester_for, make_verifiers
from sealtorch.errors import ConfigError
from sealtorch.keycache.app import KeyCacheApp
from sealtorch.keycache.cache import KeyCache
from sealtorch.keycache.clock import MonotonicClock
from sealtorch.keycache.metrics import CacheMetrics
from sealtorch.keycache.persist import PlatformSealer, SealedState
from sealtorch.keycache.service import LocalReleaseService
from sealtorch.keycache.settings import KeyCacheSettings
from sealtorch.keycache.upstream import Upstream

__all__ = [
    "Listeners",
    "build_cache",
    "build_state",
    "cache_attester",
    "run",
]

_log = logging.getLogger("sealtorch.keycache")


# -- building --------------------------------------------------------------------------------


def cache_attester(settings: KeyCacheSettings) -> EvidenceProvider:
    """The cache's own evidence provider (sim role ``keycache``)."""
    if settings.tee == "sim":
        return attester_for("sim", role="keycache", key_path=settings.sim_key)
    return attester_for(settings.tee, root=settings.tee_root)


def _measurement(settings: KeyCacheSettings, attester: EvidenceProvider) -> str | None:
    """The cache's own code measurement, when it can know it (for status and sealing)."""
    mrenclave = getattr(attester, "mrenclave", None)
    if isinstance(mrenclave, str):
        return mrenclave
    if settings.tee == "gramine":
        target = Path(settings.tee_root or "/dev/attestation") / "my_target_info"
        with contextlib.suppress(OSError):
            info = target.read_bytes()
            if len(info) >= 32:
                return info[:32].hex()
    return None


def build_state(settings: KeyCacheSettings, measurement: str | None) -> SealedState | None:
    """The sealed state file, if ``--persist`` is set."""
    if settings.persist_path is None:
        return None
    if settings.tee == "gramine":
        sealer = PlatformSealer.for_gramine(settings.tee_root or "/dev/attestation")
    elif settings.tee == "sim":
        if measurement is None:  # pragma: no cover - the sim attester always knows it
            raise ConfigError("cannot seal: the sim measurement is unknown")
        key_file = settings.sim_sealing_key or settings.persist_path.with_name(
            settings.persist_path.name + ".sealing-key"
        )
        sealer = PlatformSealer.for_sim(key_file=key_file, measurement=measurement)
    else:  # pragma: no cover - the settings refuse tdx persistence
        raise ConfigError("TDX has no platform sealing key")
    return SealedState(
        settings.persist_path, sealer, trusted_release_keys=settings.trusted_release_keys()
    )


def build_cache(
    settings: KeyCacheSettings,
    *,
    clock: Callable[[], datetime] | None = None,
    attester: EvidenceProvider | None = None,
    transport: httpx.BaseTransport | None = None,
    metrics: CacheMetrics | None = None,
) -> tuple[KeyCache, LocalReleaseService]:
    """The cache and its local release service, not started (see :meth:`KeyCache.start`)."""
    clock = clock or MonotonicClock()
    attester = attester or cache_attester(settings)
    measurement = _measurement(settings, attester)
    verifiers = make_verifiers(
        pccs_url=settings.local_pccs_url,
        cache_dir=settings.local_collateral_cache_dir,
        collateral_path=settings.local_collateral_path,
        sim_trusted_keys=settings.local_sim_trusted_keys,
        clock=clock,
    )
    upstream = Upstream(
        settings.keyserver_url,
        attester=attester,
        models=settings.models,
        clock=clock,
        trusted_release_keys=settings.trusted_release_keys(),
        ca=settings.keyserver_ca,
        suite=settings.hpke_suite,
        timeout=settings.keyserver_timeout,
        transport=transport,
    )
    cache = KeyCache(
        upstream=upstream,
        clock=clock,
        tee=settings.tee,
        measurement=measurement,
        refresh_interval=settings.refresh_interval,
        renew_fraction=settings.renew_fraction,
        backoff_initial=settings.backoff_initial,
        backoff_max=settings.backoff_max,
        state=build_state(settings, measurement),
        metrics=metrics,
    )
    service = LocalReleaseService(
        holdings=cache.holdings,
        verifiers=verifiers,
        clock=clock,
        nonce_ttl=settings.nonce_ttl,
        session_duration=settings.session_duration,
        observer=cache.metrics.observe_decision,
        simulated_observer=lambda decision: cache.metrics.simulated_tee_releases.labels(
            decision
        ).inc(),
    )
    cache.metrics.simulated_tee_trusted.set(1 if "sim" in verifiers.evidence_types else 0)
    return cache, service


# -- listening -------------------------------------------------------------------------------


@dataclass
class Listeners:
    """The bound sockets of one key cache process."""

    unix: socket.socket | None = None
    tcp: socket.socket | None = None
    metrics: socket.socket | None = None
    unix_path: Path | None = None

    @classmethod
    def bind(cls, settings: KeyCacheSettings) -> Listeners:
        bound = cls()
        try:
            if settings.socket_path is not None:
                bound.unix = listen_unix(
                    settings.socket_path, mode=settings.socket_mode, group=settings.socket_group
                )
                bound.unix_path = settings.socket_path
            if settings.tcp is not None:
                host, _ = settings.tcp
                bound.tcp = listen_tcp(*settings.tcp, free_port=f"--tcp {host_port(host, 0)}")
            if settings.metrics is not None:
                host, _ = settings.metrics
                bound.metrics = listen_tcp(
                    *settings.metrics, free_port=f"--metrics {host_port(host, 0)}"
                )
        except ConfigError:
            bound.close()
            raise
        return bound

    def urls(self, *, tls: bool) -> list[str]:
        out = []
        if self.unix_path is not None:
            out.append(f"unix://{self.unix_path}")
        if self.tcp is not None:
            out.append(socket_url(self.tcp, scheme="https" if tls else "http"))
        return out

    def metrics_url(self) -> str | None:
        return socket_url(self.metrics, scheme="http") if self.metrics is not None else None

    def close(self) -> None:
        """Close every socket (uvicorn may have closed them already) and remove the socket
        file."""
        for sock in (self.unix, self.tcp, self.metrics):
            if sock is not None:
                sock.close()
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                self.unix_path.unlink()


# -- serving ---------------------------------------------------------------------------------


async def serve(
    settings: KeyCacheSettings,
    cache: KeyCache,
    service: LocalReleaseService,
    listeners: Listeners,
    *,
    on_ready: Callable[[], None],
    stop: asyncio.Event,
    grace: float = 5.0,
) -> None:
    """Serve every listener until ``stop`` is set, then finish the requests in progress."""
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="keycache-verify")
    full = KeyCacheApp(
        cache, service, max_request_bytes=settings.max_request_bytes, executor=executor
    )
    servers: list[HttpServer] = []
    try:
        main = HttpServer(
            full.dispatch,
            refusal=full.refusal,
            observe=full.observe,
            max_body=settings.max_request_bytes,
            timeouts=settings.read_timeouts,
        )
        servers.append(main)
        if listeners.unix is not None:
            await main.listen(listeners.unix)
        if listeners.tcp is not None:
            context = None
            if settings.tls_cert is not None and settings.tls_key is not None:
                context = tls_context(settings.tls_cert, settings.tls_key)
            await main.listen(listeners.tcp, ssl_context=context)
        if listeners.metrics is not None:
            metrics_app = KeyCacheApp(cache, service, metrics_only=True)
            side = HttpServer(
                metrics_app.dispatch,
                refusal=metrics_app.refusal,
                observe=metrics_app.observe,
                timeouts=settings.read_timeouts,
            )
            servers.append(side)
            await side.listen(listeners.metrics)
        on_ready()
        await stop.wait()
    finally:
        for server in servers:
            await server.close(grace=grace)
        executor.shutdown(wait=False, cancel_futures=True)


def check_simulated_tee(settings: KeyCacheSettings) -> None:
    """Refuse trusted sim keys for local enclaves without ``allow_simulated_tee_insecure``;
    warn with it (as the key server does)."""
    keys = settings.local_sim_trusted_keys
    if not keys:
        return
    if not settings.local_allow_simulated_tee_insecure:
        raise ConfigError(
            f"[local] sim_trusted_keys is set ({len(keys)} key(s), e.g. --trust-sim-key): "
            "refusing to start, since simulated-TEE evidence is signed by a key on a host, not "
            "by hardware, and this cache would release keys to anyone holding it; for "
            "development only, add --allow-simulated-tee-insecure (or [local] "
            "allow_simulated_tee_insecure = true)"
        )
    _log.warning(
        "INSECURE: the simulated TEE is trusted for local enclaves "
        "(allow_simulated_tee_insecure): evidence signed by sim key(s) %s obtains keys whose "
        "policy names 'sim'; development only, never in production",
        ", ".join(keys),
        extra={"sim_trusted_keys": list(keys)},
    )


def run(settings: KeyCacheSettings, *, announce: Callable[[str], None]) -> None:
    """The whole ``sealtorch keycache serve`` lifecycle (blocking)."""
    check_simulated_tee(settings)
    cache, service = build_cache(settings)
    _log.info("key cache starting", extra={"settings": settings.describe()})
    listeners = Listeners.bind(settings)  # before attesting: fail fast on a busy path/port
    try:
        cache.start()
        cache.start_background()

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            loop.add_signal_handler(signal.SIGHUP, cache.wake)

            def ready() -> None:
                metrics_url = listeners.metrics_url()
                if metrics_url:
                    announce(f"metrics: {metrics_url}/metrics")
                models = len(cache.status().models)
                urls = " ".join(listeners.urls(tls=settings.tcp_tls))
                announce(f"ready: {urls} ({models} model{'s' if models != 1 else ''})")

            await serve(settings, cache, service, listeners, on_ready=ready, stop=stop)

        run_server(main())
    finally:
        cache.close()
        listeners.close()
    _log.info("key cache stopped")
