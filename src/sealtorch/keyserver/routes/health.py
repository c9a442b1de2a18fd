"""Liveness, readiness and Prometheus metrics (with the current insecure policies, read from
the key store at each scrape). Both probes say whether the simulated TEE is trusted
(``"simulated_tee": true``: development only)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from sealtorch.keyserver.metrics import CONTENT_TYPE
from sealtorch.keyserver.routes._common import runtime
from sealtorch.keyserver.service import ServiceError

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process serves requests")
async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "simulated_tee": _simulated_tee(request)})


def _simulated_tee(request: Request) -> bool:
    """Whether simulated-TEE evidence is trusted (``allow_simulated_tee_insecure``)."""
    service = runtime(request).service
    return service is not None and service.simulated_tee


@router.get(
    "/readyz",
    summary="Readiness: the key store answers with the expected schema",
    responses={503: {"description": "the key store is unavailable"}},
)
async def readyz(request: Request) -> JSONResponse:
    state = runtime(request)
    service = state.require_service()
    await state.run(service.check_ready)
    return JSONResponse({"status": "ready", "simulated_tee": service.simulated_tee})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    state = runtime(request)
    if state.service is not None:
        # Read from the store, so every worker and replica reports the same current state.
        try:
            counts = await state.run(state.service.insecure_policies)
        except ServiceError:
            pass  # the store is down: keep the last values (/readyz says so)
        else:
            state.metrics.set_insecure_policies(counts)
    body = await state.run(state.metrics.render)
    return Response(content=body, media_type=CONTENT_TYPE)
