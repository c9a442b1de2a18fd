"""Release statements against a real key server on a real Unix socket, from the attacker's side.

The key server signs a statement for every key it grants (release and renew) and for nothing
else; :class:`~sealtorch.client.KeyReleaseClient` accepts a key only with a statement that
verifies under a pinned key server key and is about exactly that key. The attacks: a fake key
source (its own key: unsigned, signed by an unpinned key, with a genuine statement replayed for
another model, version or public key; a genuine key with a statement about another lease or
policy), a man in the middle of a genuine release (a flipped byte, dropped or swapped
statements, another key in the HPKE box, an older renewal's statement), and a key rollover.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from _fixtures.keyserver import KeyServerUnderTest, new_signing_key, running_keyserver
from _fixtures.keystore import refuse_audit_inserts
from sealtorch._crypto import hpke
from sealtorch._demo.fakesource import ANYTHING_GOES, FakeGrant, FakeKeySource
from sealtorch.attestation import Policy, SimAttester
from sealtorch.client import KeyReleaseClient, ReleasedKey
from sealtorch.errors import ConfigError, KeyReleaseError, ReleaseStatementError
from sealtorch.keys import DataKey, generate_key
from sealtorch.keyserver.masterkey import FileMasterKey
from sealtorch.keyserver.signingkey import ReleaseSigningKey
from sealtorch.keyserver.store import Store, open_store, sqlite_url
from sealtorch.protocol import (
    ReleasePublicKey,
    SignedStatement,
    TrustedReleaseKeys,
    b64decode,
    b64encode,
    issue_statement,
    key_release_info,
)

STATEMENT_UNPINNED = "statement_unpinned_key"


class CountingSigner:
    """The server's signing key, counting what it signs."""

    def __init__(self, inner: ReleaseSigningKey) -> None:
        self.inner = inner
        self.signed = 0

    @property
    def key_id(self) -> str:
        return self.inner.key_id

    @property
    def public_key(self) -> ReleasePublicKey:
        return self.inner.public_key

    @property
    def in_process(self) -> bool:
        return True

    def sign(self, message: bytes) -> bytes:
        self.signed += 1
        return self.inner.sign(message)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def attester(tmp_path_factory: pytest.TempPathFactory) -> SimAttester:
    made = SimAttester(role="app", key_path=tmp_path_factory.mktemp("sim") / "sim.key")
    assert made.mrenclave
    return made


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(sqlite_url(tmp_path / "keys.db"))
    opened.migrate()
    yield opened
    opened.close()


@pytest.fixture
def signer() -> CountingSigner:
    return CountingSigner(new_signing_key())


@pytest.fixture
def server(
    tmp_path: Path, store: Store, attester: SimAttester, signer: CountingSigner
) -> Iterator[KeyServerUnderTest]:
    with running_keyserver(
        tmp_path,
        store=store,
        master=FileMasterKey.create(tmp_path / "master.key"),
        attester=attester,
        uds=tmp_path / "ks.sock",
        signing_key=signer,
    ) as running:
        yield running


def _reason(attempt: Callable[[], object]) -> str:
    with pytest.raises(ReleaseStatementError) as caught:
        attempt()
    return caught.value.reason


# -- what the key server signs -----------------------------------------------------------------


def test_every_granted_key_comes_with_a_statement_about_exactly_it(
    server: KeyServerUnderTest, signer: CountingSigner
) -> None:
    dek = generate_key()
    server.add_model("m", key=dek)
    with server.admin() as admin:
        admin.rotate_key("m")
    pins = TrustedReleaseKeys([server.release_key])
    with server.client(session=True) as client:
        for result in (client.release(["m"]), client.renew()):
            assert [k.key_version for k in result.keys] == [1, 2]
            for released in result.keys:
                assert not released.forwarded  # issued to this client's own HPKE key
                statement = pins.verify(released.statement, what="key", source="test")
                assert statement.model_id == "m"
                assert statement.key_version == released.key_version
                assert statement.policy_digest == released.policy_digest
                assert statement.lease_expires_at == released.lease_expires_at
                assert statement.request_id == result.request_id
                assert statement.issued_at == result.server_time
                assert statement.signing_key_id == signer.key_id
                statement.check_key(
                    model_id="m",
                    key_version=released.key_version,
                    policy_digest=released.policy_digest,
                    key=released.key.material,
                    source="test",
                )
            assert result.keys[0].key == dek
    assert signer.signed == 4  # two versions, release and renewal


def test_nothing_is_signed_for_refused_or_denied_keys(
    server: KeyServerUnderTest, signer: CountingSigner, tmp_path: Path
) -> None:
    server.add_model("m", policy=server.sim_policy(sim={"mrenclave": ["44" * 32]}))
    with server.client() as client:
        assert client.release(["m", "ghost"]).keys == ()  # denied: measurement, unknown model
    rogue = SimAttester(role="app", key_path=tmp_path / "rogue.key")
    with server.client(rogue) as client, pytest.raises(KeyReleaseError):
        client.release(["m"])  # refused: untrusted attestation key
    server.add_model("ok")
    refuse_audit_inserts(server.store)
    with server.client() as client, pytest.raises(KeyReleaseError) as caught:
        client.release(["ok"])  # granted, but the audit record cannot be written
    assert caught.value.reasons == ("audit_unavailable",)
    assert signer.signed == 0


def test_a_client_without_a_pinned_key_refuses_to_start(
    server: KeyServerUnderTest, attester: SimAttester
) -> None:
    with pytest.raises(ConfigError, match="--keyserver-pubkey"):
        KeyReleaseClient(server.url, attester=attester)
    with pytest.raises(ConfigError, match="--keyserver-pubkey"):
        KeyReleaseClient(server.url, attester=attester, trusted_release_keys=[])


# -- a fake key source (the host answers on the socket) ----------------------------------------


def _genuine(server: KeyServerUnderTest, model_id: str = "m") -> ReleasedKey:
    """A genuine grant as a watcher of some earlier release could capture its statement (the
    key itself stays with the enclave that got it)."""
    with server.client() as client:
        return client.release([model_id]).keys[-1]


def _fake(
    tmp_path: Path, forge: Callable[[FakeGrant], SignedStatement | None], **options: Any
) -> Any:
    options.setdefault("key", generate_key().material)
    return FakeKeySource(tmp_path / "fake.sock", forge=forge, **options)


def _ask(fake: FakeKeySource, server: KeyServerUnderTest, model: str = "m", **options: Any) -> Any:
    return lambda: _release_from(fake, server, model, **options)


def _release_from(
    fake: FakeKeySource, server: KeyServerUnderTest, model: str, version: int = 1, **options: Any
) -> DataKey:
    options.setdefault("trusted_release_keys", [server.release_key])
    with KeyReleaseClient(fake.url, attester=server.attester, **options) as client:
        return client.data_key(model, version)


def _signed_by(signing_key: ReleaseSigningKey, **changes: Any) -> Callable[[FakeGrant], Any]:
    """A forge that signs a well-formed statement about the fake's own grant (``changes``
    alter what the statement says) with ``signing_key``."""

    def forge(grant: FakeGrant) -> SignedStatement:
        fields: dict[str, Any] = {
            "model_id": grant.model_id,
            "key_version": grant.key_version,
            "key": grant.key,
            "policy_digest": grant.policy_digest,
            "lease_expires_at": grant.lease_expires_at,
            "hpke_suite": grant.hpke_suite,
            "hpke_public_key": grant.hpke_public_key,
            "request_id": grant.request_id,
            "issued_at": grant.issued_at,
        }
        fields.update(changes)
        return issue_statement(signing_key, **fields)

    return forge


def test_a_fake_key_source_without_a_statement_is_refused(
    server: KeyServerUnderTest, tmp_path: Path
) -> None:
    with _fake(tmp_path, lambda grant: None) as fake:
        assert _reason(_ask(fake, server)) == "statement_missing"
        assert fake.keys_sent == 1  # asked, answered, refused


def test_a_statement_signed_by_an_unpinned_key_is_refused(
    server: KeyServerUnderTest, tmp_path: Path
) -> None:
    """Everything right (addressed to the client, lease, request id, commitment) except the
    signer: the host's own key."""
    with _fake(tmp_path, _signed_by(new_signing_key())) as fake:
        assert _reason(_ask(fake, server)) == "statement_unpinned_key"


@pytest.mark.parametrize(
    ("asked", "version", "forwarded", "real_key", "reason"),
    [
        ("other", 1, True, False, "statement_mismatch"),  # replayed for another model
        ("m", 2, True, False, "statement_mismatch"),  # ... for another version
        ("m", 1, True, False, "key_commitment_mismatch"),  # ... for another public key
        # ... with the real key (another enclave's), to a client that takes no forwarded ones
        ("m", 1, False, True, "statement_mismatch"),
    ],
)
def test_a_genuine_statement_replayed_by_a_fake_is_refused(
    server: KeyServerUnderTest,
    tmp_path: Path,
    asked: str,
    version: int,
    forwarded: bool,
    real_key: bool,
    reason: str,
) -> None:
    dek = generate_key()
    server.add_model("m", key=dek)
    genuine = _genuine(server)
    policy = Policy.from_dict(dict(genuine.policy))  # copied, so only the statement is wrong
    key = dek.material if real_key else generate_key().material

    def forge(grant: FakeGrant) -> SignedStatement:
        del grant
        return genuine.statement

    with _fake(tmp_path, forge, policy=policy, key_version=version, key=key) as fake:
        attempt = _ask(fake, server, asked, version=version, accept_forwarded_statements=forwarded)
        assert _reason(attempt) == reason


def test_a_forwarded_statement_with_the_real_key_is_what_a_key_cache_sends(
    server: KeyServerUnderTest, tmp_path: Path
) -> None:
    """The same replay, but with the key the statement commits to, to a client that accepts
    forwarded statements: accepted, and marked forwarded (this is how a key cache passes the key
    server's statement on; only whoever holds the key can do it)."""
    dek = generate_key()
    server.add_model("m", key=dek)
    genuine = _genuine(server)
    policy = Policy.from_dict(dict(genuine.policy))
    pins = [server.release_key]
    with (
        _fake(tmp_path, lambda grant: genuine.statement, policy=policy, key=dek.material) as fake,
        KeyReleaseClient(fake.url, attester=server.attester, trusted_release_keys=pins) as client,
    ):
        (released,) = client.release(["m"]).keys
    assert released.forwarded
    assert released.key == dek


def test_a_genuine_key_with_a_statement_about_another_lease_or_policy_is_refused(
    server: KeyServerUnderTest, signer: CountingSigner, tmp_path: Path
) -> None:
    """Even a source holding the real key and the real signing key cannot hand it out under a
    lease or a policy other than the statement's (e.g. a weaker policy for a cache to
    enforce): the statement must match the grant."""
    dek = generate_key()
    server.add_model("m", key=dek)
    genuine = _genuine(server)
    real_policy = Policy.from_dict(dict(genuine.policy))
    longer = _signed_by(signer.inner, lease_expires_at=genuine.lease_expires_at + timedelta(days=9))
    with _fake(tmp_path, longer, key=dek.material, policy=real_policy) as fake:
        assert _reason(_ask(fake, server)) == "statement_mismatch"
    real_digest = _signed_by(signer.inner, policy_digest=real_policy.digest)
    with _fake(tmp_path, real_digest, key=dek.material, policy=ANYTHING_GOES) as fake:
        assert _reason(_ask(fake, server)) == "statement_mismatch"
    honest = _signed_by(signer.inner)  # the same source, telling the truth: accepted
    with _fake(tmp_path, honest, key=dek.material, policy=real_policy) as fake:
        assert _release_from(fake, server, "m") == dek


# -- a man in the middle of a genuine release ---------------------------------------------------


class _Mitm(httpx.BaseTransport):
    """Forwards to the real server and rewrites each 200 release/renew response with
    ``mutate(body, request_body)``."""

    def __init__(self, socket: str, mutate: Callable[[dict[str, Any], dict[str, Any]], None]):
        self.inner = httpx.HTTPTransport(uds=socket)
        self.mutate = mutate

    def close(self) -> None:
        self.inner.close()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        response.read()
        response.close()
        if not request.url.path.startswith("/v1/keys/") or response.status_code != 200:
            return response
        body = json.loads(response.content)
        self.mutate(body, json.loads(request.content))
        return httpx.Response(200, json=body)


def _through(server: KeyServerUnderTest, mutate: Any, **options: Any) -> KeyReleaseClient:
    socket = server.url.removeprefix("unix://")
    client: KeyReleaseClient = server.client(transport=_Mitm(socket, mutate), **options)
    return client


def _each_statement(change: Callable[[dict[str, Any]], None]) -> Any:
    def mutate(body: dict[str, Any], sent: dict[str, Any]) -> None:
        del sent
        for granted in body["granted"]:
            change(granted)

    return mutate


def _flip(field: str) -> Any:
    def change(granted: dict[str, Any]) -> None:
        data = bytearray(b64decode(granted["statement"][field]))
        data[len(data) // 2] ^= 0x01
        granted["statement"][field] = b64encode(bytes(data))

    return _each_statement(change)


def _swap_statements(body: dict[str, Any], sent: dict[str, Any]) -> None:
    del sent
    first, second = body["granted"]
    first["statement"], second["statement"] = second["statement"], first["statement"]


def _own_key_in_the_box(body: dict[str, Any], sent: dict[str, Any]) -> None:
    """HPKE base mode authenticates no sender: seal another key to the client's public key,
    with the exact info the client expects, next to the genuine statement."""
    suite = sent["hpke"]["suite"]
    recipient = hpke.HpkePublicKey.decode(suite, b64decode(sent["hpke"]["public_key"]))
    nonce = b64decode(sent["nonce"])
    for granted in body["granted"]:
        info = key_release_info(
            model_id=granted["model_id"],
            key_version=granted["key_version"],
            request_id=body["request_id"],
            request_nonce=nonce,
            policy_digest=granted["policy_digest"],
            lease_expires_at=datetime.fromisoformat(granted["lease_expires_at"]),
        )
        sealed = hpke.seal(suite, recipient, generate_key().material, info=info)
        granted["sealed_key"] = b64encode(sealed)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_each_statement(lambda g: g.pop("statement")), "statement_missing"),
        (_flip("payload"), "statement_invalid"),
        (_flip("signature"), "statement_invalid"),
        (
            _each_statement(lambda g: g["statement"].update(key_id="0" * 32)),
            "statement_unpinned_key",
        ),
        (_swap_statements, "statement_mismatch"),
        (_own_key_in_the_box, "key_commitment_mismatch"),
    ],
)
def test_a_man_in_the_middle_cannot_change_a_statement_or_its_key(
    server: KeyServerUnderTest, mutate: Any, reason: str
) -> None:
    server.add_model("m")
    with server.admin() as admin:
        admin.rotate_key("m")
    with _through(server, mutate) as client:
        assert _reason(lambda: client.release(["m"])) == reason


def test_an_older_renewal_statement_is_refused(server: KeyServerUnderTest) -> None:
    """Renewals reuse the session's HPKE key, so a statement from an earlier renewal is
    addressed to this client too; it is about another request and lease, and is refused."""
    server.add_model("m")
    first: dict[str, Any] = {}

    def replay(body: dict[str, Any], sent: dict[str, Any]) -> None:
        if "evidence" in sent:
            return  # the release itself
        if not first:
            first.update(body["granted"][0]["statement"])
        else:
            body["granted"][0]["statement"] = dict(first)

    with _through(server, replay, session=True) as client:
        client.release(["m"])
        client.renew()
        assert _reason(client.renew) == "statement_mismatch"


# -- rollover -----------------------------------------------------------------------------------


def test_a_rollover_accepts_old_and_new_while_both_are_pinned(
    tmp_path: Path, store: Store, attester: SimAttester
) -> None:
    master = FileMasterKey.create(tmp_path / "master.key")
    old, new = new_signing_key(), new_signing_key()
    both = [old.public_key.text, new.public_key.text]
    dek = generate_key()

    def serving(signing_key: ReleaseSigningKey) -> Any:
        return running_keyserver(
            tmp_path,
            store=store,
            master=master,
            attester=attester,
            uds=tmp_path / "ks.sock",
            signing_key=signing_key,
        )

    with serving(old) as server:
        server.add_model("m", key=dek)
        with server.client(trusted_release_keys=both) as client:  # step 2: old + new pinned
            assert client.data_key("m", 1) == dek
        with server.client(trusted_release_keys=[new.public_key.text]) as client:
            assert _reason(lambda: client.data_key("m", 1)) == "statement_unpinned_key"
    (tmp_path / "ks.sock").unlink(missing_ok=True)
    with serving(new) as server:  # step 3: the server switched to the new key
        with server.client(trusted_release_keys=both) as client:
            assert client.data_key("m", 1) == dek
        with server.client(trusted_release_keys=[new.public_key.text]) as client:  # step 4
            assert client.data_key("m", 1) == dek
        with server.client(trusted_release_keys=[old.public_key.text]) as client:
            assert _reason(lambda: client.data_key("m", 1)) == "statement_unpinned_key"


def test_statements_hold_no_key_material(server: KeyServerUnderTest) -> None:
    dek = generate_key()
    server.add_model("m", key=dek)
    seen: list[str] = []

    def keep(body: dict[str, Any], sent: dict[str, Any]) -> None:
        del sent
        seen.append(json.dumps(body))

    with _through(server, keep) as client:
        assert client.data_key("m", 1) == dek
    text = seen[0]
    for form in (dek.material.hex(), b64encode(dek.material)):
        assert form not in text
    payload = b64decode(json.loads(text)["granted"][0]["statement"]["payload"])
    assert dek.material not in payload
