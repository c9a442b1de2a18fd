"""The admin service's records on the wire (:mod:`sealtorch.protocol.admin`): each record's
fields are mapped here, once."""

from __future__ import annotations

from sealtorch.keyserver._service import scope_list
from sealtorch.keyserver.admin_service import (
    AuditSlice,
    ModelSummary,
    ModelView,
    NewModel,
    NewToken,
)
from sealtorch.keyserver.records import AdminTokenRecord, KeyVersionRecord, PolicyRecord
from sealtorch.protocol.admin import (
    AuditHeadInfo,
    AuditPage,
    CreatedModel,
    CreatedToken,
    KeyBlockWire,
    KeyVersionInfo,
    ModelDetail,
    ModelInfo,
    PolicyInfo,
    TokenInfo,
)
from sealtorch.sealed.header import KeyBlock

__all__ = [
    "audit_page",
    "created_model",
    "created_token",
    "key_block",
    "key_info",
    "model_detail",
    "model_info",
    "policy_info",
    "token_info",
]


def model_info(summary: ModelSummary) -> ModelInfo:
    return ModelInfo(
        model_id=summary.model.model_id,
        created_at=summary.model.created_at,
        current_key_version=summary.current_key_version,
        policy_version=summary.policy_version,
    )


def key_info(record: KeyVersionRecord) -> KeyVersionInfo:
    return KeyVersionInfo(
        model_id=record.model_id,
        version=record.version,
        state=record.state.value,
        fingerprint=record.fingerprint,
        wrap_key_id=record.wrap_key_id,
        created_at=record.created_at,
        revoked_at=record.revoked_at,
    )


def policy_info(record: PolicyRecord) -> PolicyInfo:
    return PolicyInfo(
        model_id=record.model_id,
        version=record.version,
        digest=record.digest,
        created_at=record.created_at,
        policy=record.parsed(),
    )


def token_info(record: AdminTokenRecord) -> TokenInfo:
    return TokenInfo(
        token_id=record.token_id,
        name=record.name,
        scopes=tuple(scope_list(record.scopes)),
        created_at=record.created_at,
        expires_at=record.expires_at,
        revoked_at=record.revoked_at,
    )


def model_detail(view: ModelView) -> ModelDetail:
    return ModelDetail(
        model=model_info(view.summary),
        keys=tuple(key_info(k) for k in view.keys),
        policy=policy_info(view.policy) if view.policy else None,
    )


def created_model(created: NewModel) -> CreatedModel:
    return CreatedModel(model=model_info(created.model), key=key_info(created.key))


def created_token(created: NewToken) -> CreatedToken:
    return CreatedToken(info=token_info(created.record), token=created.token)


def audit_page(page: AuditSlice) -> AuditPage:
    return AuditPage(
        head=AuditHeadInfo(seq=page.head.seq, hash=page.head.hash),
        records=tuple(r.as_json() for r in page.records),
        next_after=page.next_after,
    )


def key_block(block: KeyBlock) -> KeyBlockWire:
    return KeyBlockWire(
        key_version=block.key_version,
        salt=block.salt,
        nonce=block.nonce,
        wrapped_cek=block.wrapped_cek,
    )
