"""Liveness, readiness, the authenticated status and Prometheus metrics (with the current
insecure policies, read from the key store at each scrape). Both probes say whether the
simulated TEE is trusted (``"simulated_tee": true``: development only).

``/readyz`` is 503 whenever the store cannot *commit* (database down, disk full, corruption):
it proves a commit (``Store.probe``, at most one write a second) and recovers by itself when
the cause goes. Its body is for anyone who can reach the port, so it names no host, port,
path or driver message: those go to the log and to ``GET /v1/admin/status`` (an admin token with
scope ``read``).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from sealtorch.errors import StorageCorruptError, StorageError, StorageFullError
from sealtorch.keyserver.metrics import CONTENT_TYPE
from sealtorch.keyserver.routes._common import bearer_token, client_address, runtime
from sealtorch.keyserver.service import ErrorKind, ServiceError
from sealtorch.protocol.admin import AdminScope

router = APIRouter(tags=["health"])
_log = logging.getLogger(__name__)
_bearer = HTTPBearer(auto_error=False, scheme_name="admin")


@router.get("/healthz", summary="Liveness: the process serves requests")
async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "simulated_tee": _simulated_tee(request)})


def _simulated_tee(request: Request) -> bool:
    """Whether simulated-TEE evidence is trusted (``allow_simulated_tee_insecure``)."""
    service = runtime(request).service
    return service is not None and service.simulated_tee


def _store_problem(exc: StorageError) -> str:
    """The coarse kind of a store failure (shown only to authenticated callers and the log)."""
    if isinstance(exc, StorageCorruptError):
        return "store_corrupt"
    if isinstance(exc, StorageFullError):
        return "store_full"
    return "store_unavailable"


async def _store_state(request: Request) -> tuple[str | None, str | None]:
    """``(None, None)`` when the store can commit, else ``(problem, detail)`` (logged)."""
    state = runtime(request)
    service = state.require_service()

    def check() -> None:
        service.store.check_schema()
        service.store.probe()

    try:
        await state.run(check)
    except StorageError as exc:
        problem = _store_problem(exc)
        _log.warning("not ready (%s): %s", problem, exc)
        return problem, str(exc)
    return None, None


@router.get(
    "/readyz",
    summary="Readiness: the key store can commit (not down, full or corrupt)",
    responses={503: {"description": "not ready; the reason is in the log and /v1/admin/status"}},
)
async def readyz(request: Request) -> JSONResponse:
    problem, _ = await _store_state(request)
    if problem is not None:
        # Nothing internal: no host, port, path or driver text for unauthenticated callers.
        return JSONResponse(
            {"status": "unavailable", "reason": "store_unavailable"},
            status_code=503,
            headers={"Retry-After": "5"},
        )
    return JSONResponse({"status": "ready", "simulated_tee": _simulated_tee(request)})


@router.get(
    "/v1/admin/status",
    summary="Operator status: why the server is (not) ready, with details (scope: read)",
    openapi_extra={"x-sealtorch-scopes": [AdminScope.READ.value]},
)
async def status(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> JSONResponse:
    state = runtime(request)
    service = state.require_service()
    admin = service.admin
    # The same authentication and scope check as every admin route (a refusal is audited as
    # status.read); authentication reads the store, so with the database down this is a 503.
    try:
        token = bearer_token(credentials, "admin token")
    except ServiceError:
        state.metrics.admin_auth_failures.labels("401").inc()
        raise
    try:
        actor = await state.run(
            admin.authenticate_admin, token, client_address=client_address(request)
        )
    except ServiceError as exc:
        if exc.kind is ErrorKind.FORBIDDEN:
            state.metrics.admin_auth_failures.labels("403").inc()
        raise
    try:
        await state.run(
            admin.authorize,
            actor,
            (AdminScope.READ,),
            action="status.read",
            purpose="read the server status",
        )
    except ServiceError:
        state.metrics.admin_scope_refusals.labels("status.read").inc()
        raise
    problem, detail = await _store_state(request)
    store = service.store
    body: dict[str, Any] = {
        "status": "ready" if problem is None else "unavailable",
        "store": {
            "backend": store.backend,
            "ok": problem is None,
            "problem": problem,
            "detail": detail,
        },
        "simulated_tee": service.simulated_tee,
    }
    return JSONResponse(body, status_code=200)


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
