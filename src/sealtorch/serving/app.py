"""The HTTP layer: Open Inference Protocol (KServe v2) REST routes, ``/metrics``, errors.

Routes only translate HTTP to the model layer and back. Everything CPU-bound — JSON parsing,
tensor conversion, image decoding, the forward pass, response encoding — runs in the bounded
inference thread pool, never on the event loop, so health probes and metrics keep answering
while models compute.

Every refusal uses the protocol's error body ``{"error": "..."}``: 400 for malformed requests
or input that does not fit the model, 404 for unknown models, versions and routes, 405 for a
wrong method, 413 for oversized bodies and JSON with more values than ``max_json_elements``,
503 while loading or when the queue is full.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sealtorch import __version__
from sealtorch.serving import codec
from sealtorch.serving.errors import RequestError
from sealtorch.serving.generate_routes import add_generate_routes
from sealtorch.serving.http_body import (
    HEADER_LENGTH,
    AppLimits,
    content_encoding,
    decompress,
    read_body,
)
from sealtorch.serving.http_body import json_length as header_json_length
from sealtorch.serving.metrics import CONTENT_TYPE
from sealtorch.serving.model import ServedModel
from sealtorch.serving.protocol import (
    check_target,
    parse_inference_request,
    render_error,
    render_response,
)
from sealtorch.serving.state import ServerState

__all__ = ["HEADER_LENGTH", "AppLimits", "create_app"]

_log = logging.getLogger(__name__)

_JSON: Final = "application/json"
_GET: Final = ["GET", "HEAD"]


def _json(document: Any, status: int = 200) -> Response:
    body, _ = render_response(document, ())
    return Response(content=body, status_code=status, media_type=_JSON)


def _error(message: str, status: int) -> Response:
    return Response(content=render_error(message), status_code=status, media_type=_JSON)


class _HttpMetrics:
    """Pure ASGI middleware counting responses by route template (bounded labels)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                self.state.metrics.http.labels(
                    template, scope.get("method", ""), str(message["status"])
                ).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def _run(
    model: ServedModel,
    version: str | None,
    body: bytearray,
    encoding: str | None,
    json_length: int | None,
    limits: AppLimits,
) -> tuple[float, bytes, int | None]:
    """Worker thread: decompress, parse, infer, encode."""
    if encoding is not None:
        body = decompress(body, encoding, limits.max_body_bytes)
    request = parse_inference_request(
        body, json_length=json_length, max_json_elements=limits.max_json_elements
    )
    check_target(request, model.name, model.version if version is None else version)
    result = codec.infer(model, request)
    content, header_length = render_response(result.document, result.binary)
    return result.compute_seconds, content, header_length


def create_app(state: ServerState, limits: AppLimits) -> FastAPI:
    """The ASGI app serving ``state``'s models (no docs pages: nothing beyond the protocol)."""
    app = FastAPI(
        title="sealtorch inference server",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(_HttpMetrics, state=state)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> Response:
        del request
        return _error(str(exc), exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        del request
        message = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(
            exc.status_code, str(exc.detail)
        )
        return _error(message, exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        del request
        # The type only: messages from deep inside a model may describe its private layers.
        _log.error("internal error while handling a request: %s", type(exc).__name__)
        return _error("internal server error", 500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        del request, exc
        return _error("invalid request path or parameters", 400)

    # -- server -------------------------------------------------------------------------------

    @app.api_route("/v2", methods=_GET)
    async def server_metadata() -> Response:
        return _json(codec.server_metadata())

    @app.api_route("/v2/health/live", methods=_GET)
    async def live() -> Response:
        return _json({"live": True})

    @app.api_route("/v2/health/ready", methods=_GET)
    async def ready() -> Response:
        ok = state.ready
        return _json({"ready": ok}, 200 if ok else 503)

    @app.api_route("/metrics", methods=_GET)
    async def metrics() -> Response:
        return Response(content=state.metrics.render(), media_type=CONTENT_TYPE)

    # -- models -------------------------------------------------------------------------------

    @app.api_route("/v2/models/{name}", methods=_GET)
    @app.api_route("/v2/models/{name}/versions/{version}", methods=_GET)
    async def model_metadata(name: str, version: str | None = None) -> Response:
        return _json(codec.model_metadata(state.lookup(name, version)))

    @app.api_route("/v2/models/{name}/config", methods=_GET)
    @app.api_route("/v2/models/{name}/versions/{version}/config", methods=_GET)
    async def model_config(name: str, version: str | None = None) -> Response:
        return _json(codec.model_config(state.lookup(name, version)))

    @app.api_route("/v2/models/{name}/ready", methods=_GET)
    @app.api_route("/v2/models/{name}/versions/{version}/ready", methods=_GET)
    async def model_ready(name: str, version: str | None = None) -> Response:
        ok = state.model_ready(name, version)  # unknown name or version: 404
        return _json({"name": name, "ready": ok}, 200 if ok else 503)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        label = name if state.known(name) else ""
        start = time.perf_counter()
        status = 500
        state.metrics.in_flight.inc()
        try:
            model = state.lookup(name, version)
            encoding = content_encoding(request)
            body = await read_body(request, limits.max_body_bytes)
            json_length = header_json_length(request)
            with state.admitted(limits.max_pending):
                loop = asyncio.get_running_loop()
                compute, content, header_length = await loop.run_in_executor(
                    state.executor, _run, model, version, body, encoding, json_length, limits
                )
            state.metrics.compute.labels(label).observe(compute)
            status = 200
            if header_length is None:
                return Response(content=content, media_type=_JSON)
            return Response(
                content=content,
                media_type="application/octet-stream",
                headers={HEADER_LENGTH: str(header_length)},
            )
        except ClientDisconnect:
            status = 499  # the client went away while sending; nobody reads an answer
            return Response(status_code=400)
        except (RuntimeError, MemoryError) as exc:
            # A server-side failure (the model misbehaved, memory ran out): the type only,
            # since messages from deep inside a model may describe its private layers.
            _log.error(
                "inference failed: %s", type(exc).__name__, extra={"model": label, "status": 500}
            )
            return _error("internal server error while running the model", 500)
        except RequestError as exc:
            status = exc.status_code
            _log.info(
                "inference refused: %s",
                exc,
                extra={"model": label, "status": status},
            )
            raise
        finally:
            elapsed = time.perf_counter() - start
            state.metrics.finished(label, status, elapsed)
            if status == 200:
                _log.debug(
                    "inference model=%s %.1f ms",
                    label,
                    elapsed * 1e3,
                    extra={"model": label, "status": status, "duration_ms": elapsed * 1e3},
                )

    add_generate_routes(app, state, limits)
    return app
