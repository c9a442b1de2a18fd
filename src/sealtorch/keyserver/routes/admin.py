"""The admin API (bearer admin token): models, keys, policies, tokens, audit, content key wrap.

No token → ``401``; a wrong, revoked or expired token → ``403 token_invalid``. Every route
declares the scope it needs (:func:`_needs`; OpenAPI ``x-sealtorch-scopes``); a token without it
gets ``403 insufficient_scope`` naming the scope, before anything else happens, and the refusal
is audited. Every change (and every use of a data key: wrap, rewrap) is audited in the same
transaction as the change.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import TypeAdapter

from sealtorch.attestation.policy import INSECURE_FLAGS
from sealtorch.keys import DataKey
from sealtorch.keyserver.admin_service import AdminService
from sealtorch.keyserver.routes._common import (
    Runtime,
    bearer_token,
    client_address,
    json_response,
    runtime,
)
from sealtorch.keyserver.routes._wire import (
    audit_page,
    created_model,
    created_token,
    key_block,
    key_info,
    model_detail,
    model_info,
    policy_info,
    token_info,
)
from sealtorch.keyserver.service import Actor, ErrorKind, ServiceError
from sealtorch.protocol import API_PREFIX, MODEL_ID_PATTERN, MODEL_ID_RE, ErrorBody
from sealtorch.protocol.admin import (
    AdminScope,
    AuditPage,
    CreatedModel,
    CreatedToken,
    CreateModelRequest,
    CreateTokenRequest,
    KeyBlockWire,
    KeyVersionInfo,
    ModelDetail,
    ModelInfo,
    PolicyInfo,
    RewrapRequest,
    RotateRequest,
    SetPolicyRequest,
    TokenInfo,
    WrapRequest,
)
from sealtorch.protocol.checkpoint import SignedCheckpoint

_admin_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="admin",
    description="An admin token (sta_...) from `keyserver init` or `admin token create`",
)


def _admin(request: Request) -> tuple[Runtime, AdminService]:
    state = runtime(request)
    return state, state.require_service().admin


async def _actor(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)],
) -> Actor:
    state, admin = _admin(request)
    try:
        token = bearer_token(credentials, "admin token")
    except ServiceError:
        state.metrics.admin_auth_failures.labels("401").inc()
        raise
    try:
        return await state.run(
            admin.authenticate_admin, token, client_address=client_address(request)
        )
    except ServiceError as exc:
        if exc.kind is ErrorKind.FORBIDDEN:
            state.metrics.admin_auth_failures.labels("403").inc()
        raise


AdminActor = Annotated[Actor, Depends(_actor)]


def _needs(*scopes: AdminScope, action: str, purpose: str) -> dict[str, Any]:
    """A route's declaration of the scope it needs (any one of ``scopes``): a dependency that
    refuses other tokens (``403 insufficient_scope``, audited as ``action``) and the OpenAPI
    extension ``x-sealtorch-scopes``. ``purpose`` completes "needed to ..."."""

    async def authorize(request: Request, actor: AdminActor) -> None:
        state, admin = _admin(request)
        model_id = request.path_params.get("model_id")
        model_ids = (
            [model_id] if isinstance(model_id, str) and MODEL_ID_RE.fullmatch(model_id) else []
        )
        try:
            await state.run(
                admin.authorize,
                actor,
                scopes,
                action=action,
                purpose=purpose,
                model_ids=model_ids,
            )
        except ServiceError:
            state.metrics.admin_scope_refusals.labels(action).inc()
            raise

    return {
        "dependencies": [Depends(authorize)],
        "openapi_extra": {"x-sealtorch-scopes": [scope.value for scope in scopes]},
    }


ModelIdPath = Annotated[str, Path(pattern=MODEL_ID_PATTERN, max_length=128)]
VersionPath = Annotated[int, Path(ge=1, le=2**31 - 1)]
TokenIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")]

router = APIRouter(
    prefix=f"{API_PREFIX}/admin",
    tags=["admin"],
    responses={
        400: {"model": ErrorBody, "description": "malformed request"},
        401: {"model": ErrorBody, "description": "no bearer token"},
        403: {
            "model": ErrorBody,
            "description": "invalid, revoked or expired token (token_invalid), or a token "
            "without the scope the route needs (insufficient_scope)",
        },
        404: {"model": ErrorBody, "description": "no such model, version or token"},
        409: {"model": ErrorBody, "description": "conflicts with the stored state"},
        413: {"model": ErrorBody, "description": "request body too large"},
        503: {"model": ErrorBody, "description": "key store or audit log unavailable"},
    },
)


def _list(model: type, items: list[object]) -> Response:
    adapter: TypeAdapter[list[object]] = TypeAdapter(list[model])  # type: ignore[valid-type]
    return Response(content=adapter.dump_json(items), media_type="application/json")


# -- models and keys --------------------------------------------------------------------------


@router.post(
    "/models",
    status_code=201,
    response_model=CreatedModel,
    summary="Create a model",
    **_needs(AdminScope.MODEL_ADMIN, action="model.create", purpose="create models"),
)
async def create_model(body: CreateModelRequest, request: Request, actor: AdminActor) -> Response:
    state, admin = _admin(request)
    key = DataKey(body.key) if body.key is not None else None
    created = await state.run(admin.create_model, actor, body.model_id, key=key)
    return json_response(created_model(created), 201)


@router.get(
    "/models",
    response_model=list[ModelInfo],
    summary="List live models",
    **_needs(AdminScope.READ, action="model.list", purpose="list models"),
)
async def list_models(request: Request, actor: AdminActor) -> Response:
    del actor
    state, admin = _admin(request)
    return _list(ModelInfo, [model_info(m) for m in await state.run(admin.list_models)])


@router.get(
    "/models/{model_id}",
    response_model=ModelDetail,
    summary="A model, keys, policy",
    **_needs(AdminScope.READ, action="model.show", purpose="show models"),
)
async def show_model(model_id: ModelIdPath, request: Request, actor: AdminActor) -> Response:
    del actor
    state, admin = _admin(request)
    return json_response(model_detail(await state.run(admin.show_model, model_id)))


@router.delete(
    "/models/{model_id}",
    response_model=ModelInfo,
    summary="Delete a model and crypto-shred its keys (its id is never reused)",
    **_needs(AdminScope.MODEL_ADMIN, action="model.delete", purpose="delete models"),
)
async def delete_model(model_id: ModelIdPath, request: Request, actor: AdminActor) -> Response:
    state, admin = _admin(request)
    return json_response(model_info(await state.run(admin.delete_model, actor, model_id)))


@router.get(
    "/models/{model_id}/keys",
    response_model=list[KeyVersionInfo],
    summary="Key versions",
    **_needs(AdminScope.READ, action="key.list", purpose="list key versions"),
)
async def list_keys(model_id: ModelIdPath, request: Request, actor: AdminActor) -> Response:
    del actor
    state, admin = _admin(request)
    return _list(KeyVersionInfo, [key_info(k) for k in await state.run(admin.list_keys, model_id)])


@router.post(
    "/models/{model_id}/keys",
    status_code=201,
    response_model=KeyVersionInfo,
    summary="Rotate: add a new data key version (generated, or imported)",
    **_needs(AdminScope.POLICY_ADMIN, action="key.rotate", purpose="rotate keys"),
)
async def rotate_key(
    model_id: ModelIdPath, body: RotateRequest, request: Request, actor: AdminActor
) -> Response:
    state, admin = _admin(request)
    key = DataKey(body.key) if body.key is not None else None
    return json_response(key_info(await state.run(admin.rotate_key, actor, model_id, key=key)), 201)


@router.post(
    "/models/{model_id}/keys/{version}/revoke",
    response_model=KeyVersionInfo,
    summary="Revoke a key version: it is never released again",
    **_needs(AdminScope.POLICY_ADMIN, action="key.revoke", purpose="revoke keys"),
)
async def revoke_key(
    model_id: ModelIdPath, version: VersionPath, request: Request, actor: AdminActor
) -> Response:
    state, admin = _admin(request)
    return json_response(key_info(await state.run(admin.revoke_key, actor, model_id, version)))


# -- policies ---------------------------------------------------------------------------------


@router.put(
    "/models/{model_id}/policy",
    response_model=PolicyInfo,
    summary="Set a new release policy version (docs/policy.md)",
    **_needs(AdminScope.POLICY_ADMIN, action="policy.set", purpose="set policies"),
)
async def set_policy(
    model_id: ModelIdPath, body: SetPolicyRequest, request: Request, actor: AdminActor
) -> Response:
    state, admin = _admin(request)
    info = policy_info(await state.run(admin.set_policy, actor, model_id, body.policy))
    for flag in INSECURE_FLAGS:
        if info.policy.get(flag) is True:
            state.metrics.insecure_policy_sets.labels(flag).inc()
    return json_response(info)


@router.get(
    "/models/{model_id}/policy",
    response_model=PolicyInfo,
    summary="Current policy",
    **_needs(AdminScope.READ, action="policy.show", purpose="show policies"),
)
async def show_policy(model_id: ModelIdPath, request: Request, actor: AdminActor) -> Response:
    del actor
    state, admin = _admin(request)
    return json_response(policy_info(await state.run(admin.show_policy, model_id)))


@router.get(
    "/models/{model_id}/policies",
    response_model=list[PolicyInfo],
    summary="Policy history",
    **_needs(AdminScope.READ, action="policy.history", purpose="show policy histories"),
)
async def policy_history(model_id: ModelIdPath, request: Request, actor: AdminActor) -> Response:
    del actor
    state, admin = _admin(request)
    return _list(
        PolicyInfo, [policy_info(p) for p in await state.run(admin.policy_history, model_id)]
    )


# -- tokens -----------------------------------------------------------------------------------


@router.post(
    "/tokens",
    status_code=201,
    response_model=CreatedToken,
    summary="Create an admin token (shown once) with scopes the calling token holds",
    **_needs(AdminScope.TOKEN_ADMIN, action="token.create", purpose="create admin tokens"),
)
async def create_token(body: CreateTokenRequest, request: Request, actor: AdminActor) -> Response:
    state, admin = _admin(request)
    created = await state.run(
        admin.create_token,
        actor,
        name=body.name,
        scopes=body.scopes,
        expires_in=body.expires_in,
    )
    return json_response(created_token(created), 201)


@router.get(
    "/tokens",
    response_model=list[TokenInfo],
    summary="List admin tokens",
    **_needs(
        AdminScope.READ, AdminScope.TOKEN_ADMIN, action="token.list", purpose="list admin tokens"
    ),
)
async def list_tokens(request: Request, actor: AdminActor) -> Response:
    del actor
    state, admin = _admin(request)
    return _list(TokenInfo, [token_info(t) for t in await state.run(admin.list_tokens)])


@router.post(
    "/tokens/{token_id}/revoke",
    response_model=TokenInfo,
    summary="Revoke a token (one with no scope the calling token lacks)",
    **_needs(AdminScope.TOKEN_ADMIN, action="token.revoke", purpose="revoke admin tokens"),
)
async def revoke_token(token_id: TokenIdPath, request: Request, actor: AdminActor) -> Response:
    state, admin = _admin(request)
    return json_response(token_info(await state.run(admin.revoke_token, actor, token_id)))


# -- audit ------------------------------------------------------------------------------------


@router.get(
    "/audit",
    response_model=AuditPage,
    summary="Audit records after a sequence number",
    **_needs(AdminScope.READ, action="audit.read", purpose="read the audit log"),
)
async def audit(
    request: Request,
    actor: AdminActor,
    after: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> Response:
    del actor
    state, admin = _admin(request)
    return json_response(audit_page(await state.run(admin.audit_page, after=after, limit=limit)))


@router.get(
    "/audit/checkpoint",
    response_model=SignedCheckpoint,
    summary="The audit head, signed with the release-signing key (keep it off this host)",
    **_needs(AdminScope.READ, action="audit.read", purpose="read the audit log"),
)
async def audit_checkpoint(request: Request, actor: AdminActor) -> Response:
    del actor
    state, admin = _admin(request)
    return json_response(await state.run(admin.audit_checkpoint))


# -- content keys (sealtorch encrypt/rewrap --keyserver) ---------------------------------------


@router.post(
    "/wrap",
    response_model=KeyBlockWire,
    summary="Wrap a new file's content key under the model's current data key",
    **_needs(AdminScope.SEAL, action="key.wrap", purpose="wrap content keys"),
)
async def wrap(body: WrapRequest, request: Request, actor: AdminActor) -> Response:
    state, admin = _admin(request)
    return json_response(key_block(await state.run(admin.wrap, actor, body)))


@router.post(
    "/rewrap",
    response_model=KeyBlockWire,
    summary="Rewrap a sealed file's content key to the current data key version",
    **_needs(AdminScope.SEAL, action="key.rewrap", purpose="rewrap content keys"),
)
async def rewrap(body: RewrapRequest, request: Request, actor: AdminActor) -> Response:
    state, admin = _admin(request)
    return json_response(key_block(await state.run(admin.rewrap, actor, body)))
