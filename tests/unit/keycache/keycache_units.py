"""Builders for key cache unit tests: a simulated host's attesters, held keys and release
results built directly (no key server; each key with a release statement signed by
:data:`SIGNER`, whose public key :data:`RELEASE_KEY` the cache pins), and a stand-in upstream
for the refresh schedule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from _fixtures.clock import FakeClock
from _fixtures.keyserver import new_signing_key
from sealtorch._crypto import hpke
from sealtorch.attestation import Policy, SimAttester
from sealtorch.client import ReleasedKey, ReleaseResult, Session
from sealtorch.keycache.holdings import HeldKey
from sealtorch.keycache.upstream import Refresh
from sealtorch.keys import DataKey, generate_key
from sealtorch.keyserver.signingkey import ReleaseSigningKey
from sealtorch.protocol import DEFAULT_HPKE_SUITE, SignedStatement, issue_statement

#: The key server's release-signing key in these tests, and its public key (the cache's pin).
SIGNER = new_signing_key()
RELEASE_KEY = SIGNER.public_key.text


@dataclass
class Host:
    key_path: Path
    app: SimAttester
    cache: SimAttester
    serve: SimAttester

    def policy(self, *roles: str, **extra: Any) -> Policy:
        chosen = roles or ("cache", "app")
        document: dict[str, Any] = {
            "allowed_tees": ["sim"],
            "sim": {"mrenclave": [getattr(self, r).mrenclave for r in chosen]},
            **extra,
        }
        return Policy.from_dict(document)


def make_host(directory: Path) -> Host:
    key = directory / "sim.key"
    made = Host(
        key_path=key,
        app=SimAttester(role="app", key_path=key),
        cache=SimAttester(role="keycache", key_path=key),
        serve=SimAttester(role="serve", key_path=key),
    )
    for attester in (made.app, made.cache, made.serve):
        assert attester.mrenclave
    return made


def statement(
    model_id: str,
    version: int,
    key: DataKey,
    policy_digest: str,
    *,
    lease_end: datetime,
    signer: ReleaseSigningKey = SIGNER,
) -> SignedStatement:
    """The key server's statement about one key, issued to some cache's HPKE key."""
    return issue_statement(
        signer,
        model_id=model_id,
        key_version=version,
        key=key.material,
        policy_digest=policy_digest,
        lease_expires_at=lease_end,
        hpke_suite=DEFAULT_HPKE_SUITE,
        hpke_public_key=hpke.generate_private_key().public_key().encode(),
        request_id="r" * 32,
        issued_at=lease_end - timedelta(hours=1),
    )


def held_key(
    model_id: str,
    policy: Policy,
    *,
    now: datetime,
    version: int = 1,
    lease: timedelta = timedelta(minutes=10),
    key: DataKey | None = None,
    signer: ReleaseSigningKey = SIGNER,
) -> HeldKey:
    key = key or generate_key()
    return HeldKey(
        model_id=model_id,
        key_version=version,
        key=key,
        expires_at=now + lease,
        received_at=now,
        policy=policy,
        policy_document=policy.to_dict(),
        policy_version=1,
        policy_digest=policy.digest,
        statement=statement(
            model_id, version, key, policy.digest, lease_end=now + lease, signer=signer
        ),
    )


def released(
    model_id: str,
    policy: Policy,
    *,
    expires: datetime,
    version: int = 1,
    key: DataKey | None = None,
    document: dict[str, Any] | None = None,
) -> ReleasedKey:
    key = key or generate_key()
    return ReleasedKey(
        model_id=model_id,
        key_version=version,
        key=key,
        lease_expires_at=expires,
        policy=document if document is not None else policy.to_dict(),
        policy_version=1,
        policy_digest=policy.digest,
        statement=statement(model_id, version, key, policy.digest, lease_end=expires),
    )


@dataclass
class StubUpstream:
    """Stands in for :class:`~sealtorch.keycache.upstream.Upstream` (the network seam): each
    ``refresh()`` returns or raises the next scripted outcome."""

    clock: FakeClock
    outcomes: list[Callable[[], ReleaseResult] | BaseException] = field(default_factory=list)
    url: str = "https://keys.test:8443"
    session_expires_at: datetime | None = None
    calls: int = 0
    closed: bool = False

    def refresh(self) -> Refresh:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        result = outcome()
        if result.session is not None:
            self.session_expires_at = result.session.expires_at
        return Refresh(result, how="release", received_at=self.clock())

    def close(self) -> None:
        self.closed = True


def result_with(
    clock: FakeClock,
    keys: list[ReleasedKey],
    *,
    denied: tuple[Any, ...] = (),
    session: bool = True,
    server_offset: timedelta = timedelta(0),
) -> Callable[[], ReleaseResult]:
    """A verified release result as the client returns it (``server_offset``: the key
    server's clock minus ours)."""

    def build() -> ReleaseResult:
        server_now = clock() + server_offset
        return ReleaseResult(
            request_id="r" * 32,
            server_time=server_now,
            keys=tuple(keys),
            denied=denied,
            session=Session(token="sts_" + "t" * 40, expires_at=server_now + timedelta(hours=4))
            if session
            else None,
        )

    return build
