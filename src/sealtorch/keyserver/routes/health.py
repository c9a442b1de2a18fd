"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from sealtorch.keyserver.metrics import CONTENT_TYPE
from sealtorch.keyserver.routes._common import runtime

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process serves requests")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    summary="Readiness: the key store answers with the expected schema",
    responses={503: {"description": "the key store is unavailable"}},
)
async def readyz(request: Request) -> JSONResponse:
    state = runtime(request)
    service = state.require_service()
    await state.run(service.check_ready)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    state = runtime(request)
    body = await state.run(state.metrics.render)
    return Response(content=body, media_type=CONTENT_TYPE)
