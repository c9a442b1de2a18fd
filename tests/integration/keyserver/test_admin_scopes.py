"""Admin token scopes, from the attacker's side, against a real server (SQLite and PostgreSQL).

A token holds a set of scopes (``seal``, ``read``, ``policy-admin``, ``model-admin``,
``token-admin``) and every admin route needs one. A stolen CI token (``seal``) or an auditor's
token (``read``) must not be able to change a policy, destroy keys, mint tokens or read what it
was not given; every such attempt is ``403 insufficient_scope``, is audited, and changes
nothing. A ``token-admin`` cannot mint or disarm a token stronger than itself.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from _fixtures.clock import FakeClock
from _fixtures.keyserver import KeyServerUnderTest, TlsFiles, running_keyserver
from _fixtures.keystore import database_before_scopes
from sealtorch.attestation import SimAttester
from sealtorch.cli import cli
from sealtorch.client import AdminClient, AdminError
from sealtorch.keyserver.masterkey import FileMasterKey
from sealtorch.keyserver.store import open_store, sqlite_url
from sealtorch.protocol.admin import ADMIN_SCOPES, AdminScope
from sealtorch.sealed.header import BodyHeader, Header

#: The documented table (docs/keyserver.md § Admin token scopes): route -> the scopes that
#: may call it (any one of them).
ROUTE_SCOPES: dict[tuple[str, str], tuple[str, ...]] = {
    ("POST", "/v1/admin/models"): ("model-admin",),
    ("GET", "/v1/admin/models"): ("read",),
    ("GET", "/v1/admin/models/{model_id}"): ("read",),
    ("DELETE", "/v1/admin/models/{model_id}"): ("model-admin",),
    ("GET", "/v1/admin/models/{model_id}/keys"): ("read",),
    ("POST", "/v1/admin/models/{model_id}/keys"): ("policy-admin",),
    ("POST", "/v1/admin/models/{model_id}/keys/{version}/revoke"): ("policy-admin",),
    ("PUT", "/v1/admin/models/{model_id}/policy"): ("policy-admin",),
    ("GET", "/v1/admin/models/{model_id}/policy"): ("read",),
    ("GET", "/v1/admin/models/{model_id}/policies"): ("read",),
    ("POST", "/v1/admin/tokens"): ("token-admin",),
    ("GET", "/v1/admin/tokens"): ("read", "token-admin"),
    ("POST", "/v1/admin/tokens/{token_id}/revoke"): ("token-admin",),
    ("GET", "/v1/admin/audit"): ("read",),
    ("GET", "/v1/admin/audit/checkpoint"): ("read",),
    ("GET", "/v1/admin/status"): ("read",),
    ("POST", "/v1/admin/wrap"): ("seal",),
    ("POST", "/v1/admin/rewrap"): ("seal",),
}

_INSECURE_POLICIES = {
    "allow_any_measurement_insecure": {
        "version": 1,
        "allowed_tees": ["sim"],
        "allow_any_measurement_insecure": True,
    },
    "allow_debug_enclave_insecure": None,  # the test server's sim policy plus the flag
}


def _token(keyserver: KeyServerUnderTest, name: str, scopes: Iterable[str]) -> str:
    with keyserver.admin() as admin:
        return admin.create_token(name, scopes=list(scopes)).token


def _as(keyserver: KeyServerUnderTest, token: str) -> AdminClient:
    return AdminClient(keyserver.url, token=token, ca=keyserver.ca)


def _insecure_policy(keyserver: KeyServerUnderTest, flag: str) -> dict[str, Any]:
    document = _INSECURE_POLICIES[flag]
    return dict(document) if document else keyserver.sim_policy(**{flag: True})


def _file_header(keyserver: KeyServerUnderTest, model_id: str) -> tuple[BodyHeader, Any]:
    body = BodyHeader(
        model_id=model_id, plaintext_size=100, chunk_size=1024, salt=secrets.token_bytes(32)
    )
    with keyserver.admin() as admin:
        block = admin.wrap(model_id=model_id, body_digest=body.digest, cek=secrets.token_bytes(32))
    return body, block


def _state(keyserver: KeyServerUnderTest) -> dict[str, Any]:
    """Everything an admin action could change, read with the operator's token."""
    with keyserver.admin() as admin:
        models = admin.list_models()
        return {
            "models": [m.model_dump() for m in models],
            "keys": {
                m.model_id: [k.model_dump() for k in admin.list_keys(m.model_id)] for m in models
            },
            "policies": {
                m.model_id: [p.model_dump() for p in admin.policy_history(m.model_id)]
                for m in models
            },
            "tokens": [t.model_dump() for t in admin.list_tokens()],
        }


def _audit_since(keyserver: KeyServerUnderTest, seq: int) -> list[Any]:
    with keyserver.admin() as admin:
        return list(admin.iter_audit(after=seq))


def _head(keyserver: KeyServerUnderTest) -> int:
    with keyserver.admin() as admin:
        return admin.audit_head().seq


def _refused(caught: pytest.ExceptionInfo[AdminError], *scopes: str) -> None:
    assert (caught.value.status_code, caught.value.code) == (403, "insufficient_scope")
    names = " or ".join(f"'{scope}'" for scope in scopes)
    assert f"this token lacks scope {names}, needed to " in str(caught.value)


def _metric(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(f"{name}{{{label_text}}}" if labels else name) + r" (\S+)"
    match = re.search(rf"^{pattern}$", text, re.MULTILINE)
    assert match, f"{name} {labels} not in /metrics"
    return float(match.group(1))


def _request(
    keyserver: KeyServerUnderTest, token: str, method: str, path: str, body: Any = None
) -> Any:
    with keyserver.http() as http:
        return http.request(method, path, json=body, headers={"Authorization": f"Bearer {token}"})


# -- the table --------------------------------------------------------------------------------


def test_every_admin_route_declares_its_scope(keyserver: KeyServerUnderTest) -> None:
    declared = {}
    for path, operations in keyserver.app.openapi()["paths"].items():
        if path.startswith("/v1/admin"):
            for method, operation in operations.items():
                declared[(method.upper(), path)] = tuple(operation.get("x-sealtorch-scopes", ()))
    assert declared == ROUTE_SCOPES


def test_a_token_without_the_scope_is_refused_on_every_route(
    keyserver: KeyServerUnderTest,
) -> None:
    """Each route, called with a token holding every scope but the ones it needs (and a valid
    body): 403 insufficient_scope naming the scope, one audit record, no change."""
    keyserver.add_model("m")
    body, block = _file_header(keyserver, "m")
    with keyserver.admin() as admin:
        target = admin.create_token("ci", scopes=["seal"]).info.token_id  # to revoke
    bodies: dict[tuple[str, str], Any] = {
        ("POST", "/v1/admin/models"): {"model_id": "new"},
        ("POST", "/v1/admin/models/{model_id}/keys"): {},
        ("PUT", "/v1/admin/models/{model_id}/policy"): {"policy": keyserver.sim_policy()},
        ("POST", "/v1/admin/tokens"): {"name": "x", "scopes": ["seal"]},
        ("POST", "/v1/admin/wrap"): {
            "model_id": "m",
            "body_digest": "A" * 43,
            "cek": "A" * 43,
        },
        ("POST", "/v1/admin/rewrap"): {
            "body": {
                "model_id": "m",
                "plaintext_size": body.plaintext_size,
                "chunk_size": body.chunk_size,
                "salt": "A" * 43,
                "suite": body.suite,
            },
            "key": {
                "key_version": block.key_version,
                "salt": "A" * 43,
                "nonce": "A" * 16,
                "wrapped_cek": "A" * 64,
            },
        },
    }
    tokens = {
        needed: _token(keyserver, f"without {'+'.join(needed)}", set(ADMIN_SCOPES) - set(needed))
        for needed in set(ROUTE_SCOPES.values())
    }
    before, head = _state(keyserver), _head(keyserver)
    for (method, template), needed in ROUTE_SCOPES.items():
        path = (
            template.replace("{model_id}", "m")
            .replace("{version}", "1")
            .replace("{token_id}", target)
        )
        response = _request(keyserver, tokens[needed], method, path, bodies.get((method, template)))
        assert response.status_code == 403, (method, path, response.text)
        error = response.json()["error"]
        assert error["code"] == "insufficient_scope", (method, path)
        names = " or ".join(f"'{scope}'" for scope in needed)
        assert error["message"].startswith(f"this token lacks scope {names}, needed to ")
    assert _state(keyserver) == before
    refusals = _audit_since(keyserver, head)
    assert len(refusals) == len(ROUTE_SCOPES)
    assert {(r.decision, r.reasons) for r in refusals} == {("refuse", ("insufficient_scope",))}
    assert all(r.actor and r.client_address == "127.0.0.1" for r in refusals)
    by_action = {r.action: r for r in refusals}
    assert by_action["policy.set"].model_ids == ("m",)
    assert by_action["policy.set"].details["needed"] == ["policy-admin"]
    assert "policy-admin" not in by_action["policy.set"].details["scopes"]
    with keyserver.http() as http:
        metrics = http.get("/metrics").text
    assert _metric(metrics, "sealtorch_keyserver_admin_scope_refusals_total", action="policy.set")


# -- a stolen CI token ------------------------------------------------------------------------


def test_a_seal_token_seals_and_can_do_nothing_else(
    keyserver: KeyServerUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    keyserver.add_model("m")
    keyserver.add_model("other")
    seal = _token(keyserver, "ci-seal", ["seal"])
    body, block = _file_header(keyserver, "m")
    before, head = _state(keyserver), _head(keyserver)
    attempts = 0
    with _as(keyserver, seal) as ci:
        # What it is for: wrapping a new file's content key, and rewrapping after a rotation.
        wrapped = ci.wrap(model_id="m", body_digest=body.digest, cek=secrets.token_bytes(32))
        assert wrapped.key_version == 1
        assert ci.rewrap(Header(body=body, key=block)).key_version == 1
        attempts += 2
        for flag in ("allow_any_measurement_insecure", "allow_debug_enclave_insecure"):
            with pytest.raises(AdminError) as caught:
                ci.set_policy("m", _insecure_policy(keyserver, flag))
            _refused(caught, "policy-admin")
        with pytest.raises(AdminError) as caught:
            ci.set_policy("m", keyserver.sim_policy(name="an ordinary one"))
        _refused(caught, "policy-admin")
        with pytest.raises(AdminError) as caught:
            ci.delete_model("other")
        _refused(caught, "model-admin")
        with pytest.raises(AdminError) as caught:
            ci.create_model("mine")
        _refused(caught, "model-admin")
        with pytest.raises(AdminError) as caught:
            ci.rotate_key("m")
        _refused(caught, "policy-admin")
        with pytest.raises(AdminError) as caught:
            ci.revoke_key("m", 1)
        _refused(caught, "policy-admin")
        for scopes in (["seal"], list(ADMIN_SCOPES)):
            with pytest.raises(AdminError) as caught:
                ci.create_token("persistence", scopes=scopes)
            _refused(caught, "token-admin")
        with pytest.raises(AdminError) as caught:
            ci.list_tokens()
        _refused(caught, "read", "token-admin")
        with pytest.raises(AdminError) as caught:
            ci.audit_head()
        _refused(caught, "read")
        with pytest.raises(AdminError) as caught:
            ci.show_policy("m")
        _refused(caught, "read")
        with pytest.raises(AdminError) as caught:
            ci.list_models()
        _refused(caught, "read")
    assert _state(keyserver) == before
    records = _audit_since(keyserver, head)
    assert [(r.action, r.decision) for r in records[:attempts]] == [
        ("key.wrap", "ok"),
        ("key.rewrap", "ok"),
    ]
    assert all(r.decision == "refuse" for r in records[attempts:])
    assert len(records) - attempts == 13
    assert "INSECURE policy" not in caplog.text
    assert "lacks scope 'policy-admin'" in caplog.text
    assert "'ci-seal'" in caplog.text
    with keyserver.http() as http:
        metrics = http.get("/metrics").text
    for flag in _INSECURE_POLICIES:
        assert _metric(metrics, "sealtorch_keyserver_insecure_policy_sets_total", flag=flag) == 0
        assert _metric(metrics, "sealtorch_keyserver_insecure_policies", flag=flag) == 0
    # Its refusals name no data key, and it can still seal for models it cannot even list.
    with _as(keyserver, seal) as ci:
        ci.wrap(model_id="other", body_digest=body.digest, cek=secrets.token_bytes(32))


def test_a_read_token_reads_and_cannot_change_anything(keyserver: KeyServerUnderTest) -> None:
    keyserver.add_model("m")
    reader = _token(keyserver, "auditor", ["read"])
    body, block = _file_header(keyserver, "m")
    before, head = _state(keyserver), _head(keyserver)
    with _as(keyserver, reader) as auditor:
        assert [m.model_id for m in auditor.list_models()] == ["m"]
        assert auditor.show_model("m").model.model_id == "m"
        assert auditor.show_policy("m").version == 1
        assert len(auditor.policy_history("m")) == 1
        assert len(auditor.list_keys("m")) == 1
        assert {t.name: t.scopes for t in auditor.list_tokens()}["auditor"] == ("read",)
        assert auditor.audit_head().seq == head
        changes = [
            (lambda: auditor.create_model("new"), "model-admin"),
            (lambda: auditor.delete_model("m"), "model-admin"),
            (lambda: auditor.rotate_key("m"), "policy-admin"),
            (lambda: auditor.revoke_key("m", 1), "policy-admin"),
            (lambda: auditor.set_policy("m", keyserver.sim_policy(name="x")), "policy-admin"),
            (lambda: auditor.create_token("more", scopes=["read"]), "token-admin"),
            (lambda: auditor.revoke_token(auditor.list_tokens()[0].token_id), "token-admin"),
            (
                lambda: auditor.wrap(model_id="m", body_digest=body.digest, cek=bytes(32)),
                "seal",
            ),
            (lambda: auditor.rewrap(Header(body=body, key=block)), "seal"),
        ]
        for change, needed in changes:
            with pytest.raises(AdminError) as caught:
                change()
            _refused(caught, needed)
    assert _state(keyserver) == before
    refusals = _audit_since(keyserver, head)
    assert [r.decision for r in refusals] == ["refuse"] * len(changes)


# -- token-admin: no escalation ---------------------------------------------------------------


def test_a_token_admin_cannot_mint_or_disarm_a_stronger_token(
    keyserver: KeyServerUnderTest,
) -> None:
    issuer = _token(keyserver, "issuer", ["token-admin", "seal"])
    with keyserver.admin() as operator:
        stronger = [
            next(t.token_id for t in operator.list_tokens() if t.name == "test admin"),
            operator.create_token("auditor", scopes=["read"]).info.token_id,
        ]
    before, head = _state(keyserver), _head(keyserver)
    with _as(keyserver, issuer) as admin:
        for scopes, lacking in (
            (["read"], "'read'"),
            (["seal", "policy-admin"], "'policy-admin'"),
            (list(ADMIN_SCOPES), "'read', 'policy-admin', 'model-admin'"),
        ):
            with pytest.raises(AdminError) as caught:
                admin.create_token("escalated", scopes=scopes)
            assert (caught.value.status_code, caught.value.code) == (403, "insufficient_scope")
            assert f"lacks scope {lacking}, so it cannot create a token" in str(caught.value)
        # The operator's token (every scope) is out of its reach; so is a read-only one.
        for token_id in stronger:
            with pytest.raises(AdminError) as caught:
                admin.revoke_token(token_id)
            assert (caught.value.status_code, caught.value.code) == (403, "insufficient_scope")
            assert f"that token {token_id} holds, so it cannot revoke it" in str(caught.value)
        assert _state(keyserver) == before
        # Within its own scopes it works: mint a CI token, list, revoke it.
        minted = admin.create_token("ci", scopes=["seal"])
        assert minted.info.scopes == ("seal",)
        assert "ci" in {t.name for t in admin.list_tokens()}
        assert admin.revoke_token(minted.info.token_id).revoked_at is not None
    refusals = [r for r in _audit_since(keyserver, head) if r.decision == "refuse"]
    assert [r.action for r in refusals] == ["token.create"] * 3 + ["token.revoke"] * 2
    assert refusals[0].details["requested"] == ["read"]


def test_a_token_cannot_outlive_the_token_that_creates_it(
    keyserver: KeyServerUnderTest, clock: FakeClock
) -> None:
    with keyserver.admin() as operator:
        issuer = operator.create_token("day", scopes=list(ADMIN_SCOPES), expires_in=86400).token
    with _as(keyserver, issuer) as admin:
        for expires_in in (None, 86401):
            with pytest.raises(AdminError) as caught:
                admin.create_token("forever", scopes=["seal"], expires_in=expires_in)
            assert (caught.value.status_code, caught.value.code) == (403, "token_outlives_creator")
            assert "at most 86400 seconds" in str(caught.value)
        clock.advance(seconds=3600)
        assert admin.create_token("shorter", scopes=["seal"], expires_in=82800).info.expires_at


def test_the_last_usable_token_with_every_scope_cannot_be_revoked(
    keyserver: KeyServerUnderTest,
) -> None:
    """Else no token could ever grant policy-admin again (only a full token mints one)."""
    with keyserver.admin() as operator:
        (full,) = operator.list_tokens()
        partial = operator.create_token("most", scopes=[s for s in ADMIN_SCOPES if s != "seal"])
        with pytest.raises(AdminError) as caught:
            operator.revoke_token(full.token_id)  # itself, the last one with every scope
        assert (caught.value.status_code, caught.value.code) == (409, "conflict")
        assert "last usable admin token with every scope" in str(caught.value)
        second = operator.create_token("second", scopes=list(ADMIN_SCOPES))
    with _as(keyserver, second.token) as admin:
        admin.revoke_token(full.token_id)
        admin.revoke_token(partial.info.token_id)
        with pytest.raises(AdminError) as caught:
            admin.revoke_token(second.info.token_id)
        assert caught.value.status_code == 409


# -- insecure policy flags --------------------------------------------------------------------


def test_insecure_policy_flags_need_policy_admin_and_are_logged_and_counted(
    keyserver: KeyServerUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sealtorch.keyserver")
    keyserver.add_model("dev")
    keyserver.add_model("debugging")
    ops = _token(keyserver, "ops-policy", ["policy-admin"])
    head = _head(keyserver)
    with _as(keyserver, ops) as admin:
        admin.set_policy("dev", _insecure_policy(keyserver, "allow_any_measurement_insecure"))
        admin.set_policy("debugging", _insecure_policy(keyserver, "allow_debug_enclave_insecure"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    texts = [r.getMessage() for r in warnings if "INSECURE policy" in r.getMessage()]
    assert len(texts) == 2
    assert "model dev" in texts[0]
    assert "allow_any_measurement_insecure" in texts[0]
    assert "model debugging" in texts[1]
    assert "allow_debug_enclave_insecure" in texts[1]
    assert all("'ops-policy'" in text for text in texts)
    records = _audit_since(keyserver, head)
    assert [r.details.get("insecure") for r in records] == [
        ["allow_any_measurement_insecure"],
        ["allow_debug_enclave_insecure"],
    ]
    with keyserver.http() as http:
        metrics = http.get("/metrics").text
    for flag in _INSECURE_POLICIES:
        assert _metric(metrics, "sealtorch_keyserver_insecure_policy_sets_total", flag=flag) == 1
        assert _metric(metrics, "sealtorch_keyserver_insecure_policies", flag=flag) == 1
    # The gauge is the current state: a strict policy, or deleting the model, clears it.
    with _as(keyserver, ops) as admin:
        admin.set_policy("dev", keyserver.sim_policy())
    with keyserver.admin() as operator:
        operator.delete_model("debugging")
    with keyserver.http() as http:
        metrics = http.get("/metrics").text
    for flag in _INSECURE_POLICIES:
        assert _metric(metrics, "sealtorch_keyserver_insecure_policies", flag=flag) == 0
        assert _metric(metrics, "sealtorch_keyserver_insecure_policy_sets_total", flag=flag) == 1


# -- the command line -------------------------------------------------------------------------


def _admin_cli(keyserver: KeyServerUnderTest, token: str, *args: str) -> Any:
    return CliRunner().invoke(
        cli,
        ["admin", "--server", keyserver.url, "--ca", str(keyserver.ca), *args],
        env={"SEALTORCH_ADMIN_TOKEN": token},
    )


def test_cli_token_create_needs_explicit_scopes(keyserver: KeyServerUnderTest) -> None:
    missing = _admin_cli(keyserver, keyserver.admin_token, "token", "create", "--name", "ci")
    assert missing.exit_code == 2
    assert "needs at least one scope" in missing.output
    for scope in ADMIN_SCOPES:
        assert f"{scope.value}:" in missing.output
    unknown = _admin_cli(
        keyserver, keyserver.admin_token, "token", "create", "--name", "ci", "--scope", "all"
    )
    assert unknown.exit_code == 2
    assert "unknown scope 'all'" in unknown.output
    created = _admin_cli(
        keyserver, keyserver.admin_token,
        "token", "create", "--name", "ci", "--scope", "seal", "--scope", "read",
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    token = created.output.strip().splitlines()[-1]
    assert token.startswith("sta_")
    listed = _admin_cli(keyserver, keyserver.admin_token, "token", "list")
    assert listed.exit_code == 0, listed.output
    assert "SCOPES" in listed.output
    assert re.search(r"\bci\s+seal,read\b", listed.output)
    assert re.search(r"seal,read,policy-admin,model-admin,token-admin", listed.output)
    denied = _admin_cli(keyserver, token, "key", "rotate", "ghost")
    assert denied.exit_code == 1
    assert "this token lacks scope 'policy-admin', needed to rotate keys" in denied.output
    assert "wrong, revoked or expired" not in denied.output


def test_init_gives_the_first_token_every_scope_and_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["keyserver", "init", str(tmp_path / "ks")])
    assert result.exit_code == 0, result.output
    assert (
        "admin token scopes: all (seal, read, policy-admin, model-admin, token-admin)"
        in result.output
    )
    assert "sealtorch admin token create --name ci --scope seal" in result.output
    store = open_store(sqlite_url(tmp_path / "ks" / "keyserver.db"))
    try:
        (initial,) = store.list_admin_tokens()
        assert initial.scopes == frozenset(ADMIN_SCOPES)
        (record,) = store.iter_audit()
        assert record.details["scopes"] == [scope.value for scope in ADMIN_SCOPES]
    finally:
        store.close()


# -- upgrading a key server from before scopes -----------------------------------------------


def test_tokens_from_before_scopes_keep_working(
    store_url: str,
    clock: FakeClock,
    master: FileMasterKey,
    sim_attester: SimAttester,
    tls_files: TlsFiles,
    tmp_path: Path,
) -> None:
    """A database made by a key server without scopes, with its token, is upgraded by the
    server's start-up migration; the old token still does everything it did."""
    old_token = database_before_scopes(store_url, name="from before scopes")
    store = open_store(store_url, clock=clock, busy_timeout=2.0)
    try:
        store.migrate()
        with (
            running_keyserver(
                tmp_path,
                store=store,
                master=master,
                attester=sim_attester,
                clock=clock,
                tls=tls_files,
            ) as server,
            AdminClient(server.url, token=old_token, ca=server.ca) as old,
        ):
            (info,) = [t for t in old.list_tokens() if t.name == "from before scopes"]
            assert info.scopes == tuple(scope.value for scope in ADMIN_SCOPES)
            old.create_model("m")
            old.set_policy("m", server.sim_policy())
            body = BodyHeader(model_id="m", plaintext_size=1, chunk_size=1024, salt=bytes(32))
            old.wrap(model_id="m", body_digest=body.digest, cek=bytes(32))
            assert old.create_token("ci", scopes=[AdminScope.SEAL]).info.scopes == ("seal",)
            old.audit_head()
    finally:
        store.close()
