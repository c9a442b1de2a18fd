"""Fuzzing the key server's HTTP API: every operation of its OpenAPI document (schemathesis,
with and without a valid admin token) and raw byte bodies (hypothesis) must give 2xx/4xx,
never 5xx — malformed JSON and wrong types are the client's error, never a crash."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _fixtures.keyserver import new_signing_key
from sealtorch.attestation import SimAttester, make_verifiers
from sealtorch.keyserver.app import create_app
from sealtorch.keyserver.masterkey import FileMasterKey, FileMasterKeyConfig
from sealtorch.keyserver.settings import KeyServerSettings
from sealtorch.keyserver.store import Store, open_store, sqlite_url
from sealtorch.keyserver.tokens import TokenKind, issue_token
from sealtorch.protocol.admin import ADMIN_SCOPES
from sealtorch.protocol.audit import AuditEntry, AuditKind

_FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class _Api:
    def __init__(self, tmp: Path) -> None:
        self.store: Store = open_store(sqlite_url(tmp / "keys.db"))
        self.store.migrate()
        self.master = FileMasterKey.create(tmp / "master.key")
        self.attester = SimAttester(role="app", key_path=tmp / "sim.key")
        issued = issue_token(TokenKind.ADMIN)
        with self.store.transaction() as tx:
            tx.create_admin_token(
                token_id=issued.token_id, digest=issued.digest, name="fuzz", scopes=ADMIN_SCOPES
            )
            tx.append_audit(AuditEntry(kind=AuditKind.ADMIN, action="token.create", decision="ok"))
        self.token = issued.token
        settings_ = KeyServerSettings(
            database_url=sqlite_url(tmp / "keys.db"),
            master_key=FileMasterKeyConfig(path=tmp / "master.key"),
        )
        self.app = create_app(
            settings_,
            store=self.store,
            master_key=self.master,
            signing_key=new_signing_key(),
            verifiers=make_verifiers(sim_trusted_keys=[self.attester.public_key]),
        )

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[_Api]:
    made = _Api(tmp_path)
    with TestClient(made.app) as client:
        client.post(
            "/v1/admin/models",
            json={"model_id": "m"},
            headers={"Authorization": f"Bearer {made.token}"},
        )
    yield made
    made.close()


def _operations() -> list[Any]:
    """Every operation of the app's OpenAPI document (the app is built only for its schema)."""
    app = create_app(
        KeyServerSettings(
            database_url="sqlite:///unused", master_key=FileMasterKeyConfig(path=Path("/unused"))
        )
    )
    loaded = schemathesis.openapi.from_dict(app.openapi())
    return [result.ok() for result in loaded.get_all_operations()]


_OPERATIONS = _operations()


@pytest.mark.parametrize("operation", _OPERATIONS, ids=[op.label for op in _OPERATIONS])
def test_no_operation_ever_answers_5xx(api: _Api, operation: Any) -> None:
    """Schema-driven cases (valid and invalid), with and without a valid admin token."""
    with TestClient(api.app) as client:

        @given(data=st.data())
        @_FUZZ
        def run(data: st.DataObject) -> None:
            mode = data.draw(st.sampled_from(list(schemathesis.GenerationMode)))
            case = data.draw(operation.as_strategy(generation_mode=mode))
            body = getattr(case, "body", None)
            has_body = isinstance(body, dict | list | str | int | float | bool) or body is None
            for headers in ({}, {"Authorization": f"Bearer {api.token}"}):
                response = client.request(
                    case.method,
                    case.formatted_path,
                    params=case.query or None,
                    headers={**(case.headers or {}), **headers},
                    json=body if has_body and case.method in ("POST", "PUT") else None,
                )
                assert response.status_code < 500, (case.method, case.path, response.text)
                if response.status_code >= 400:
                    assert set(response.json()) == {"error"}

        run()


_JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=50)
)
_JSON = st.recursive(
    _JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["nonce", "evidence", "hpke", "models", "session", "type", "data"])
            | st.text(max_size=8),
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
)


@given(body=st.binary(max_size=512) | _JSON.map(lambda v: json.dumps(v).encode()))
@_FUZZ
def test_release_and_renew_survive_arbitrary_bodies(api: _Api, body: bytes) -> None:
    with TestClient(api.app) as client:
        for path, headers in (
            ("/v1/keys/release", {}),
            ("/v1/keys/renew", {"Authorization": "Bearer sts_0123456789abcdef." + "A" * 43}),
            ("/v1/admin/wrap", {"Authorization": f"Bearer {api.token}"}),
            ("/v1/admin/rewrap", {"Authorization": f"Bearer {api.token}"}),
        ):
            response = client.post(
                path, content=body, headers={**headers, "content-type": "application/json"}
            )
            assert 400 <= response.status_code < 500, (path, response.text)
            assert set(response.json()) == {"error"}
