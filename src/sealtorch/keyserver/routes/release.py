"""The key release protocol (``docs/protocol.md``): challenge, release, renew.

Each of challenge and release is one endpoint function, ``(runtime, scope, body) -> (status,
JSON body)`` (:data:`~sealtorch.keyserver.runtime.Endpoint`), that does all of its request's
checks. The app runs it on its short path (:data:`FAST_ROUTES`, see
:mod:`sealtorch.keyserver.app`); the FastAPI routes below run the same function, so the
operations are documented in the OpenAPI schema (:func:`document_bodies` adds the request
bodies that FastAPI does not parse) and answer identically when the router is mounted on its
own. Renew is an ordinary FastAPI route.
"""

from __future__ import annotations

from email.message import Message
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.types import Scope

from sealtorch.keyserver.routes._common import bearer_token, client_address, json_response, runtime
from sealtorch.keyserver.runtime import Endpoint, Runtime
from sealtorch.protocol import (
    API_PREFIX,
    ChallengeResponse,
    ErrorBody,
    ReleaseRequest,
    ReleaseResponse,
    RenewRequest,
)

__all__ = ["FAST_ROUTES", "challenge_endpoint", "document_bodies", "release_endpoint", "router"]

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


def _json_body_of(model: type[BaseModel]) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# -- the endpoints ---------------------------------------------------------------------------


async def challenge_endpoint(state: Runtime, scope: Scope, body: bytes) -> tuple[int, bytes]:
    """``POST /v1/attestation/challenge``: a fresh single-use nonce."""
    del scope, body
    result = await state.require_service().releases.challenge()
    return 200, result.model_dump_json().encode()


async def release_endpoint(state: Runtime, scope: Scope, body: bytes) -> tuple[int, bytes]:
    """``POST /v1/keys/release``: the body checked and parsed once, then the release."""
    try:
        parsed = ReleaseRequest.model_validate_json(_json_body(scope, body))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from exc
    client = scope.get("client")
    result = await state.require_service().releases.release(
        parsed, client_address=client[0] if client else None
    )
    return 200, result.model_dump_json().encode()


def _json_body(scope: Scope, body: bytes) -> bytes:
    """The body as FastAPI would read it for a JSON model: a JSON media type (or none)."""
    if not body:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required"}]
        )
    for name, value in scope["headers"]:
        if name == b"content-type":
            if not _is_json_type(value):
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


#: Content-Type values already judged by :func:`_is_json_type` (clients send one or two).
_JSON_TYPES: dict[bytes, bool] = {}
_JSON_TYPES_LIMIT = 64


def _is_json_type(value: bytes) -> bool:
    """Whether a Content-Type is JSON as FastAPI reads it (``application/json`` or
    ``application/*+json``, parameters ignored); remembered for the first 64 values."""
    known = _JSON_TYPES.get(value)
    if known is not None:
        return known
    message = Message()
    message["content-type"] = value.decode("latin-1")
    subtype = message.get_content_subtype()
    verdict = message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )
    if len(_JSON_TYPES) < _JSON_TYPES_LIMIT:
        _JSON_TYPES[value] = verdict
    return verdict


#: ``(method, path) -> endpoint`` of the requests the app answers on its short path.
FAST_ROUTES: dict[tuple[str, str], Endpoint] = {
    ("POST", f"{API_PREFIX}/attestation/challenge"): challenge_endpoint,
    ("POST", f"{API_PREFIX}/keys/release"): release_endpoint,
}


async def _routed(endpoint: Endpoint, request: Request) -> Response:
    status, content = await endpoint(runtime(request), request.scope, await request.body())
    return Response(content=content, status_code=status, media_type="application/json")


# -- the FastAPI routes (OpenAPI; the same endpoints) ----------------------------------------


@router.post(
    "/attestation/challenge",
    response_model=ChallengeResponse,
    summary="A fresh single-use nonce to bind into attestation evidence",
    responses={503: _errors[503]},
)
async def challenge(request: Request) -> Response:
    return await _routed(challenge_endpoint, request)


@router.post(
    "/keys/release",
    response_model=ReleaseResponse,
    summary="Release model keys, HPKE-sealed, to attested evidence",
    responses=_errors,
    openapi_extra=_json_body_of(ReleaseRequest),
)
async def release(request: Request) -> Response:
    return await _routed(release_endpoint, request)


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


def document_bodies(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the schemas of the request bodies the endpoint functions read (and of the models
    they use) to an OpenAPI document's components, as FastAPI writes them; the document's own
    schemas are kept as they are."""
    declared = APIRouter()
    declared.add_api_route("/", _release_body, methods=["POST"])
    components = get_openapi(title="", version="", routes=declared.routes).get("components", {})
    found = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in components.get("schemas", {}).items():
        found.setdefault(name, definition)
    return schema


async def _release_body(body: ReleaseRequest) -> None:
    """Only a signature, from which FastAPI documents the release body (never called)."""
