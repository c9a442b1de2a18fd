"""The key release protocol (``docs/protocol.md``): challenge, release, renew.

Challenge and release are answered on the app's short path (:data:`FAST_ROUTES`, see
:mod:`sealtorch.keyserver.app`); their route declarations below document them in the OpenAPI
schema and answer identically when the router is mounted on its own.
"""

from __future__ import annotations

from email.message import Message
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.types import Scope

from sealtorch.keyserver.app import FastHandler, Runtime
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
    return json_response(await runtime(request).require_service().releases.challenge())


@router.post(
    "/keys/release",
    response_model=ReleaseResponse,
    summary="Release model keys, HPKE-sealed, to attested evidence",
    responses=_errors,
)
async def release(body: ReleaseRequest, request: Request) -> Response:
    service = runtime(request).require_service().releases
    return json_response(await service.release(body, client_address=client_address(request)))


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
    service = runtime(request).require_service().releases
    token = bearer_token(credentials, "session token")
    result = await service.renew(token, body, client_address=client_address(request))
    return json_response(result)


# -- the short path -------------------------------------------------------------------------------


def _json_body(scope: Scope, body: bytes) -> bytes:
    """The body as FastAPI would read it for a JSON model: a JSON media type (or none)."""
    if not body:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required"}]
        )
    for name, value in scope["headers"]:
        if name == b"content-type":
            message = Message()
            message["content-type"] = value.decode("latin-1")
            subtype = message.get_content_subtype()
            if message.get_content_maintype() != "application" or not (
                subtype == "json" or subtype.endswith("+json")
            ):
                raise RequestValidationError(
                    [
                        {
                            "type": "model_attributes_type",
                            "loc": ("body",),
                            "msg": "Input should be a valid dictionary or object to extract "
                            "fields from",
                        }
                    ]
                )
            break
    return body


async def _fast_challenge(state: Runtime, scope: Scope, body: bytes) -> tuple[int, bytes]:
    del scope, body
    result = await state.require_service().releases.challenge()
    return 200, result.model_dump_json().encode()


async def _fast_release(state: Runtime, scope: Scope, body: bytes) -> tuple[int, bytes]:
    try:
        parsed = ReleaseRequest.model_validate_json(_json_body(scope, body))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from exc
    client = scope.get("client")
    result = await state.require_service().releases.release(
        parsed, client_address=client[0] if client else None
    )
    return 200, result.model_dump_json().encode()


#: ``(method, path) -> handler`` of the requests the app answers on its short path.
FAST_ROUTES: dict[tuple[str, str], FastHandler] = {
    ("POST", f"{API_PREFIX}/attestation/challenge"): _fast_challenge,
    ("POST", f"{API_PREFIX}/keys/release"): _fast_release,
}
