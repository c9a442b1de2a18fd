"""The key server's ASGI application: ``create_app(settings, ...)``.

Nothing is created at import time. ``create_app`` either uses the store, master key,
release-signing key and verifiers it is given (tests, embedding) or opens them from the settings
when the app starts
(lifespan startup), i.e. *in the worker process* — an SQLAlchemy engine or a PKCS#11 session
must never cross a ``fork``. Startup also migrates the schema (safe on several replicas at
once) and starts a task that purges expired nonces and sessions.

HTTP concerns live here and in :mod:`sealtorch.keyserver.routes`; the logic is in
:class:`~sealtorch.keyserver.service.KeyService`.

The two requests of every key release (``POST /v1/attestation/challenge`` and ``POST
/v1/keys/release``) take a short path: the app answers them before FastAPI's middleware,
routing and dependency machinery (which costs about as much CPU as the protocol work itself),
with the same body cap, error shape, metrics and access log. Both ways run the same endpoint
function of :mod:`sealtorch.keyserver.routes.release` (:data:`~sealtorch.keyserver.routes.
release.FAST_ROUTES`); the FastAPI routes document the operations in the OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sealtorch import __version__
from sealtorch._metrics import LabelCache
from sealtorch._release_http import (
    BEARER_CHALLENGE,
    error_body,
    error_document,
    read_body,
    validation_message,
)
from sealtorch.attestation import VerifierSet, make_verifiers
from sealtorch.errors import ConfigError
from sealtorch.keyserver.masterkey import MasterKey, open_master_key
from sealtorch.keyserver.metrics import Metrics
from sealtorch.keyserver.routes import admin, health, release
from sealtorch.keyserver.runtime import Endpoint, Runtime
from sealtorch.keyserver.service import ErrorKind, KeyService, ServiceError
from sealtorch.keyserver.settings import KeyServerSettings
from sealtorch.keyserver.signingkey import ReleaseSigningKey, open_signing_key
from sealtorch.keyserver.store import Store, open_store
from sealtorch.protocol.checkpoint import AuditCheckpoint

__all__ = [
    "answer",
    "check_simulated_tee",
    "create_app",
    "error_response",
    "observe",
    "open_verifiers",
]

_log = logging.getLogger("sealtorch.keyserver")
_access = logging.getLogger("sealtorch.keyserver.access")

_PURGE_INTERVAL = 60.0
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    reasons: tuple[str, ...] | list[str] = (),
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The protocol's one error shape: ``{"error": {"code", "message", "reasons"}}``."""
    return JSONResponse(error_document(code, message, reasons), status_code=status, headers=headers)


def open_verifiers(
    settings: KeyServerSettings, clock: Callable[[], datetime] | None = None
) -> VerifierSet:
    """The verifiers the settings configure; none configured is allowed (every release is then
    refused with ``tee_not_allowed``/``simulated_not_allowed``) but logged as a warning.

    Trusted sim keys are refused (:class:`ConfigError`) unless
    ``allow_simulated_tee_insecure`` is set, and logged at WARNING when it is."""
    check_simulated_tee(settings)
    if not (settings.sim_trusted_keys or settings.pccs_url or settings.collateral_path):
        _log.warning(
            "no attestation verifier is configured: every key release will be refused; set "
            "[attestation] pccs_url / collateral_path (SGX, TDX) or sim_trusted_keys"
        )
        return VerifierSet()
    options: dict[str, Any] = {}
    if clock is not None:
        options["clock"] = clock
    return make_verifiers(
        pccs_url=settings.pccs_url,
        cache_dir=settings.collateral_cache_dir,
        collateral_path=settings.collateral_path,
        sim_trusted_keys=settings.sim_trusted_keys,
        **options,
    )


def check_simulated_tee(settings: KeyServerSettings) -> None:
    """Refuse trusted sim keys without ``allow_simulated_tee_insecure``; warn with it."""
    if not settings.sim_trusted_keys:
        return
    source = settings.sources.get("attestation.sim_trusted_keys", "settings")
    where = "keyserver.toml" if source == "file" else source.removeprefix("env:")
    if not settings.allow_simulated_tee_insecure:
        raise ConfigError(
            f"[attestation] sim_trusted_keys is set ({len(settings.sim_trusted_keys)} key(s), "
            f"from {where}): refusing to start, since simulated-TEE evidence is signed by a key "
            "on a host, not by hardware, and releases real keys to every policy naming 'sim'; "
            "for development only, add --allow-simulated-tee-insecure (or [attestation] "
            "allow_simulated_tee_insecure = true)"
        )
    _log.warning(
        "INSECURE: the simulated TEE is trusted (allow_simulated_tee_insecure): evidence "
        "signed by sim key(s) %s obtains the keys of every model whose policy names 'sim'; "
        "development only, never in production",
        ", ".join(settings.sim_trusted_keys),
        extra={"sim_trusted_keys": list(settings.sim_trusted_keys)},
    )


def observe(runtime: Runtime, scope: Scope, template: str, status: int, elapsed: float) -> None:
    """Metrics and the access log of one answered request."""
    runtime.metrics.observe_request(template, scope["method"], status, elapsed)
    if _access.isEnabledFor(logging.INFO):
        client = scope.get("client")
        _access.info(
            "%s %s %d",
            scope["method"],
            template,
            status,
            extra={
                "client_address": client[0] if client else None,
                "duration_ms": round(elapsed * 1000, 3),
            },
        )


def _too_large(cap: int) -> JSONResponse:
    return error_response(413, "request_too_large", f"request bodies are limited to {cap} bytes")


class _Guard:
    """Outermost layer of the FastAPI routes: request body cap (413), timing, metrics and the
    access log.

    Bodies are read here, up to the cap, before the app sees them (they are small: evidence and
    JSON), so a chunked body without Content-Length is capped as well.
    """

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        self.cap = runtime.settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_tracking(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            if scope["method"] in _BODY_METHODS:
                body = await read_body(scope, receive, self.cap)
                if body is None:
                    await _too_large(self.cap)(scope, receive, send_tracking)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_tracking)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            observe(self.runtime, scope, template, status, time.perf_counter() - started)


class _KeyServerApp(FastAPI):
    """FastAPI, plus the short path for the key release protocol (see the module docstring)."""

    runtime: Runtime
    fast_routes: dict[tuple[str, str], Endpoint]

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = release.document_bodies(super().openapi())
        return self.openapi_schema

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self.fast_routes.get((scope["method"], scope["path"]))
            if handler is not None:
                await self._answer(handler, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _answer(self, handler: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        runtime = self.runtime
        body = await read_body(scope, receive, runtime.settings.max_request_bytes)
        status, headers, content = await answer(runtime, handler, scope, body)
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": content})
        finally:
            observe(runtime, scope, scope["path"], status, time.perf_counter() - started)


async def answer(
    runtime: Runtime, handler: Endpoint, scope: Scope, body: bytes | None
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of a short-path request (``body`` None: over the cap): the
    endpoint's answer, or its error in the protocol's shape. Shared by the app's short path and
    the HTTP front (:mod:`sealtorch.keyserver._front`)."""
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
    if body is None:
        status, content = 413, _too_large(runtime.settings.max_request_bytes).body
    else:
        try:
            status, content = await handler(runtime, scope, body)
        except ServiceError as exc:
            status, content = exc.status, error_body(exc.code, str(exc), exc.reasons)
            if exc.kind is ErrorKind.UNAUTHENTICATED:
                headers.append(BEARER_CHALLENGE)
        except RequestValidationError as exc:
            status = 400
            content = error_body("invalid_request", validation_message(exc.errors()))
        except Exception as exc:  # noqa: BLE001 - the protocol's error shape, as in FastAPI
            _log.error(
                "internal error in %s %s: %s", scope["method"], scope["path"], type(exc).__name__
            )
            status = 500
            content = error_body("internal_error", "internal error; see the server log")
    headers.append((b"content-length", b"%d" % len(content)))
    return status, headers, bytes(content)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def create_app(
    settings: KeyServerSettings,
    *,
    store: Store | None = None,
    master_key: MasterKey | None = None,
    signing_key: ReleaseSigningKey | None = None,
    verifiers: VerifierSet | None = None,
    clock: Callable[[], datetime] | None = None,
) -> FastAPI:
    """The key server app. Pass ``store``/``master_key``/``signing_key``/``verifiers`` to use
    your own; anything not passed is opened from ``settings`` at startup (and closed at
    shutdown)."""
    metrics = Metrics()
    runtime = Runtime(
        settings=settings,
        metrics=metrics,
        limiter=anyio.CapacityLimiter(settings.verify_threads),
    )

    def observe_decision(action: str, decision: str, reasons: list[str], keys: int) -> None:
        metrics.observe_decision(action, decision, reasons)
        if keys:
            metrics.keys_released.inc(keys)

    simulated_children = LabelCache(metrics.simulated_tee_releases)

    def observe_simulated(decision: str) -> None:
        simulated_children(decision).inc()

    def build(s: Store, m: MasterKey, k: ReleaseSigningKey, v: VerifierSet) -> KeyService:
        service = KeyService(
            settings,
            store=s,
            master_key=m,
            signing_key=k,
            verifiers=v,
            clock=clock,
            observer=observe_decision,
            offload=runtime.run,
            simulated_observer=observe_simulated,
        )
        metrics.simulated_tee_trusted.set(1 if service.simulated_tee else 0)
        return service

    if (
        store is not None
        and master_key is not None
        and signing_key is not None
        and verifiers is not None
    ):
        runtime.service = build(store, master_key, signing_key, verifiers)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        del app
        if runtime.service is None:
            runtime.service = await anyio.to_thread.run_sync(
                lambda: _open_service(
                    settings, store, master_key, signing_key, verifiers, clock, build, runtime
                )
            )
        purge = asyncio.create_task(_purge_loop(runtime))
        interval = settings.audit_checkpoint_interval
        checkpoints = (
            asyncio.create_task(_checkpoint_loop(runtime, interval.total_seconds()))
            if interval
            else None
        )
        _log.info(
            "key server ready; release statements signed with key %s",
            runtime.service.release_public_key.key_id,
            extra={
                "settings": settings.describe(),
                "release_public_key": runtime.service.release_public_key.text,
            },
        )
        try:
            yield
        finally:
            for task in (purge, checkpoints):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            for resource in reversed(runtime.owned):
                with contextlib.suppress(Exception):
                    resource.close()
            runtime.owned.clear()

    app = _KeyServerApp(
        title="sealtorch key server",
        version=__version__,
        description="Attested key release (docs/protocol.md) and key administration "
        "(docs/keyserver.md).",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.runtime = runtime
    app.fast_routes = dict(release.FAST_ROUTES)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        del request
        headers = (
            {"WWW-Authenticate": 'Bearer realm="sealtorch"'}
            if exc.kind is ErrorKind.UNAUTHENTICATED
            else None
        )
        return error_response(exc.status, exc.code, str(exc), reasons=exc.reasons, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        del request
        return error_response(400, "invalid_request", validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        del request
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        _log.error(
            "internal error in %s %s: %s",
            request.method,
            request.url.path,
            type(exc).__name__,
        )
        return error_response(500, "internal_error", "internal error; see the server log")

    app.include_router(health.router)
    app.include_router(release.router)
    app.include_router(admin.router)
    app.add_middleware(_Guard, runtime=runtime)
    return app


def _open_service(
    settings: KeyServerSettings,
    store: Store | None,
    master_key: MasterKey | None,
    signing_key: ReleaseSigningKey | None,
    verifiers: VerifierSet | None,
    clock: Callable[[], datetime] | None,
    build: Callable[[Store, MasterKey, ReleaseSigningKey, VerifierSet], KeyService],
    runtime: Runtime,
) -> KeyService:
    if store is None:
        store = open_store(settings.database_url, clock=clock, **settings.store_options())
        runtime.owned.append(store)
        store.migrate()
    if master_key is None:
        master_key = open_master_key(settings.master_key)
        runtime.owned.append(master_key)
    if signing_key is None:
        if settings.signing_key is None:
            raise ConfigError(
                "no release-signing key is configured ([signing_key] in keyserver.toml); "
                "create one with `sealtorch keyserver signing-key create DATA_DIR`"
            )
        signing_key = open_signing_key(settings.signing_key)
        runtime.owned.append(signing_key)
    if verifiers is None:
        verifiers = open_verifiers(settings, clock)
    return build(store, master_key, signing_key, verifiers)


async def _purge_loop(runtime: Runtime) -> None:
    while True:
        await asyncio.sleep(_PURGE_INTERVAL)
        service = runtime.service
        if service is None:
            continue
        try:
            removed = await anyio.to_thread.run_sync(service.purge_expired)
        except Exception as exc:  # noqa: BLE001 - housekeeping must never stop the server
            _log.warning("purging expired nonces failed: %s", type(exc).__name__)
        else:
            if removed:
                _log.debug("purged %d expired nonces/sessions", removed)


async def _checkpoint_loop(runtime: Runtime, interval: float) -> None:
    """Log a signed audit checkpoint every ``interval`` seconds while the audit head moves, for
    log shipping to carry off this host (docs/keyserver.md, "Audit checkpoints")."""
    logged: tuple[int, str] | None = None
    while True:
        await asyncio.sleep(interval)
        service = runtime.service
        if service is None:
            continue
        try:
            signed = await anyio.to_thread.run_sync(service.admin.audit_checkpoint)
        except ServiceError as exc:  # store or signing key unavailable: try next time
            _log.warning("could not sign the periodic audit checkpoint: %s", exc)
            continue
        checkpoint = AuditCheckpoint.from_payload(signed.payload)
        if logged == (checkpoint.seq, checkpoint.head_hash):
            continue  # nothing happened since: no new line
        logged = (checkpoint.seq, checkpoint.head_hash)
        _log.info(
            "audit checkpoint %d:%s signed (keep it off this host)",
            checkpoint.seq,
            checkpoint.head_hash,
            extra={"audit_checkpoint": json.loads(signed.model_dump_json())},
        )
