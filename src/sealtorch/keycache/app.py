"""The key cache's HTTP endpoint: routes, the protocol's error shape, metrics.

It serves the key release protocol (``docs/protocol.md``) with the key server's exact request
and response schemas and error shape, plus health, status and Prometheus metrics:

========================================  ==========================================
``POST /v1/attestation/challenge``         fresh single-use nonce (in memory)
``POST /v1/keys/release``                  attested release from the cache's holdings
``POST /v1/keys/renew``                    renewal with a local session token
``GET /v1/keycache/status``                held models, leases, key server reachability
``GET /healthz`` / ``GET /readyz``          liveness / "holds at least one usable key"
``GET /metrics``                           Prometheus exposition
========================================  ==========================================

:class:`KeyCacheApp` is framework-free: :meth:`KeyCacheApp.dispatch` turns a
:class:`~sealtorch._http_fast.Request` into a :class:`~sealtorch._http_fast.Response`.
``sealtorch keycache serve`` runs it on the small HTTP server in
:mod:`sealtorch._http_fast` (the release path is the hot path); the app is also an ASGI
application (``await app(scope, receive, send)``) for embedding in any ASGI server. ``sim``
evidence is verified on the event loop (~0.15 ms); DCAP evidence in a worker thread. A
``metrics_only`` app (the ``--metrics`` listener) serves only health, status and metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from pydantic import BaseModel, ValidationError

from sealtorch._http_fast import Request, Response
from sealtorch._release import INLINE_EVIDENCE
from sealtorch._release_http import (
    BEARER_CHALLENGE,
    HTTP_STATUS,
    error_body,
    read_body,
    validation_message,
)
from sealtorch.keycache.cache import KeyCache
from sealtorch.keycache.metrics import CONTENT_TYPE, CacheMetrics
from sealtorch.keycache.service import LocalError, LocalReleaseService
from sealtorch.protocol import API_PREFIX, ReleaseRequest, RenewRequest

__all__ = ["STATUS_PATH", "KeyCacheApp", "error_response"]

_log = logging.getLogger("sealtorch.keycache")

STATUS_PATH: Final = f"{API_PREFIX}/keycache/status"
_JSON: Final = (b"content-type", b"application/json")

Scope = Mapping[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
_Route = Callable[[Request], "Response | Awaitable[Response]"]


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    reasons: tuple[str, ...] | list[str] = (),
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Response:
    """The protocol's one error shape: ``{"error": {"code", "message", "reasons"}}``."""
    return Response(status, error_body(code, message, reasons), [_JSON, *(headers or [])])


def _refusal(status: int, code: str, message: str) -> Response:
    return error_response(status, code, message)


def _ok(model: BaseModel) -> Response:
    return Response(200, model.model_dump_json().encode(), [_JSON])


def _invalid(exc: ValidationError) -> Response:
    errors = exc.errors(include_url=False, include_input=False)
    return error_response(400, "invalid_request", validation_message(errors))


class KeyCacheApp:
    """Routes of one key cache listener (see the module docstring)."""

    def __init__(
        self,
        cache: KeyCache,
        service: LocalReleaseService,
        *,
        max_request_bytes: int = 64 * 1024,
        metrics_only: bool = False,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.cache = cache
        self.service = service
        self.metrics: CacheMetrics = cache.metrics
        self.max_request_bytes = max_request_bytes
        self._executor = executor
        routes: dict[str, tuple[str, _Route]] = {
            "/healthz": ("GET", self._healthz),
            "/readyz": ("GET", self._readyz),
            "/metrics": ("GET", self._metrics),
            STATUS_PATH: ("GET", self._status),
        }
        if not metrics_only:
            routes[f"{API_PREFIX}/attestation/challenge"] = ("POST", self._challenge)
            routes[f"{API_PREFIX}/keys/release"] = ("POST", self._release)
            routes[f"{API_PREFIX}/keys/renew"] = ("POST", self._renew)
        self._routes = routes
        self.refusal = _refusal

    # -- dispatch -------------------------------------------------------------------------------

    def dispatch(self, request: Request) -> Response | Awaitable[Response]:
        """The response to ``request``, or an awaitable of it (work done in a thread)."""
        started = time.perf_counter()
        entry = self._routes.get(request.path)
        if entry is None:
            return self._done("unmatched", error_response(404, "not_found", "Not Found"), started)
        method, route = entry
        if request.method != method:
            refused = error_response(
                405,
                "method_not_allowed",
                "Method Not Allowed",
                headers=[(b"allow", method.encode())],
            )
            return self._done(request.path, refused, started)
        try:
            outcome = route(request)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: never a stack trace
            return self._done(request.path, self._internal(request, exc), started)
        if isinstance(outcome, Response):
            return self._done(request.path, outcome, started)
        return self._finish(request, outcome, started)

    async def _finish(
        self, request: Request, pending: Awaitable[Response], started: float
    ) -> Response:
        try:
            response = await pending
        except Exception as exc:  # noqa: BLE001 - as above
            response = self._internal(request, exc)
        return self._done(request.path, response, started)

    def _done(self, route: str, response: Response, started: float) -> Response:
        self.metrics.observe_request(route, response.status, time.perf_counter() - started)
        return response

    def observe(self, route: str, status: int) -> None:
        """Count a request the HTTP layer refused itself (malformed, too large)."""
        self.metrics.observe_request(route, status, 0.0)

    @staticmethod
    def _internal(request: Request, exc: Exception) -> Response:
        _log.error("internal error in %s %s: %s", request.method, request.path, type(exc).__name__)
        return error_response(500, "internal_error", "internal error; see the key cache log")

    # -- ASGI -----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            return
        body = await read_body(scope, receive, self.max_request_bytes)
        if body is None:
            response = error_response(
                413,
                "request_too_large",
                f"request bodies are limited to {self.max_request_bytes} bytes",
            )
            self.observe("unmatched", 413)
        else:
            request = Request(
                method=scope["method"],
                path=scope["path"],
                headers=[(name.lower(), value) for name, value in scope.get("headers", ())],
                body=body,
            )
            outcome = self.dispatch(request)
            response = outcome if isinstance(outcome, Response) else await outcome
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [
                    *response.headers,
                    (b"content-length", str(len(response.body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": response.body})

    # -- protocol -------------------------------------------------------------------------------

    def _challenge(self, request: Request) -> Response:
        del request  # the body is {} (ignored, as by the key server)
        return _ok(self.service.challenge())

    def _release(self, request: Request) -> Response | Awaitable[Response]:
        try:
            parsed = ReleaseRequest.model_validate_json(request.body)
        except ValidationError as exc:
            return _invalid(exc)
        return self._run(self.service.release, parsed, inline=parsed.evidence.type)

    def _renew(self, request: Request) -> Response | Awaitable[Response]:
        # Same order as the key server: the body is validated before the token is looked at.
        try:
            parsed = RenewRequest.model_validate_json(request.body)
        except ValidationError as exc:
            return _invalid(exc)
        token = _bearer(request)
        if token is None:
            return error_response(
                401,
                "unauthenticated",
                "this endpoint needs a session token (Authorization: Bearer ...)",
                headers=[BEARER_CHALLENGE],
            )
        return self._run(self.service.renew, token, parsed, inline="sim")

    def _run(
        self, function: Callable[..., BaseModel], *args: Any, inline: str
    ) -> Response | Awaitable[Response]:
        if inline in INLINE_EVIDENCE or self._executor is None:
            return _call(function, *args)
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, _call, function, *args)

    # -- operations -----------------------------------------------------------------------------

    def _healthz(self, request: Request) -> Response:
        del request
        body = {"status": "ok", "simulated_tee": self.service.simulated_tee}
        return Response(200, json.dumps(body).encode(), [_JSON])

    def _readyz(self, request: Request) -> Response:
        del request
        state = self.cache.state()
        if state in ("ready", "degraded"):
            body = {"status": state, "simulated_tee": self.service.simulated_tee}
            return Response(200, json.dumps(body).encode(), [_JSON])
        return error_response(
            503,
            "not_ready",
            f"the key cache holds no usable key (state: {state}); see {STATUS_PATH}",
            reasons=[state],
        )

    def _status(self, request: Request) -> Response:
        del request
        status = self.cache.status()
        return _ok(status.model_copy(update={"simulated_tee": self.service.simulated_tee}))

    def _metrics(self, request: Request) -> Response:
        del request
        return Response(200, self.metrics.render(), [(b"content-type", CONTENT_TYPE.encode())])


def _call(function: Callable[..., BaseModel], *args: Any) -> Response:
    try:
        return _ok(function(*args))
    except LocalError as exc:
        return error_response(HTTP_STATUS[exc.kind], exc.code, str(exc), reasons=exc.reasons)


def _bearer(request: Request) -> str | None:
    value = request.header(b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


async def _lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge startup and shutdown; the cache's lifecycle is managed by its owner."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
