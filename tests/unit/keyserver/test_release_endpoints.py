"""Challenge and release are one endpoint function each (routes/release.py): the app's short
path and the FastAPI routes of the same paths answer every request alike (here the routes are
reached by switching the short path off) and ``keyserver serve``'s HTTP front answers as the app
does, and the OpenAPI document still describes the release body."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from _fixtures.keyserver import new_signing_key
from sealtorch._http_fast import Request, Response
from sealtorch.attestation import SimAttester, make_verifiers
from sealtorch.keyserver._front import KeyServerFront
from sealtorch.keyserver.app import create_app
from sealtorch.keyserver.masterkey import FileMasterKey, FileMasterKeyConfig
from sealtorch.keyserver.settings import KeyServerSettings
from sealtorch.keyserver.store import open_store, sqlite_url

_SUITE = "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    """``(short path, FastAPI routes)``: two apps over one store."""
    store = open_store(sqlite_url(tmp_path / "keys.db"))
    store.migrate()
    master = FileMasterKey.create(tmp_path / "master.key")
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    settings = KeyServerSettings(
        database_url=sqlite_url(tmp_path / "keys.db"),
        master_key=FileMasterKeyConfig(path=tmp_path / "master.key"),
        max_request_bytes=4096,
    )
    made = [
        create_app(
            settings,
            store=store,
            master_key=master,
            signing_key=new_signing_key(),
            verifiers=make_verifiers(sim_trusted_keys=[attester.public_key]),
        )
        for _ in range(2)
    ]
    made[1].fast_routes = {}  # type: ignore[attr-defined]
    with TestClient(made[0]) as fast, TestClient(made[1]) as routed:
        yield fast, routed
    store.close()


_WELL_FORMED = {
    "nonce": _b64(os.urandom(32)),  # never issued
    "evidence": {"type": "sim", "data": _b64(b"not evidence")},
    "hpke": {"suite": _SUITE, "public_key": _b64(os.urandom(32))},
    "models": ["m"],
}

_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("no body", {}),
    ("not JSON", {"content": b"{nonce", "headers": {"content-type": "application/json"}}),
    ("text/plain", {"content": b"{}", "headers": {"content-type": "text/plain"}}),
    ("text/plain again", {"content": b"{}", "headers": {"content-type": "text/plain"}}),
    ("json+ suffix only", {"content": b"{}", "headers": {"content-type": "text/x+json"}}),
    (
        "json with charset",
        {
            "content": json.dumps(_WELL_FORMED),
            "headers": {"content-type": "application/json; charset=utf-8"},
        },
    ),
    (
        "vendor +json",
        {
            "content": json.dumps(_WELL_FORMED),
            "headers": {"content-type": "Application/Vnd.Sealtorch+JSON"},
        },
    ),
    ("empty object", {"json": {}}),
    ("wrong types", {"json": {**_WELL_FORMED, "nonce": 7, "session": "yes"}}),
    ("unknown field", {"json": {**_WELL_FORMED, "extra": 1}}),
    ("too large", {"content": b"x" * 5000, "headers": {"content-type": "application/json"}}),
    ("unissued nonce", {"json": _WELL_FORMED}),
]


@pytest.mark.parametrize(("what", "request_"), _REQUESTS, ids=[r[0] for r in _REQUESTS])
def test_release_answers_alike_both_ways(
    apps: tuple[TestClient, TestClient], what: str, request_: dict[str, Any]
) -> None:
    fast, routed = apps
    answers = [client.post("/v1/keys/release", **request_) for client in (fast, routed)]
    assert answers[0].status_code == answers[1].status_code, what
    assert answers[0].status_code in (400, 403, 413), what
    assert answers[0].json() == answers[1].json(), what
    assert set(answers[0].json()) == {"error"}


def test_challenge_answers_alike_both_ways(apps: tuple[TestClient, TestClient]) -> None:
    answers = [client.post("/v1/attestation/challenge") for client in apps]
    assert [a.status_code for a in answers] == [200, 200]
    first, second = (a.json() for a in answers)
    assert set(first) == set(second)
    assert first["nonce"] != second["nonce"]


def test_the_release_body_is_documented(apps: tuple[TestClient, TestClient]) -> None:
    spec = apps[0].get("/openapi.json").json()
    body = spec["paths"]["/v1/keys/release"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ReleaseRequest"
    schema = spec["components"]["schemas"]["ReleaseRequest"]
    assert {"nonce", "evidence", "hpke"} <= set(schema["required"])
    for nested in ("EvidenceWire", "HpkeKey"):
        assert nested in spec["components"]["schemas"]


@pytest.mark.parametrize(("what", "request_"), _REQUESTS, ids=[r[0] for r in _REQUESTS])
def test_the_http_front_answers_like_the_app(
    apps: tuple[TestClient, TestClient], what: str, request_: dict[str, Any]
) -> None:
    """``keyserver serve``'s front (keyserver/_front.py) runs the same endpoint and error
    mapping: the same status and body as the app (a body over the cap is refused by its HTTP
    server before dispatch, with the same 413 body)."""
    fast, _ = apps
    built = httpx.Request("POST", "http://keys.test/v1/keys/release", **request_)
    body = built.read()
    headers = [(name.lower().encode(), value.encode()) for name, value in built.headers.items()]
    front = KeyServerFront(fast.app)
    cap = 4096

    async def ask() -> Response:
        if len(body) > cap:
            return front.refusal(
                413, "request_too_large", f"request bodies are limited to {cap} bytes"
            )
        request = Request("POST", "/v1/keys/release", headers, body, client=("127.0.0.1", 9))
        outcome = front.dispatch(request)
        return outcome if isinstance(outcome, Response) else await outcome

    answer = asyncio.run(ask())
    expected = fast.post("/v1/keys/release", **request_)
    assert answer.status == expected.status_code, what
    assert json.loads(answer.body) == expected.json(), what
    assert (b"content-type", b"application/json") in answer.headers


@pytest.mark.parametrize(
    ("media_type", "status"),
    [
        ("application/json", 403),
        ("application/json; charset=utf-8", 403),
        ("Application/Vnd.Sealtorch+JSON", 403),
        ("text/plain", 400),
        ("text/x+json", 400),
        ("application/xml", 400),
    ],
)
def test_json_media_types_are_judged_like_fastapi_every_time(
    apps: tuple[TestClient, TestClient], media_type: str, status: int
) -> None:
    """A JSON body reaches the release checks (an unissued nonce: 403); any other media type
    is a 400, the second time as the first (the short path remembers its verdicts)."""
    for client in (*apps, *apps):
        answer = client.post(
            "/v1/keys/release",
            content=json.dumps(_WELL_FORMED),
            headers={"content-type": media_type},
        )
        assert answer.status_code == status, (media_type, answer.text)
