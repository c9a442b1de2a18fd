"""The admin API against a real server: authentication, models, keys, policies, tokens, audit,
content key wrapping, request limits (SQLite and PostgreSQL)."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest

from _fixtures.clock import FakeClock
from _fixtures.keyserver import KeyServerUnderTest
from sealtorch.client import AdminClient, AdminError
from sealtorch.errors import IntegrityError
from sealtorch.keys import generate_key
from sealtorch.protocol.admin import ADMIN_SCOPES
from sealtorch.protocol.audit import verify_chain
from sealtorch.sealed.header import BodyHeader, Header
from sealtorch.sealed.keywrap import unwrap_content_key


def _admin_routes(keyserver: KeyServerUnderTest) -> list[tuple[str, str]]:
    routes = []
    for path, methods in keyserver.app.openapi()["paths"].items():
        if not path.startswith("/v1/admin"):
            continue
        concrete = (
            path.replace("{model_id}", "m")
            .replace("{version}", "1")
            .replace("{token_id}", "0123456789abcdef")
        )
        routes += [(method.upper(), concrete) for method in methods]
    assert len(routes) >= 15
    return routes


def test_every_admin_route_needs_a_valid_token(
    keyserver: KeyServerUnderTest, clock: FakeClock
) -> None:
    routes = _admin_routes(keyserver)
    with keyserver.admin() as admin:
        revoked = admin.create_token("to revoke", scopes=ADMIN_SCOPES)
        admin.revoke_token(revoked.info.token_id)
        expiring = admin.create_token("short", scopes=ADMIN_SCOPES, expires_in=60)
    clock.advance(seconds=61)
    wrong = f"sta_{secrets.token_hex(8)}.{'A' * 43}"
    real_id = keyserver.admin_token.split(".")[0]
    wrong_secret = f"{real_id}.{'B' * 43}"
    with keyserver.http() as http:
        for method, path in routes:
            response = http.request(method, path, json={})
            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["error"]["code"] == "unauthenticated"
            for bad in (wrong, wrong_secret, revoked.token, expiring.token, "garbage"):
                response = http.request(
                    method, path, json={}, headers={"Authorization": f"Bearer {bad}"}
                )
                assert response.status_code == 403, (method, path, bad[:8])
                assert response.json()["error"]["code"] == "token_invalid"
                assert bad not in response.text
            response = http.request(
                method, path, json={}, headers={"Authorization": f"Basic {keyserver.admin_token}"}
            )
            assert response.status_code == 401


def test_model_lifecycle(keyserver: KeyServerUnderTest) -> None:
    imported = generate_key()
    with keyserver.admin() as admin:
        created = admin.create_model("resnet50", key=imported)
        assert created.key.fingerprint == imported.fingerprint
        assert [m.model_id for m in admin.list_models()] == ["resnet50"]
        with pytest.raises(AdminError) as caught:
            admin.create_model("resnet50")
        assert (caught.value.status_code, caught.value.code) == (409, "conflict")
        rotated = admin.rotate_key("resnet50")
        assert rotated.version == 2
        assert rotated.fingerprint != imported.fingerprint
        admin.revoke_key("resnet50", 1)
        with pytest.raises(AdminError) as caught:
            admin.revoke_key("resnet50", 1)
        assert caught.value.status_code == 409
        with pytest.raises(AdminError) as caught:
            admin.revoke_key("resnet50", 9)
        assert caught.value.status_code == 404
        detail = admin.show_model("resnet50")
        assert [(k.version, k.state) for k in detail.keys] == [(1, "revoked"), (2, "active")]
        assert detail.model.current_key_version == 2
        assert detail.policy is None
        admin.delete_model("resnet50")
        assert admin.list_models() == []
        with pytest.raises(AdminError) as caught:
            admin.show_model("resnet50")
        assert caught.value.status_code == 404
        with pytest.raises(AdminError) as caught:  # ids of deleted models are never reused
            admin.create_model("resnet50")
        assert caught.value.status_code == 409
    with keyserver.client() as client:
        assert client.release(["resnet50"]).denied[0].reasons == ("unknown_model",)
    wrapped = keyserver.store.get_wrapped_key("resnet50", 2)
    assert wrapped is None  # crypto-shredded


def test_policies_are_validated_and_versioned(keyserver: KeyServerUnderTest) -> None:
    keyserver.add_model("m")
    with keyserver.admin() as admin:
        for bad in (
            {"allowed_tees": ["sim"]},  # no identity pin
            {"allowed_tees": ["sim"], "sim": {"mrenclave": ["zz"]}},
            {"allowed_tees": ["sim"], "sim": {"mrenclave": ["aa" * 32]}, "typo": 1},
        ):
            with pytest.raises(AdminError) as caught:
                admin.set_policy("m", bad)
            assert caught.value.status_code == 400
        second = admin.set_policy("m", keyserver.sim_policy(name="v2"))
        assert second.version == 2
        assert admin.show_policy("m").policy["name"] == "v2"
        assert [p.version for p in admin.policy_history("m")] == [1, 2]
        with pytest.raises(AdminError) as caught:
            admin.set_policy("ghost", keyserver.sim_policy())
        assert caught.value.status_code == 404


def test_the_last_admin_token_cannot_be_revoked(keyserver: KeyServerUnderTest) -> None:
    with keyserver.admin() as admin:
        (only,) = admin.list_tokens()
        with pytest.raises(AdminError) as caught:
            admin.revoke_token(only.token_id)
        assert caught.value.status_code == 409
        second = admin.create_token("ops", scopes=ADMIN_SCOPES)
        assert second.token.startswith("sta_")
        admin.revoke_token(only.token_id)
    with pytest.raises(AdminError) as caught, keyserver.admin() as admin:
        admin.list_models()
    assert caught.value.status_code == 403
    with AdminClient(keyserver.url, token=second.token, ca=keyserver.ca) as admin:
        usable = {t.token_id: t.revoked_at is None for t in admin.list_tokens()}
        assert usable == {only.token_id: False, second.info.token_id: True}


def test_every_admin_change_is_audited_and_the_chain_verifies(
    keyserver: KeyServerUnderTest,
) -> None:
    keyserver.add_model("m")
    with keyserver.admin() as admin:
        admin.rotate_key("m")
        admin.revoke_key("m", 1)
        with pytest.raises(AdminError):
            admin.revoke_key("m", 1)
        admin.create_token("x", scopes=["seal"])
        records = list(admin.iter_audit())
        head = admin.audit_head()
    actions = [(r.action, r.decision) for r in records if r.kind == "admin"]
    assert actions[-6:] == [
        ("model.create", "ok"),
        ("policy.set", "ok"),
        ("key.rotate", "ok"),
        ("key.revoke", "ok"),
        ("key.revoke", "error"),
        ("token.create", "ok"),
    ]
    assert all(r.actor and r.client_address == "127.0.0.1" for r in records[1:])
    assert verify_chain(records, head=head).count == len(records)


def test_wrap_and_rewrap_never_expose_the_data_key(keyserver: KeyServerUnderTest) -> None:
    keyserver.add_model("m")
    body = BodyHeader(
        model_id="m", plaintext_size=1000, chunk_size=1024, salt=secrets.token_bytes(32)
    )
    cek = secrets.token_bytes(32)
    with keyserver.admin() as admin:
        block = admin.wrap(model_id="m", body_digest=body.digest, cek=cek)
        assert block.key_version == 1
        admin.rotate_key("m")
        admin.revoke_key("m", 1)
        rewrapped = admin.rewrap(Header(body=body, key=block))
        assert rewrapped.key_version == 2
        tampered = Header(
            body=BodyHeader(model_id="m", plaintext_size=1001, chunk_size=1024, salt=body.salt),
            key=block,
        )
        with pytest.raises(AdminError) as caught:
            admin.rewrap(tampered)
        assert (caught.value.status_code, caught.value.code) == (400, "header_invalid")
        with pytest.raises(AdminError) as caught:
            admin.wrap(model_id="ghost", body_digest=body.digest, cek=cek)
        assert caught.value.status_code == 404
    # Only an attested enclave gets the data key, and it opens the server-made key block.
    with keyserver.client() as client:
        dek = client.data_key("m", 2)
        with pytest.raises(Exception) as revoked:
            client.data_key("m", 1)
        assert "key_version_unavailable" in revoked.value.reasons  # type: ignore[attr-defined]
    assert unwrap_content_key(dek, Header(body=body, key=rewrapped)) == cek
    with pytest.raises(IntegrityError):
        unwrap_content_key(dek, Header(body=body, key=block))


@pytest.mark.parametrize("path", ["/v1/keys/release", "/v1/admin/models"])
def test_request_bodies_over_the_cap_are_413(keyserver: KeyServerUnderTest, path: str) -> None:
    headers = {"Authorization": f"Bearer {keyserver.admin_token}"}
    with keyserver.http() as http:
        big = b'{"model_id": "' + b"a" * 70_000 + b'"}'
        response = http.post(path, content=big, headers=headers)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

        def chunks() -> Any:  # no Content-Length: streamed, cut off by the server
            for _ in range(100):
                yield b"x" * 1024

        response = http.post(path, content=chunks(), headers=headers)
        assert response.status_code == 413


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"null",
        b"[]",
        b'"x"',
        b'{"nonce": 5}',
        b'{"nonce": "AAAA", "evidence": {"type": "sim", "data": "!!"}}',
        b'{"nonce": "' + b"A" * 43 + b'", "evidence": {"type": "sgx", "data": "AA"}, "hpke": 1}',
        '{"nonce": "\u00e9"}'.encode(),
        b"\xff\xfe",
    ],
)
def test_malformed_release_requests_are_400(keyserver: KeyServerUnderTest, body: bytes) -> None:
    with keyserver.http() as http:
        response = http.post(
            "/v1/keys/release", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_request"


def test_health_metrics_and_openapi(keyserver: KeyServerUnderTest) -> None:
    keyserver.add_model("m")
    with keyserver.client() as client:
        client.release(["m", "ghost"])
    with keyserver.http() as http:
        # the fixture trusts a sim key (development only), and both probes say so
        assert http.get("/healthz").json() == {"status": "ok", "simulated_tee": True}
        assert http.get("/readyz").json() == {"status": "ready", "simulated_tee": True}
        metrics = http.get("/metrics").text
        assert (
            'sealtorch_keyserver_release_decisions_total{action="release",decision="partial"}'
            in (metrics)
        )
        assert 'sealtorch_keyserver_release_reasons_total{reason="unknown_model"} 1.0' in metrics
        assert "sealtorch_keyserver_keys_released_total 1.0" in metrics
        assert 'route="/v1/keys/release"' in metrics
        spec = http.get("/openapi.json").json()
        assert "/v1/keys/release" in spec["paths"]
        assert http.get("/docs").status_code == 404  # no UI that would load remote scripts
        missing = http.get("/v1/nothing")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"


def test_admin_client_reports_unreachable_servers() -> None:
    with AdminClient("https://127.0.0.1:9", token="sta_x") as admin, pytest.raises(AdminError) as e:
        admin.list_models()
    assert e.value.code == "unreachable"
    assert isinstance(e.value.__cause__, httpx.TransportError)
