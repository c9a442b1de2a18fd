"""Clients of the key server: attested key release (inside an enclave) and administration.

:class:`KeyReleaseClient` runs the key release protocol (``docs/protocol.md``) from inside a
TEE — challenge → evidence → release → HPKE open — against a key server over HTTPS or a key
cache over a Unix socket (``unix:///run/sealtorch/keycache.sock``); both speak the same
protocol. It is a :class:`~sealtorch.keys.KeyProvider`, so it plugs into loading::

    from sealtorch.attestation import attester_for
    from sealtorch.client import KeyReleaseClient

    with KeyReleaseClient(
        "https://keys.example.com:8443",
        attester=attester_for("gramine"),
        ca="ca.crt",
        trusted_release_keys=["sealtorch-release-key-v1:..."],
    ) as client:
        model = sealtorch.load_model("resnet50.sealed", key=client)

Every granted key is checked before it is returned: its HPKE ``info`` (model, version, request
id, nonce, policy digest, lease) must open, the policy that came with it must hash to the
digest bound into it, and the key server's release statement that came with it must verify
under a pinned key server key (``trusted_release_keys``) and be about exactly this key
(:meth:`KeyReleaseClient._check_statement`); anything else is a
:class:`~sealtorch.errors.ProtocolError` (a :class:`~sealtorch.errors.ReleaseStatementError`
with a reason code for the statement). Denials raise :class:`~sealtorch.errors.KeyReleaseError`
with the server's reason codes. Connection errors and ``503`` answers are retried with
jittered exponential backoff (a fresh challenge each time); denials never are.

Failover: ``url`` may name several key servers (a sequence, or one string with commas) — e.g.
replicas on one PostgreSQL. A connection failure or a ``503`` moves to the next one at once;
when every one failed, the client backs off (jittered) and goes round again, up to ``retries``
rounds (and for at least ``wait`` seconds when given: ``sealtorch serve --keys-wait``). The one
that answered last is tried first next time. A DNS name with several addresses needs no list:
each connection tries the name's addresses in turn (``socket.create_connection``), so a refused
connection moves to the next address (a ``503`` from one address does not: list the replicas).
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar

import httpx

from sealtorch._crypto import hpke
from sealtorch._crypto.tls import untrusted_server_message
from sealtorch.attestation.binding import report_data_for
from sealtorch.attestation.evidence import EvidenceProvider
from sealtorch.client._http import (
    CA_OPTIONS,
    RETRYABLE,
    error_from,
    make_http_client,
    parse_response,
    policy_digest,
    split_urls,
)
from sealtorch.errors import (
    AttestationError,
    IntegrityError,
    KeyReleaseError,
    KeySourceUnreachableError,
    ProtocolError,
    ReleaseStatementError,
)
from sealtorch.keys import DataKey
from sealtorch.protocol import (
    API_PREFIX,
    DEFAULT_HPKE_SUITE,
    ChallengeResponse,
    GrantedKey,
    ReleasePublicKey,
    ReleaseRequest,
    ReleaseResponse,
    ReleaseStatement,
    RenewRequest,
    SignedStatement,
    TrustedReleaseKeys,
    key_release_info,
)
from sealtorch.protocol.statement import STATEMENT_MISMATCH, STATEMENT_MISSING

__all__ = ["Challenge", "Denial", "KeyReleaseClient", "ReleaseResult", "ReleasedKey", "Session"]

_log = logging.getLogger(__name__)
_R = TypeVar("_R")
#: The longest pause between two rounds over the key sources (before jitter).
_MAX_DELAY = 5.0


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """A fresh challenge from the server (``POST /v1/attestation/challenge``)."""

    nonce: bytes = field(repr=False)
    expires_at: datetime
    hpke_suites: tuple[str, ...]
    evidence_types: tuple[str, ...]


@dataclass(frozen=True)
class ReleasedKey:
    """One released data key, verified, with its lease, the policy that governs it and the key
    server's signed release statement about it (verified; a key cache forwards it)."""

    model_id: str
    key_version: int
    key: DataKey
    lease_expires_at: datetime
    policy: Mapping[str, Any]
    policy_version: int
    policy_digest: str
    statement: SignedStatement = field(repr=False)
    #: True when the key server released the key to another enclave (a key cache) that
    #: forwarded it with the key server's statement; False when it released it to this client.
    forwarded: bool = False


@dataclass(frozen=True)
class Denial:
    """A model the server did not release, with its stable reason codes."""

    model_id: str
    reasons: tuple[str, ...]
    message: str


@dataclass(frozen=True)
class Session:
    """A renewal session: lets the same enclave renew leases without a new quote."""

    token: str = field(repr=False)
    expires_at: datetime

    def __repr__(self) -> str:
        return f"Session(<redacted>, expires_at={self.expires_at.isoformat()})"


@dataclass(frozen=True)
class ReleaseResult:
    """The verified outcome of a release or renewal."""

    request_id: str
    server_time: datetime
    keys: tuple[ReleasedKey, ...]
    denied: tuple[Denial, ...]
    session: Session | None = None
    #: Who answered (the client's URL), for messages.
    source: str = "the key server"

    def key(self, model_id: str, key_version: int | None = None) -> DataKey:
        """The key of ``model_id`` (newest released version by default), or KeyReleaseError."""
        for denial in self.denied:
            if denial.model_id == model_id:
                raise KeyReleaseError(
                    f"{self.source} denied model {model_id!r}: {denial.message}",
                    reasons=denial.reasons,
                )
        matches = [
            k
            for k in self.keys
            if k.model_id == model_id and (key_version is None or k.key_version == key_version)
        ]
        if not matches:
            what = f"version {key_version} of " if key_version is not None else ""
            raise KeyReleaseError(
                f"{self.source} did not release {what}model {model_id!r} (no such active key "
                "version: it may be revoked, or the model may not exist)",
                reasons=("key_version_unavailable",),
            )
        return max(matches, key=lambda k: k.key_version).key

    def raise_for_denials(self) -> ReleaseResult:
        """Self, or KeyReleaseError naming every denied model and reason."""
        if self.denied:
            reasons = tuple(dict.fromkeys(r for d in self.denied for r in d.reasons))
            names = ", ".join(f"{d.model_id} ({', '.join(d.reasons)})" for d in self.denied)
            raise KeyReleaseError(f"{self.source} denied: {names}", reasons=reasons)
        return self


# -- key release -------------------------------------------------------------------------------


@dataclass
class _CachedKey:
    key: ReleasedKey
    expires_monotonic: float


class KeyReleaseClient:
    """Attested key release from inside an enclave (see the module docstring).

    ``url``: ``https://HOST:PORT`` (a key server) or ``unix:///PATH`` (a key cache).
    ``attester``: the enclave's evidence provider (``attester_for("gramine"|"tdx"|"sim")``).
    ``ca``: a CA file to trust for HTTPS (default: the system trust store).
    ``suite``: the HPKE suite (default X25519; ``MLKEM768-X25519/...`` for post-quantum).
    ``session``: ask for a renewal session with each release (then :meth:`renew` works).
    ``remember``: keep released keys in memory while their leases last, so that
    :meth:`data_key` for several files of one model attests once; ``False`` keeps no copy (the
    caller holds what :meth:`release` returns). :meth:`forget` drops the copies at any time.
    ``trusted_release_keys``: the key server release-signing public key(s) this client pins
    (``sealtorch-release-key-v1:...``; two during a rollover). Required: a client without one
    refuses to start, since nothing could prove where a key came from.
    ``accept_forwarded_statements``: accept a key whose statement the key server issued to
    another enclave (a key cache that forwards it); ``False`` for a client that must talk to
    the key server itself (the key cache's own client).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        attester: EvidenceProvider,
        ca: str | os.PathLike[str] | None = None,
        suite: str = DEFAULT_HPKE_SUITE,
        session: bool = False,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.25,
        transport: httpx.BaseTransport | None = None,
        allow_insecure_http: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        remember: bool = True,
        trusted_release_keys: TrustedReleaseKeys | Iterable[ReleasePublicKey | str] | None = None,
        accept_forwarded_statements: bool = True,
        wait: float | None = None,
    ) -> None:
        hpke.get_suite(suite)  # ProtocolError for an unknown suite, now rather than later
        self._trusted = (
            trusted_release_keys
            if isinstance(trusted_release_keys, TrustedReleaseKeys)
            else TrustedReleaseKeys(trusted_release_keys or ())  # ConfigError when empty
        )
        self._accept_forwarded = accept_forwarded_statements
        #: Every key source this client may use, in order of preference.
        self.urls: tuple[str, ...] = split_urls(url)
        self._current = 0
        self._wait = wait
        self._attester = attester
        self._suite = suite
        self._want_session = session
        self._retries = max(0, retries)
        self._backoff = backoff
        self._sleep = sleep
        self._clients = [
            make_http_client(
                one,
                ca=ca,
                timeout=timeout,
                transport=transport,
                allow_insecure_http=allow_insecure_http,
            )
            for one in self.urls
        ]
        self._lock = threading.Lock()
        self._remember_keys = remember
        self._cache: dict[tuple[str, int], _CachedKey] = {}
        self._session: Session | None = None
        self._session_key: hpke.HpkePrivateKey | None = None

    @property
    def url(self) -> str:
        """The key source that answered last (the first one before any answer)."""
        return self.urls[self._current]

    def __repr__(self) -> str:
        return (
            f"KeyReleaseClient({', '.join(self.urls)!r}, suite={self._suite!r}, "
            f"release_keys={list(self._trusted.key_ids)!r})"
        )

    @property
    def trusted_release_keys(self) -> TrustedReleaseKeys:
        """The key server release-signing keys this client pins."""
        return self._trusted

    @property
    def attester(self) -> EvidenceProvider:
        """The evidence provider this client attests with."""
        return self._attester

    @property
    def remembered(self) -> frozenset[tuple[str, int]]:
        """The ``(model id, key version)`` pairs whose keys this client holds in memory (never
        the keys): empty after :meth:`forget`, and always with ``remember=False``."""
        with self._lock:
            return frozenset(self._cache)

    def __enter__(self) -> KeyReleaseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def forget(self) -> None:
        """Drop every released key this client remembers (the session stays)."""
        with self._lock:
            self._cache.clear()

    def close(self) -> None:
        """Close connections and forget every key and session held in memory."""
        with self._lock:
            self._cache.clear()
            self._session = None
            self._session_key = None
        for http in self._clients:
            http.close()

    @property
    def session(self) -> Session | None:
        """The current renewal session, if the last release created one."""
        return self._session

    # -- protocol steps --

    def _with_retries(self, what: str, attempt: Callable[[httpx.Client], _R]) -> _R:
        """``attempt(http)`` on the key sources in turn (see the module docstring)."""
        deadline = None if self._wait is None else time.monotonic() + self._wait
        started = time.monotonic()
        number = 0
        while True:
            failures: list[str] = []
            last_refusal: KeyReleaseError | None = None
            start = self._current
            for step in range(len(self.urls)):
                index = (start + step) % len(self.urls)
                url = self.urls[index]
                try:
                    result = attempt(self._clients[index])
                except RETRYABLE as exc:
                    untrusted = untrusted_server_message(
                        exc,
                        server=f"the key cache or key server at {url}",
                        ca_option=CA_OPTIONS,
                    )
                    if untrusted is not None:  # retrying cannot help
                        raise KeySourceUnreachableError(untrusted) from exc
                    failures.append(f"{url}: {type(exc).__name__}")
                except KeyReleaseError as exc:
                    if exc.status_code != 503:
                        raise
                    last_refusal = exc
                    failures.append(f"{url}: HTTP 503 ({', '.join(exc.reasons) or 'unavailable'})")
                else:
                    self._current = index
                    return result
                if len(self.urls) > 1:
                    _log.warning("%s: %s; trying the next key source", what, failures[-1])
            now = time.monotonic()
            if number >= self._retries and (deadline is None or now >= deadline):
                if last_refusal is not None and len(self.urls) == 1:
                    raise last_refusal
                waited = f" over {now - started:.0f} s" if self._wait else ""
                raise KeySourceUnreachableError(
                    f"cannot reach a key source for {what} after {number + 1} round(s){waited} "
                    f"({'; '.join(failures)}); check the URLs, the network and that the "
                    "services run",
                    status_code=503 if last_refusal is not None else None,
                )
            delay = min(self._backoff * (2**number), _MAX_DELAY) * (0.5 + random.random())  # noqa: S311
            if deadline is not None and number >= self._retries:
                delay = min(delay, max(0.0, deadline - now))
            log = _log.warning if self._wait else _log.info
            log(
                "%s: no key source answered (%s); retrying in %.2f s%s",
                what,
                "; ".join(failures),
                delay,
                f" (waiting up to {self._wait:.0f} s)" if self._wait else "",
            )
            self._sleep(delay)
            number += 1

    def challenge(self, http: httpx.Client | None = None) -> Challenge:
        """Ask for a fresh nonce (one attempt at the current key source; :meth:`release`
        retries the whole flow)."""
        http = http or self._clients[self._current]
        response = http.post(f"{API_PREFIX}/attestation/challenge", json={})
        if response.status_code != 200:
            raise error_from(response, "the challenge")
        body = parse_response(ChallengeResponse, response, "challenge")
        return Challenge(
            nonce=body.nonce,
            expires_at=body.expires_at,
            hpke_suites=body.hpke_suites,
            evidence_types=body.evidence_types,
        )

    def release(
        self, models: Sequence[str] | None = None, *, session: bool | None = None
    ) -> ReleaseResult:
        """Attest and obtain the keys of ``models`` (``None``: every model this enclave may
        have). Denied models are in :attr:`ReleaseResult.denied`; a refused request (bad
        evidence, binding, nonce) raises :class:`KeyReleaseError`."""
        wanted = tuple(models) if models is not None else None
        ask_session = self._want_session if session is None else session
        return self._with_retries(
            "key release", lambda http: self._release_once(http, wanted, ask_session)
        )

    def _release_once(
        self, http: httpx.Client, models: tuple[str, ...] | None, ask_session: bool
    ) -> ReleaseResult:
        challenge = self.challenge(http)
        if self._suite not in challenge.hpke_suites:
            raise KeyReleaseError(
                f"the server does not offer HPKE suite {self._suite}; it offers "
                + ", ".join(challenge.hpke_suites)
            )
        private_key = hpke.generate_private_key(self._suite)
        public_key = private_key.public_key().encode()
        try:
            evidence = self._attester.evidence(
                report_data_for(
                    nonce=challenge.nonce, hpke_suite=self._suite, public_key=public_key
                )
            )
        except AttestationError as exc:
            raise KeyReleaseError(f"the enclave could not produce evidence: {exc}") from exc
        request = ReleaseRequest.model_validate(
            {
                "nonce": challenge.nonce,
                "evidence": {"type": evidence.type, "data": evidence.data},
                "hpke": {"suite": self._suite, "public_key": public_key},
                "models": models,
                "session": ask_session,
            }
        )
        response = http.post(
            f"{API_PREFIX}/keys/release",
            content=request.model_dump_json(),
            headers={"content-type": "application/json"},
        )
        if response.status_code != 200:
            raise error_from(response, "the key release")
        body = parse_response(ReleaseResponse, response, "release")
        result = self._open(
            body,
            private_key=private_key,
            public_key=public_key,
            request_nonce=challenge.nonce,
            requested=models,
        )
        with self._lock:
            if result.session is not None:
                self._session = result.session
                self._session_key = private_key
            self._remember(result)
        return result

    def renew(self, models: Sequence[str] | None = None) -> ReleaseResult:
        """Renew leases with the session of the last release (no new quote)."""
        with self._lock:
            session, private_key = self._session, self._session_key
        if session is None or private_key is None:
            raise KeyReleaseError(
                "no renewal session: release with session=True first", reasons=("no_session",)
            )
        wanted = tuple(models) if models is not None else None

        def attempt(http: httpx.Client) -> ReleaseResult:
            nonce = secrets.token_bytes(32)
            request = RenewRequest(nonce=nonce, models=wanted)
            response = http.post(
                f"{API_PREFIX}/keys/renew",
                content=request.model_dump_json(),
                headers={
                    "content-type": "application/json",
                    "authorization": f"Bearer {session.token}",
                },
            )
            if response.status_code != 200:
                raise error_from(response, "the lease renewal")
            body = parse_response(ReleaseResponse, response, "renew")
            return self._open(
                body,
                private_key=private_key,
                public_key=private_key.public_key().encode(),
                request_nonce=nonce,
                requested=wanted,
            )

        result = self._with_retries("lease renewal", attempt)
        with self._lock:
            self._remember(result)
        return result

    def _open(
        self,
        body: ReleaseResponse,
        *,
        private_key: hpke.HpkePrivateKey,
        public_key: bytes,
        request_nonce: bytes,
        requested: tuple[str, ...] | None,
    ) -> ReleaseResult:
        seen: set[tuple[str, int]] = set()
        keys = []
        for granted in body.granted:
            pair = (granted.model_id, granted.key_version)
            if pair in seen:
                raise ProtocolError(f"the server released {pair} twice in one response")
            seen.add(pair)
            if requested is not None and granted.model_id not in requested:
                raise ProtocolError(f"the server released model {granted.model_id!r} unasked")
            released = self._open_one(granted, body.request_id, request_nonce, private_key)
            keys.append(self._check_statement(released, granted, body.request_id, public_key))
        denied = tuple(
            Denial(model_id=d.model_id, reasons=d.reasons, message=d.message) for d in body.denied
        )
        session = (
            Session(token=body.session.token, expires_at=body.session.expires_at)
            if body.session is not None
            else None
        )
        return ReleaseResult(
            request_id=body.request_id,
            server_time=body.server_time,
            keys=tuple(keys),
            denied=denied,
            session=session,
            source=self.url,
        )

    def _open_one(
        self,
        granted: GrantedKey,
        request_id: str,
        request_nonce: bytes,
        private_key: hpke.HpkePrivateKey,
    ) -> ReleasedKey:
        if policy_digest(granted.policy) != granted.policy_digest:
            raise ProtocolError(
                f"the policy sent with {granted.model_id!r} v{granted.key_version} does not "
                "match its digest: the response was tampered with"
            )
        info = key_release_info(
            model_id=granted.model_id,
            key_version=granted.key_version,
            request_id=request_id,
            request_nonce=request_nonce,
            policy_digest=granted.policy_digest,
            lease_expires_at=granted.lease_expires_at,
        )
        try:
            material = hpke.open(self._suite, private_key, granted.sealed_key, info=info)
        except IntegrityError as exc:
            raise ProtocolError(
                f"the key released for {granted.model_id!r} v{granted.key_version} failed its "
                "binding check (model, version, request, nonce, policy or lease was altered, "
                "or it was sealed to another key)"
            ) from exc
        if len(material) != 32:
            raise ProtocolError("a released data key is not 32 bytes")
        if granted.statement is None:
            raise ReleaseStatementError(
                STATEMENT_MISSING,
                f"{self.url} sent the key of {granted.model_id!r} v{granted.key_version} without "
                "the key server's release statement, so nothing proves where it came from; the "
                "key is refused: check that --keys names your key cache or key server (and "
                "that both run a sealtorch version that signs release statements)",
            )
        return ReleasedKey(
            model_id=granted.model_id,
            key_version=granted.key_version,
            key=DataKey(material),
            lease_expires_at=granted.lease_expires_at,
            policy=granted.policy,
            policy_version=granted.policy_version,
            policy_digest=granted.policy_digest,
            statement=granted.statement,
        )

    def _check_statement(
        self, released: ReleasedKey, granted: GrantedKey, request_id: str, public_key: bytes
    ) -> ReleasedKey:
        """``released``, if the key server's statement proves its origin; else
        :class:`ReleaseStatementError`.

        Always: the statement verifies under a pinned key, and names this model, version and
        policy digest and commits to exactly this key. Addressed to this client's HPKE key
        (direct from the key server): also its suite, lease end and request id must be the
        grant's. Addressed to another key (forwarded by a key cache): accepted only with
        ``accept_forwarded_statements`` (``docs/protocol.md``, what each party checks).
        """
        what = f"the key of {released.model_id!r} v{released.key_version}"
        statement = self._trusted.verify(released.statement, what=what, source=self.url)
        statement.check_key(
            model_id=released.model_id,
            key_version=released.key_version,
            policy_digest=released.policy_digest,
            key=released.key.material,
            source=self.url,
        )
        if statement.addressed_to(hpke_suite=self._suite, hpke_public_key=public_key):
            _check_direct(statement, granted, request_id, what=what, source=self.url)
            return released
        if not self._accept_forwarded:
            raise ReleaseStatementError(
                STATEMENT_MISMATCH,
                f"{self.url} sent {what} with a key server statement issued to another HPKE "
                "key: a statement replayed from another release (this client talks to the key "
                "server itself); the key is refused",
            )
        return replace(released, forwarded=True)

    def _remember(self, result: ReleaseResult) -> None:
        if not self._remember_keys:
            return
        now = time.monotonic()
        for released in result.keys:
            remaining = (released.lease_expires_at - result.server_time).total_seconds()
            self._cache[(released.model_id, released.key_version)] = _CachedKey(
                released, now + max(0.0, remaining)
            )

    # -- KeyProvider --

    def data_key(self, model_id: str, key_version: int) -> DataKey:
        """The data key of ``model_id`` at ``key_version`` (``KeyProvider``): from memory while
        its lease lasts, else by attested release. Denials raise :class:`KeyReleaseError`."""
        with self._lock:
            cached = self._cache.get((model_id, key_version))
            if cached is not None and time.monotonic() < cached.expires_monotonic:
                return cached.key.key
        return self.release([model_id]).key(model_id, key_version)


def _check_direct(
    statement: ReleaseStatement, granted: GrantedKey, request_id: str, *, what: str, source: str
) -> None:
    """A statement the key server issued to this client must be about this very grant."""
    for name, theirs, ours in (
        ("lease end", statement.lease_expires_at, granted.lease_expires_at),
        ("request id", statement.request_id, request_id),
    ):
        if theirs != ours:
            raise ReleaseStatementError(
                STATEMENT_MISMATCH,
                f"{source} sent {what} with a key server statement about another {name} than "
                "the grant's: a statement replayed from another release, or an altered "
                "grant; the key is refused",
            )


# -- administration ----------------------------------------------------------------------------
