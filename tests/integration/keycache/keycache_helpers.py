"""Helpers for key cache integration tests: a key server that can be stopped and restarted on
the same Unix socket (with the same release-signing key), and a key cache (real app, real
socket) in front of it that pins that key, as do the clients of the cache."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from _fixtures.clock import FakeClock
from _fixtures.keyserver import KeyServerUnderTest, new_signing_key, running_keyserver
from sealtorch._crypto import hpke
from sealtorch._http_fast import HttpServer
from sealtorch._listen import listen_unix
from sealtorch.attestation import SimAttester, report_data_for
from sealtorch.client import KeyReleaseClient
from sealtorch.keycache import KeyCache, KeyCacheApp, LocalReleaseService, build_cache
from sealtorch.keycache.settings import KeyCacheSettings
from sealtorch.keyserver.signingkey import ReleaseSigningKey
from sealtorch.keyserver.store import Store
from sealtorch.protocol import DEFAULT_HPKE_SUITE, b64encode


@dataclass
class Attesters:
    """One simulated host: every role signs with the same host key (as on one machine)."""

    key_path: Path
    app: SimAttester
    cache: SimAttester
    serve: SimAttester

    @property
    def public_key(self) -> str:
        return self.app.public_key

    def policy(self, *roles: str, **extra: Any) -> dict[str, Any]:
        """A sim policy allowing the measurements of ``roles`` (default: cache and app)."""
        chosen = roles or ("cache", "app")
        document: dict[str, Any] = {
            "version": 1,
            "name": "test",
            "allowed_tees": ["sim"],
            "sim": {"mrenclave": [getattr(self, role).mrenclave for role in chosen]},
        }
        document.update(extra)
        return document


def make_attesters(directory: Path) -> Attesters:
    key = directory / "sim.key"
    made = Attesters(
        key_path=key,
        app=SimAttester(role="app", key_path=key),
        cache=SimAttester(role="keycache", key_path=key),
        serve=SimAttester(role="serve", key_path=key),
    )
    for attester in (made.app, made.cache, made.serve):
        assert attester.mrenclave
    return made


@dataclass
class KeyServerControl:
    """A key server on a fixed Unix socket that tests can stop and start again."""

    tmp: Path
    store: Store
    master: Any
    attester: SimAttester
    clock: FakeClock
    settings: dict[str, Any] = field(default_factory=dict)
    signing_key: ReleaseSigningKey = field(default_factory=new_signing_key)
    socket: Path = field(init=False)
    running: KeyServerUnderTest | None = None
    _stack: contextlib.ExitStack | None = None

    def __post_init__(self) -> None:
        self.socket = self.tmp / "ks.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def release_key(self) -> str:
        """The release-signing public key that caches and clients pin."""
        return self.signing_key.public_key.text

    def start(self) -> KeyServerUnderTest:
        assert self.running is None
        self.socket.unlink(missing_ok=True)
        stack = contextlib.ExitStack()
        self.running = stack.enter_context(
            running_keyserver(
                self.tmp,
                store=self.store,
                master=self.master,
                attester=self.attester,
                clock=self.clock,
                uds=self.socket,
                signing_key=self.signing_key,
                **self.settings,
            )
        )
        self._stack = stack
        return self.running

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack = None
        self.running = None
        self.socket.unlink(missing_ok=True)

    @property
    def server(self) -> KeyServerUnderTest:
        assert self.running is not None, "the key server is stopped"
        return self.running


@dataclass
class CacheUnderTest:
    """An in-process key cache serving the real app on a real Unix socket."""

    cache: KeyCache
    service: LocalReleaseService
    app: KeyCacheApp
    socket: Path
    settings: KeyCacheSettings

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self, attester: SimAttester, **options: Any) -> KeyReleaseClient:
        """A local client pinning the key server's release-signing key (the cache forwards
        the key server's statements)."""
        options.setdefault("trusted_release_keys", self.settings.keyserver_pubkeys)
        return KeyReleaseClient(self.url, attester=attester, **options)

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url="http://sealtorch.local", transport=httpx.HTTPTransport(uds=str(self.socket))
        )


def cache_settings(
    tmp: Path,
    attesters: Attesters,
    keyserver: KeyServerControl | KeyServerUnderTest,
    **changes: Any,
) -> KeyCacheSettings:
    """Settings of a cache in front of ``keyserver``, pinning its release-signing key."""
    base = KeyCacheSettings(
        keyserver_url=keyserver.url,
        keyserver_pubkeys=(keyserver.release_key,),
        tee="sim",
        sim_key=attesters.key_path,
        socket_path=tmp / "kc.sock",
        local_sim_trusted_keys=(attesters.public_key,),
        refresh_interval=timedelta(seconds=60),
        backoff_initial=1.0,
        backoff_max=8.0,
    )
    return base.with_overrides(**changes)


class CacheServerThread:
    """The production HTTP server (:mod:`sealtorch._http_fast`) with ``app`` on a Unix
    socket, in its own event loop thread."""

    def __init__(self, app: KeyCacheApp, socket: Path) -> None:
        self.app = app
        self.socket = socket
        self.loop = asyncio.new_event_loop()
        self.server = HttpServer(
            app.dispatch, refusal=app.refusal, observe=app.observe, max_body=app.max_request_bytes
        )
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> CacheServerThread:
        sock = listen_unix(self.socket)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.listen(sock), self.loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(grace=5), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()
        self.socket.unlink(missing_ok=True)


@contextlib.contextmanager
def running_cache(
    settings: KeyCacheSettings,
    *,
    clock: FakeClock,
    attester: SimAttester,
    start: bool = True,
) -> Iterator[CacheUnderTest]:
    """Build the cache (fake clock, no background thread: tests drive :meth:`KeyCache.tick`),
    start it, and serve its app on ``settings.socket_path``.

    ``attester`` is the cache's own: pass the one whose measurement the policies were written
    with (a sim measurement covers every package file, and other work may edit them meanwhile).
    """
    assert settings.socket_path is not None
    cache, service = build_cache(settings, clock=clock, attester=attester)
    if start:
        cache.start()
    app = KeyCacheApp(cache, service)
    try:
        with CacheServerThread(app, settings.socket_path):
            yield CacheUnderTest(cache, service, app, settings.socket_path, settings)
    finally:
        cache.close()


def release_body(
    attester: SimAttester,
    nonce: bytes,
    *,
    models: list[str] | None = None,
    public_key: bytes | None = None,
) -> tuple[dict[str, Any], hpke.HpkePrivateKey]:
    """A release request as an enclave builds it (for tests that send raw requests)."""
    private = hpke.generate_private_key(DEFAULT_HPKE_SUITE)
    bound = private.public_key().encode()
    evidence = attester.evidence(
        report_data_for(nonce=nonce, hpke_suite=DEFAULT_HPKE_SUITE, public_key=bound)
    )
    body = {
        "nonce": b64encode(nonce),
        "evidence": {"type": evidence.type, "data": b64encode(evidence.data)},
        "hpke": {
            "suite": DEFAULT_HPKE_SUITE,
            "public_key": b64encode(public_key if public_key is not None else bound),
        },
        "models": models,
    }
    return body, private


def fresh_nonce(http: httpx.Client) -> bytes:
    from sealtorch.protocol import b64decode

    response = http.post("/v1/attestation/challenge", json={})
    assert response.status_code == 200, response.text
    return b64decode(response.json()["nonce"])


def random_model_id(prefix: str = "m") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"
