"""The key cache's HTTP endpoint: a small ASGI app, no web framework.

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

The release path is the hot path (``benchmarks/bench_keycache.py``), so it avoids framework
layers: the body is read once (capped), parsed with pydantic-core, handled by
:class:`~sealtorch.keycache.service.LocalReleaseService` on the event loop for ``sim``
evidence (~0.3 ms) and in a worker thread for DCAP evidence (collateral may need disk I/O), and
the response is written in one message. A ``metrics_only`` app (the ``--metrics`` listener)
serves only health, status and metrics.
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

from sealtorch.keycache.cache import KeyCache
from sealtorch.keycache.metrics import CONTENT_TYPE, CacheMetrics
from sealtorch.keycache.service import ErrorKind, LocalError, LocalReleaseService
from sealtorch.protocol import API_PREFIX, ReleaseRequest, RenewRequest

__all__ = ["STATUS_PATH", "KeyCacheApp"]

_log = logging.getLogger("sealtorch.keycache")

STATUS_PATH: Final = f"{API_PREFIX}/keycache/status"
_STATUS: Final[dict[ErrorKind, int]] = {
    ErrorKind.INVALID: 400,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.UNAVAILABLE: 503,
}
_JSON: Final = (b"content-type", b"application/json")
_INLINE_EVIDENCE: Final = frozenset({"sim"})

Scope = Mapping[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
_Response = tuple[int, bytes, list[tuple[bytes, bytes]]]


def _error(
    status: int,
    code: str,
    message: str,
    *,
    reasons: tuple[str, ...] | list[str] = (),
    headers: list[tuple[bytes, bytes]] | None = None,
) -> _Response:
    """The protocol's one error shape: ``{"error": {"code", "message", "reasons"}}``."""
    body = json.dumps(
        {"error": {"code": code, "message": message, "reasons": list(reasons)}},
        separators=(",", ":"),
    ).encode()
    return status, body, [_JSON, *(headers or [])]


def _ok(model: BaseModel) -> _Response:
    return 200, model.model_dump_json().encode(), [_JSON]


def _validation_message(exc: ValidationError) -> str:
    """Where and what, never the offending input (it may be a token or a key)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        location = ".".join(str(p) for p in error.get("loc", ()))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return "the request is not valid: " + "; ".join(parts)[:1000]


class KeyCacheApp:
    """ASGI app of one key cache listener (see the module docstring)."""

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
        self._cap = max_request_bytes
        self._executor = executor
        handlers: dict[str, tuple[str, Callable[[Scope, bytes], Awaitable[_Response]]]] = {
            "/healthz": ("GET", self._healthz),
            "/readyz": ("GET", self._readyz),
            "/metrics": ("GET", self._metrics),
            STATUS_PATH: ("GET", self._status),
        }
        if not metrics_only:
            handlers[f"{API_PREFIX}/attestation/challenge"] = ("POST", self._challenge)
            handlers[f"{API_PREFIX}/keys/release"] = ("POST", self._release)
            handlers[f"{API_PREFIX}/keys/renew"] = ("POST", self._renew)
        self._handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        path: str = scope["path"]
        route = path if path in self._handlers else "unmatched"
        try:
            response = await self._dispatch(scope, receive, path)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: never a stack trace
            _log.error("internal error in %s %s: %s", scope["method"], route, type(exc).__name__)
            response = _error(500, "internal_error", "internal error; see the key cache log")
        status, body, headers = response
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
        self.metrics.observe_request(route, status, time.perf_counter() - started)

    async def _dispatch(self, scope: Scope, receive: Receive, path: str) -> _Response:
        entry = self._handlers.get(path)
        if entry is None:
            return _error(404, "not_found", "Not Found")
        method, handler = entry
        if scope["method"] != method:
            return _error(
                405,
                "method_not_allowed",
                "Method Not Allowed",
                headers=[(b"allow", method.encode())],
            )
        body = b""
        if method == "POST":
            read = await self._read_body(scope, receive)
            if read is None:
                return _error(
                    413, "request_too_large", f"request bodies are limited to {self._cap} bytes"
                )
            body = read
        return await handler(scope, body)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    if int(value) > self._cap:
                        return None
                except ValueError:
                    return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._cap:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    # -- protocol -------------------------------------------------------------------------------

    async def _challenge(self, scope: Scope, body: bytes) -> _Response:
        del scope, body  # the request is {} (ignored, as by the key server)
        return _ok(self.service.challenge())

    async def _release(self, scope: Scope, body: bytes) -> _Response:
        del scope
        try:
            request = ReleaseRequest.model_validate_json(body)
        except ValidationError as exc:
            return _error(400, "invalid_request", _validation_message(exc))
        return await self._run(self.service.release, request, inline=request.evidence.type)

    async def _renew(self, scope: Scope, body: bytes) -> _Response:
        token = _bearer(scope)
        if token is None:
            return _error(
                401,
                "unauthenticated",
                "this endpoint needs a session token (Authorization: Bearer ...)",
                headers=[(b"www-authenticate", b'Bearer realm="sealtorch"')],
            )
        try:
            request = RenewRequest.model_validate_json(body)
        except ValidationError as exc:
            return _error(400, "invalid_request", _validation_message(exc))
        return await self._run(self.service.renew, token, request, inline="sim")

    async def _run(self, function: Callable[..., BaseModel], *args: Any, inline: str) -> _Response:
        try:
            if inline in _INLINE_EVIDENCE or self._executor is None:
                result = function(*args)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._executor, function, *args)
        except LocalError as exc:
            return _error(_STATUS[exc.kind], exc.code, str(exc), reasons=exc.reasons)
        return _ok(result)

    # -- operations -----------------------------------------------------------------------------

    async def _healthz(self, scope: Scope, body: bytes) -> _Response:
        del scope, body
        return 200, b'{"status":"ok"}', [_JSON]

    async def _readyz(self, scope: Scope, body: bytes) -> _Response:
        del scope, body
        state = self.cache.state()
        if state in ("ready", "degraded"):
            return 200, json.dumps({"status": state}).encode(), [_JSON]
        return _error(
            503,
            "not_ready",
            f"the key cache holds no usable key (state: {state}); see {STATUS_PATH}",
            reasons=[state],
        )

    async def _status(self, scope: Scope, body: bytes) -> _Response:
        del scope, body
        return _ok(self.cache.status())

    async def _metrics(self, scope: Scope, body: bytes) -> _Response:
        del scope, body
        return 200, self.metrics.render(), [(b"content-type", CONTENT_TYPE.encode())]


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            header: bytes = value
            scheme, _, token = header.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
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
