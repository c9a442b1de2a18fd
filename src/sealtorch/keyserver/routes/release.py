"""The key release protocol (``docs/protocol.md``): challenge, release, renew."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from sealtorch.keyserver.routes._common import bearer_token, client_address, json_response, runtime
from sealtorch.protocol import (
    API_PREFIX,
    ChallengeResponse,
    ErrorBody,
    ReleaseRequest,
    ReleaseResponse,
    RenewRequest,
)

router = APIRouter(prefix=API_PREFIX, tags=["key release"])
_session_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="session",
    description="A renewal session token (sts_...) from a release with session: true",
)
_errors: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorBody, "description": "malformed request"},
    403: {"model": ErrorBody, "description": "refused (nonce, evidence, binding, token)"},
    413: {"model": ErrorBody, "description": "request body too large"},
    503: {"model": ErrorBody, "description": "audit log or key store unavailable (fail closed)"},
}


@router.post(
    "/attestation/challenge",
    response_model=ChallengeResponse,
    summary="A fresh single-use nonce to bind into attestation evidence",
    responses={503: _errors[503]},
)
async def challenge(request: Request) -> Response:
    state = runtime(request)
    service = state.require_service()
    return json_response(await state.run(service.challenge))


@router.post(
    "/keys/release",
    response_model=ReleaseResponse,
    summary="Release model keys, HPKE-sealed, to attested evidence",
    responses=_errors,
)
async def release(body: ReleaseRequest, request: Request) -> Response:
    state = runtime(request)
    service = state.require_service()
    result = await state.run(service.release, body, client_address=client_address(request))
    return json_response(result)


@router.post(
    "/keys/renew",
    response_model=ReleaseResponse,
    summary="Renew leases with a session token (no new quote)",
    responses={**_errors, 401: {"model": ErrorBody, "description": "no session token"}},
)
async def renew(
    body: RenewRequest,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_session_bearer)],
) -> Response:
    state = runtime(request)
    service = state.require_service()
    token = bearer_token(credentials, "session token")
    result = await state.run(service.renew, token, body, client_address=client_address(request))
    return json_response(result)
