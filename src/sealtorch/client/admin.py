"""The key server's admin API client (``sealtorch admin ...``) and remote key wrapping.

:class:`AdminClient` calls the admin API with a bearer token; :class:`KeyServerWrapper` seals
files with a content key wrapped *by the key server* (``sealtorch encrypt --keyserver``): the
data key never leaves the server.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from sealtorch._crypto.tls import untrusted_server_message
from sealtorch.client._http import make_http_client
from sealtorch.errors import ConfigError, Error, ProtocolError
from sealtorch.keys import DataKey
from sealtorch.protocol import API_PREFIX, ErrorBody
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
    check_scopes,
)
from sealtorch.protocol.audit import AuditHead, read_jsonl
from sealtorch.protocol.checkpoint import SignedCheckpoint
from sealtorch.sealed.header import KeyBlock

if TYPE_CHECKING:
    from sealtorch.protocol.audit import AuditRecord
    from sealtorch.sealed.header import Header

__all__ = ["AdminClient", "AdminError", "KeyServerWrapper", "read_token"]

_log = logging.getLogger(__name__)


class AdminError(Error):
    """The key server refused or failed an admin request; ``code`` is its error code."""

    def __init__(self, message: str, *, code: str, status_code: int | None) -> None:
        super().__init__(message)
        self.code = code
        self.status_code = status_code


def read_token(
    *, token: str | None = None, token_file: str | os.PathLike[str] | None = None
) -> str:
    """An admin token given directly or in a file (first line)."""
    if token:
        return token.strip()
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the admin token file {token_file}: {exc}") from exc
        lines = text.strip().splitlines()
        if lines:
            return lines[0].strip()
    raise ConfigError(
        "no admin token: pass --token-file FILE or --token-env VAR (the token printed by "
        "`sealtorch keyserver init`)"
    )


class AdminClient:
    """The key server's admin API (bearer admin token), as used by ``sealtorch admin``."""

    def __init__(
        self,
        url: str,
        *,
        token: str,
        ca: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        allow_insecure_http: bool = False,
    ) -> None:
        self.url = url
        self._http = make_http_client(
            url,
            ca=ca,
            timeout=timeout,
            transport=transport,
            allow_insecure_http=allow_insecure_http,
        )
        self._http.headers["authorization"] = f"Bearer {token}"

    def __repr__(self) -> str:
        return f"AdminClient({self.url!r})"

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: BaseModel | None = None, **params: Any) -> Any:
        try:
            response = self._http.request(
                method,
                f"{API_PREFIX}/admin{path}",
                content=body.model_dump_json() if body is not None else None,
                headers={"content-type": "application/json"} if body is not None else None,
                params=params or None,
            )
        except httpx.TransportError as exc:
            untrusted = untrusted_server_message(
                exc, server=f"the key server at {self.url}", ca_option="--ca (Python: ca=)"
            )
            raise AdminError(
                untrusted
                or f"cannot reach the key server at {self.url} ({type(exc).__name__}: {exc}); "
                "check --server, --ca and that the server runs",
                code="untrusted_certificate" if untrusted else "unreachable",
                status_code=None,
            ) from exc
        if response.status_code >= 400:
            code, message = "http_error", f"HTTP {response.status_code}"
            try:
                error = ErrorBody.model_validate_json(response.content).error
                code, message = error.code, error.message
            except ValidationError:
                pass
            hint = {
                401: " (pass the admin token with --token-file or --token-env)",
                403: " (the admin token is wrong, revoked or expired)",
            }.get(response.status_code, "")
            if code == "insufficient_scope":  # the message names the scope
                hint = " (use a token that has it)"
            elif code == "token_outlives_creator":
                hint = ""
            raise AdminError(f"{message}{hint}", code=code, status_code=response.status_code)
        try:
            return response.json()
        except ValueError as exc:
            raise ProtocolError("the key server sent a response that is not JSON") from exc

    @staticmethod
    def _as(model: Any, data: Any) -> Any:
        try:
            return TypeAdapter(model).validate_python(data)
        except ValidationError as exc:
            raise ProtocolError(
                f"the key server's response does not match the admin API ({exc.error_count()} "
                "schema error(s)); are client and server the same version?"
            ) from exc

    # -- models and keys --

    def create_model(self, model_id: str, *, key: DataKey | None = None) -> CreatedModel:
        body = CreateModelRequest(model_id=model_id, key=key.material if key else None)
        result: CreatedModel = self._as(CreatedModel, self._call("POST", "/models", body))
        return result

    def list_models(self) -> list[ModelInfo]:
        result: list[ModelInfo] = self._as(list[ModelInfo], self._call("GET", "/models"))
        return result

    def show_model(self, model_id: str) -> ModelDetail:
        path = f"/models/{quote(model_id, safe='')}"
        result: ModelDetail = self._as(ModelDetail, self._call("GET", path))
        return result

    def delete_model(self, model_id: str) -> ModelInfo:
        path = f"/models/{quote(model_id, safe='')}"
        result: ModelInfo = self._as(ModelInfo, self._call("DELETE", path))
        return result

    def list_keys(self, model_id: str) -> list[KeyVersionInfo]:
        path = f"/models/{quote(model_id, safe='')}/keys"
        result: list[KeyVersionInfo] = self._as(list[KeyVersionInfo], self._call("GET", path))
        return result

    def rotate_key(self, model_id: str, *, key: DataKey | None = None) -> KeyVersionInfo:
        path = f"/models/{quote(model_id, safe='')}/keys"
        body = RotateRequest(key=key.material if key else None)
        result: KeyVersionInfo = self._as(KeyVersionInfo, self._call("POST", path, body))
        return result

    def revoke_key(self, model_id: str, version: int) -> KeyVersionInfo:
        path = f"/models/{quote(model_id, safe='')}/keys/{int(version)}/revoke"
        result: KeyVersionInfo = self._as(KeyVersionInfo, self._call("POST", path))
        return result

    # -- policies --

    def set_policy(self, model_id: str, policy: Mapping[str, Any]) -> PolicyInfo:
        path = f"/models/{quote(model_id, safe='')}/policy"
        body = SetPolicyRequest(policy=dict(policy))
        result: PolicyInfo = self._as(PolicyInfo, self._call("PUT", path, body))
        return result

    def show_policy(self, model_id: str) -> PolicyInfo:
        path = f"/models/{quote(model_id, safe='')}/policy"
        result: PolicyInfo = self._as(PolicyInfo, self._call("GET", path))
        return result

    def policy_history(self, model_id: str) -> list[PolicyInfo]:
        path = f"/models/{quote(model_id, safe='')}/policies"
        result: list[PolicyInfo] = self._as(list[PolicyInfo], self._call("GET", path))
        return result

    # -- tokens --

    def create_token(
        self,
        name: str,
        *,
        scopes: Iterable[AdminScope | str],
        expires_in: int | None = None,
    ) -> CreatedToken:
        """A new admin token with ``scopes`` (at least one; see :class:`AdminScope`), none of
        which this client's token may lack."""
        body = CreateTokenRequest(name=name, scopes=check_scopes(scopes), expires_in=expires_in)
        result: CreatedToken = self._as(CreatedToken, self._call("POST", "/tokens", body))
        return result

    def list_tokens(self) -> list[TokenInfo]:
        result: list[TokenInfo] = self._as(list[TokenInfo], self._call("GET", "/tokens"))
        return result

    def revoke_token(self, token_id: str) -> TokenInfo:
        path = f"/tokens/{quote(token_id, safe='')}/revoke"
        result: TokenInfo = self._as(TokenInfo, self._call("POST", path))
        return result

    # -- audit --

    def audit_head(self) -> AuditHead:
        page = self._as(AuditPage, self._call("GET", "/audit", after=2**62, limit=1))
        return AuditHead(seq=page.head.seq, hash=page.head.hash)

    def iter_audit(self, *, after: int = 0) -> Iterator[AuditRecord]:
        """Every audit record after ``after``, in order (strictly parsed for verification)."""

        cursor: int | None = after
        while cursor is not None:
            page = self._as(AuditPage, self._call("GET", "/audit", after=cursor, limit=1000))
            lines = [json.dumps(record, sort_keys=True) for record in page.records]
            yield from read_jsonl(lines)
            cursor = page.next_after

    def audit_checkpoint(self) -> SignedCheckpoint:
        """The server's current audit head, signed (verify it with ``verify_checkpoint``)."""

        result: SignedCheckpoint = self._as(
            SignedCheckpoint, self._call("GET", "/audit/checkpoint")
        )
        return result

    # -- content keys --

    def wrap(self, *, model_id: str, body_digest: bytes, cek: bytes) -> KeyBlock:
        """Have the server wrap ``cek`` under the model's current data key version."""

        body = WrapRequest(model_id=model_id, body_digest=body_digest, cek=cek)
        wire: KeyBlockWire = self._as(KeyBlockWire, self._call("POST", "/wrap", body))
        return KeyBlock(
            key_version=wire.key_version,
            salt=wire.salt,
            nonce=wire.nonce,
            wrapped_cek=wire.wrapped_cek,
        )

    def rewrap(self, header: Header) -> KeyBlock:
        """Have the server rewrap a file's content key to the current data key version."""

        body = RewrapRequest.model_validate(
            {
                "body": {
                    "model_id": header.body.model_id,
                    "plaintext_size": header.body.plaintext_size,
                    "chunk_size": header.body.chunk_size,
                    "salt": header.body.salt,
                    "suite": header.body.suite,
                },
                "key": {
                    "key_version": header.key.key_version,
                    "salt": header.key.salt,
                    "nonce": header.key.nonce,
                    "wrapped_cek": header.key.wrapped_cek,
                },
                "set": None
                if header.body.set is None
                else {
                    "id": header.body.set.set_id,
                    "index": header.body.set.index,
                    "count": header.body.set.count,
                    "digests": list(header.body.set.digests),
                },
            }
        )
        wire: KeyBlockWire = self._as(KeyBlockWire, self._call("POST", "/rewrap", body))
        return KeyBlock(
            key_version=wire.key_version,
            salt=wire.salt,
            nonce=wire.nonce,
            wrapped_cek=wire.wrapped_cek,
        )


class KeyServerWrapper:
    """A :class:`~sealtorch.sealed.keywrap.ContentKeyWrapper` whose wrapping happens in the key
    server (``encrypt_model(..., key=KeyServerWrapper(admin))``): the file's content key goes
    to the server over TLS, the data key never leaves it. The file is sealed under the model's
    current key version. :meth:`rewrap` does the same for ``sealtorch rewrap --keyserver``."""

    def __init__(self, admin: AdminClient) -> None:
        self._admin = admin

    def __repr__(self) -> str:
        return f"KeyServerWrapper({self._admin.url!r})"

    def wrap(self, *, model_id: str, body_digest: bytes, cek: bytes) -> KeyBlock:
        return self._admin.wrap(model_id=model_id, body_digest=body_digest, cek=cek)

    def rewrap(self, header: Header) -> KeyBlock:
        return self._admin.rewrap(header)

    def close(self) -> None:
        """Close the admin client's connections."""
        self._admin.close()
