"""The generate extension's REST routes: ``POST /v2/models/{m}/generate`` and
``generate_stream`` (server-sent events).

Both take the same JSON request (:mod:`sealtorch.serving.generate`). ``generate`` answers one
JSON object; ``generate_stream`` answers ``text/event-stream``: one ``data:`` event per piece
of text (``{"model_name", "model_version", "text_output"}``), then a final event with an empty
``text_output`` and the ``finish_reason``. A refusal found before the stream starts (bad JSON
or parameters, a prompt too long for the model...) is a plain JSON error with its status, as
for ``generate``; a failure once events have been sent is an event ``{"error": "..."}``.

Parsing and generation run in the inference thread pool, never on the event loop; a stream
whose client goes away stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from sealtorch.serving.errors import RequestError
from sealtorch.serving.generate import (
    GenerateRequest,
    GenerateResult,
    can_generate,
    encode_prompt,
    generate,
    parse_generate_request,
)
from sealtorch.serving.http_body import AppLimits, content_encoding, decompress, read_body
from sealtorch.serving.model import ServedModel
from sealtorch.serving.protocol import render_error
from sealtorch.serving.state import ServerState

__all__ = ["add_generate_routes"]

_log = logging.getLogger(__name__)
_EVENT_STREAM: Final = "text/event-stream; charset=utf-8"
_END: Final = object()


def _parse(
    model: ServedModel, body: bytearray, encoding: str | None, limits: AppLimits
) -> tuple[GenerateRequest, dict[str, torch.Tensor]]:
    """Worker thread: decompress and check the request, tokenize and check its prompt."""
    if encoding is not None:
        body = decompress(body, encoding, limits.max_body_bytes)
    request = parse_generate_request(body, max_tokens=limits.max_tokens)
    return request, encode_prompt(model, request)


def _event(document: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(document, ensure_ascii=False).encode("utf-8") + b"\n\n"


def _answer(model: ServedModel, result: GenerateResult) -> dict[str, Any]:
    return {
        "model_name": model.name,
        "model_version": model.version,
        "text_output": result.text,
        "finish_reason": result.finish_reason,
    }


def add_generate_routes(app: FastAPI, state: ServerState, limits: AppLimits) -> None:
    """Add the generate extension's routes to ``app``."""

    async def prepare(
        request: Request, name: str, version: str | None
    ) -> tuple[ServedModel, GenerateRequest, dict[str, torch.Tensor]]:
        model = state.lookup(name, version)
        if not can_generate(model):
            raise RequestError(
                f"model {name!r} does not generate text (the generate extension serves causal "
                "language models that carry a tokenizer); use /infer"
            )
        encoding = content_encoding(request)
        body = await read_body(request, limits.max_body_bytes)
        loop = asyncio.get_running_loop()
        parsed, prompt = await loop.run_in_executor(
            state.executor, _parse, model, body, encoding, limits
        )
        return model, parsed, prompt

    @app.post("/v2/models/{name}/generate")
    @app.post("/v2/models/{name}/versions/{version}/generate")
    async def generate_once(request: Request, name: str, version: str | None = None) -> Response:
        label = name if state.known(name) else ""
        start = time.perf_counter()
        status = 500
        state.metrics.in_flight.inc()
        cancelled = threading.Event()
        try:
            model, parsed, prompt = await prepare(request, name, version)
            with state.admitted(limits.max_pending):
                loop = asyncio.get_running_loop()
                future = loop.run_in_executor(
                    state.executor,
                    lambda: generate(model, parsed, prompt=prompt, cancelled=cancelled),
                )
                try:
                    result = await future
                except asyncio.CancelledError:
                    cancelled.set()
                    raise
            state.metrics.compute.labels(label).observe(time.perf_counter() - start)
            status = 200
            return Response(
                content=json.dumps(_answer(model, result), ensure_ascii=False),
                media_type="application/json",
            )
        except RequestError as exc:
            status = exc.status_code
            _log.info("generate refused: %s", exc, extra={"model": label, "status": status})
            raise
        except (RuntimeError, MemoryError) as exc:
            _log.error("generation failed: %s", type(exc).__name__, extra={"model": label})
            return Response(
                content=render_error("internal server error while running the model"),
                status_code=500,
                media_type="application/json",
            )
        finally:
            state.metrics.finished(label, status, time.perf_counter() - start)

    @app.post("/v2/models/{name}/generate_stream")
    @app.post("/v2/models/{name}/versions/{version}/generate_stream")
    async def generate_stream(request: Request, name: str, version: str | None = None) -> Response:
        label = name if state.known(name) else ""
        start = time.perf_counter()
        state.metrics.in_flight.inc()
        admission = contextlib.ExitStack()
        try:
            model, parsed, prompt = await prepare(request, name, version)
            admission.enter_context(state.admitted(limits.max_pending))
        except BaseException as exc:
            admission.close()
            status = exc.status_code if isinstance(exc, RequestError) else 500
            state.metrics.finished(label, status, time.perf_counter() - start)
            raise
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def piece(text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, text)

        def run() -> GenerateResult:
            try:
                return generate(model, parsed, prompt=prompt, on_text=piece, cancelled=cancelled)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        def finished(done: asyncio.Future[GenerateResult]) -> None:
            admission.close()
            if not done.cancelled():
                done.exception()  # retrieved, also when the client left before reading it

        future = loop.run_in_executor(state.executor, run)
        future.add_done_callback(finished)

        async def events() -> AsyncIterator[bytes]:
            status = 500
            head = {"model_name": model.name, "model_version": model.version}
            try:
                while (item := await queue.get()) is not _END:
                    yield _event({**head, "text_output": item})
                try:
                    result = await future
                except RequestError as exc:
                    status = exc.status_code
                    yield _event({"error": str(exc)})
                    return
                except (RuntimeError, MemoryError) as exc:
                    _log.error("generation failed: %s", type(exc).__name__)
                    yield _event({"error": "internal server error while running the model"})
                    return
                status = 200
                yield _event({**head, "text_output": "", "finish_reason": result.finish_reason})
            finally:
                cancelled.set()  # a client that went away stops the generation
                state.metrics.finished(label, status, time.perf_counter() - start)

        return StreamingResponse(
            events(),
            media_type=_EVENT_STREAM,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
