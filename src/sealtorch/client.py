"""Clients of the key server: attested key release (inside an enclave) and administration.

:class:`KeyReleaseClient` runs the key release protocol (``docs/protocol.md``) from inside a
TEE — challenge → evidence → release → HPKE open — against a key server over HTTPS or a key
cache over a Unix socket (``unix:///run/sealtorch/keycache.sock``); both speak the same
protocol. It is a :class:`~sealtorch.keys.KeyProvider`, so it plugs into loading::

    from sealtorch.attestation import attester_for
    from sealtorch.client import KeyReleaseClient

    with KeyReleaseClient(
        "https://keys.example.com:8443", attester=attester_for("gramine"), ca="ca.crt"
    ) as client:
        model = sealtorch.load_model("resnet50.sealed", key=client)

Every granted key is checked before it is returned: its HPKE ``info`` (model, version, request
id, nonce, policy digest, lease) must open, and the policy that came with it must hash to the
digest bound into it; anything else is a :class:`~sealtorch.errors.ProtocolError`. Denials raise
:class:`~sealtorch.errors.KeyReleaseError` with the server's reason codes. Connection errors are
retried with jittered exponential backoff (a fresh challenge each time); denials never are.

:class:`AdminClient` is the admin API (``sealtorch admin ...``), and :class:`KeyServerWrapper`
seals files with a content key wrapped *by the key server* (``sealtorch encrypt --keyserver``):
the data key never leaves the server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import quote, urlsplit

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from sealtorch._crypto import hpke
from sealtorch._crypto.tls import untrusted_server_message
from sealtorch._uds import UnixSocketTransport
from sealtorch.attestation.binding import report_data_for
from sealtorch.attestation.evidence import EvidenceProvider
from sealtorch.errors import (
    AttestationError,
    ConfigError,
    Error,
    IntegrityError,
    KeyReleaseError,
    KeySourceUnreachableError,
    ProtocolError,
)
from sealtorch.keys import DataKey
from sealtorch.protocol import (
    API_PREFIX,
    DEFAULT_HPKE_SUITE,
    ChallengeResponse,
    ErrorBody,
    GrantedKey,
    ReleaseRequest,
    ReleaseResponse,
    RenewRequest,
    key_release_info,
)

if TYPE_CHECKING:
    from sealtorch.keyserver.audit import AuditHead, AuditRecord
    from sealtorch.keyserver.schemas import (
        CreatedModel,
        CreatedToken,
        KeyVersionInfo,
        ModelDetail,
        ModelInfo,
        PolicyInfo,
        TokenInfo,
    )
    from sealtorch.sealed.header import Header, KeyBlock

__all__ = [
    "AdminClient",
    "AdminError",
    "Challenge",
    "Denial",
    "KeyReleaseClient",
    "KeyServerWrapper",
    "ReleaseResult",
    "ReleasedKey",
    "Session",
]

_log = logging.getLogger(__name__)

_T = TypeVar("_T", bound=BaseModel)
_R = TypeVar("_R")
_UNIX: Final = "unix://"
_UNIX_BASE: Final = "http://sealtorch.local"
_MAX_RESPONSE: Final = 4 * 1024 * 1024
#: Network failures worth retrying: nothing was decided, or the connection broke.
_RETRYABLE = (httpx.TransportError,)
#: How each caller passes the CA of a key source (in messages about an untrusted certificate).
_CA_OPTIONS: Final = "--ca (`sealtorch serve`: --keys-ca; Python: ca=)"


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
    """One released data key, verified, with its lease and the policy that governs it."""

    model_id: str
    key_version: int
    key: DataKey
    lease_expires_at: datetime
    policy: Mapping[str, Any]
    policy_version: int
    policy_digest: str


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


# -- transport ---------------------------------------------------------------------------------


def _client(
    url: str,
    *,
    ca: str | os.PathLike[str] | None,
    timeout: float,
    transport: httpx.BaseTransport | None,
    allow_insecure_http: bool,
) -> httpx.Client:
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=4)
    if url.startswith(_UNIX):
        path = url[len(_UNIX) :]
        if not path.startswith("/"):
            raise ConfigError(f"{url!r}: a Unix socket URL is unix:///absolute/path")
        return httpx.Client(
            base_url=_UNIX_BASE,
            transport=transport or UnixSocketTransport(path),
            timeout=timeout,
            limits=limits,
        )
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(
            f"{url!r} is not a key server URL: use https://HOST:PORT, or unix:///PATH for a "
            "local key cache"
        )
    if parts.scheme == "http" and not allow_insecure_http:
        raise ConfigError(
            f"{url!r} uses plain HTTP; key servers are reached over HTTPS (pass "
            "allow_insecure_http=True only for tests on loopback)"
        )
    verify: Any = True
    if ca is not None:
        from sealtorch._crypto.tls import client_ssl_context

        verify = client_ssl_context(ca_path=ca)
    return httpx.Client(
        base_url=url.rstrip("/"),
        verify=verify,
        transport=transport,
        timeout=timeout,
        limits=limits,
    )


def _error_from(response: httpx.Response, what: str) -> KeyReleaseError:
    reasons: tuple[str, ...] = ()
    message = f"{what} failed with HTTP {response.status_code}"
    try:
        body = ErrorBody.model_validate_json(response.content)
    except ValidationError:
        pass
    else:
        reasons = body.error.reasons or (body.error.code,)
        message = f"{what} refused ({body.error.code}): {body.error.message}"
    return KeyReleaseError(message, reasons=reasons, status_code=response.status_code)


def _parse(model: type[_T], response: httpx.Response, what: str) -> _T:
    if len(response.content) > _MAX_RESPONSE:
        raise ProtocolError(f"the {what} response is larger than {_MAX_RESPONSE} bytes")
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise ProtocolError(
            f"the server's {what} response does not follow the protocol "
            f"({exc.error_count()} schema error(s))"
        ) from exc


def _policy_digest(policy: Mapping[str, Any]) -> str:
    canonical = json.dumps(policy, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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
    """

    def __init__(
        self,
        url: str,
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
    ) -> None:
        hpke.get_suite(suite)  # ProtocolError for an unknown suite, now rather than later
        self.url = url
        self._attester = attester
        self._suite = suite
        self._want_session = session
        self._retries = max(0, retries)
        self._backoff = backoff
        self._sleep = sleep
        self._http = _client(
            url,
            ca=ca,
            timeout=timeout,
            transport=transport,
            allow_insecure_http=allow_insecure_http,
        )
        self._lock = threading.Lock()
        self._remember_keys = remember
        self._cache: dict[tuple[str, int], _CachedKey] = {}
        self._session: Session | None = None
        self._session_key: hpke.HpkePrivateKey | None = None

    def __repr__(self) -> str:
        return f"KeyReleaseClient({self.url!r}, suite={self._suite!r})"

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
        self._http.close()

    @property
    def session(self) -> Session | None:
        """The current renewal session, if the last release created one."""
        return self._session

    # -- protocol steps --

    def _with_retries(self, what: str, attempt: Callable[[], _R]) -> _R:
        for number in range(self._retries + 1):
            try:
                return attempt()
            except _RETRYABLE as exc:
                untrusted = untrusted_server_message(
                    exc,
                    server=f"the key cache or key server at {self.url}",
                    ca_option=_CA_OPTIONS,
                )
                if untrusted is not None:  # retrying cannot help
                    raise KeySourceUnreachableError(untrusted) from exc
                if number == self._retries:
                    raise KeySourceUnreachableError(
                        f"cannot reach {self.url} (key cache or key server) for {what} "
                        f"({type(exc).__name__}) after {number + 1} attempt(s); check the URL, "
                        "the network and that the service runs"
                    ) from exc
                delay = self._backoff * (2**number) * (0.5 + random.random())  # noqa: S311
                _log.info("%s: %s; retrying in %.2f s", what, type(exc).__name__, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def challenge(self) -> Challenge:
        """Ask for a fresh nonce (one attempt; :meth:`release` retries the whole flow)."""
        response = self._http.post(f"{API_PREFIX}/attestation/challenge", json={})
        if response.status_code != 200:
            raise _error_from(response, "the challenge")
        body = _parse(ChallengeResponse, response, "challenge")
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
        return self._with_retries("key release", lambda: self._release_once(wanted, ask_session))

    def _release_once(self, models: tuple[str, ...] | None, ask_session: bool) -> ReleaseResult:
        challenge = self.challenge()
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
        response = self._http.post(
            f"{API_PREFIX}/keys/release",
            content=request.model_dump_json(),
            headers={"content-type": "application/json"},
        )
        if response.status_code != 200:
            raise _error_from(response, "the key release")
        body = _parse(ReleaseResponse, response, "release")
        result = self._open(
            body, private_key=private_key, request_nonce=challenge.nonce, requested=models
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

        def attempt() -> ReleaseResult:
            nonce = secrets.token_bytes(32)
            request = RenewRequest(nonce=nonce, models=wanted)
            response = self._http.post(
                f"{API_PREFIX}/keys/renew",
                content=request.model_dump_json(),
                headers={
                    "content-type": "application/json",
                    "authorization": f"Bearer {session.token}",
                },
            )
            if response.status_code != 200:
                raise _error_from(response, "the lease renewal")
            body = _parse(ReleaseResponse, response, "renew")
            return self._open(body, private_key=private_key, request_nonce=nonce, requested=wanted)

        result = self._with_retries("lease renewal", attempt)
        with self._lock:
            self._remember(result)
        return result

    def _open(
        self,
        body: ReleaseResponse,
        *,
        private_key: hpke.HpkePrivateKey,
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
            keys.append(self._open_one(granted, body.request_id, request_nonce, private_key))
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
        if _policy_digest(granted.policy) != granted.policy_digest:
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
        return ReleasedKey(
            model_id=granted.model_id,
            key_version=granted.key_version,
            key=DataKey(material),
            lease_expires_at=granted.lease_expires_at,
            policy=granted.policy,
            policy_version=granted.policy_version,
            policy_digest=granted.policy_digest,
        )

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


# -- administration ----------------------------------------------------------------------------


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
        self._http = _client(
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
        from sealtorch.keyserver.schemas import CreatedModel, CreateModelRequest

        body = CreateModelRequest(model_id=model_id, key=key.material if key else None)
        result: CreatedModel = self._as(CreatedModel, self._call("POST", "/models", body))
        return result

    def list_models(self) -> list[ModelInfo]:
        from sealtorch.keyserver.schemas import ModelInfo

        result: list[ModelInfo] = self._as(list[ModelInfo], self._call("GET", "/models"))
        return result

    def show_model(self, model_id: str) -> ModelDetail:
        from sealtorch.keyserver.schemas import ModelDetail

        path = f"/models/{quote(model_id, safe='')}"
        result: ModelDetail = self._as(ModelDetail, self._call("GET", path))
        return result

    def delete_model(self, model_id: str) -> ModelInfo:
        from sealtorch.keyserver.schemas import ModelInfo

        path = f"/models/{quote(model_id, safe='')}"
        result: ModelInfo = self._as(ModelInfo, self._call("DELETE", path))
        return result

    def list_keys(self, model_id: str) -> list[KeyVersionInfo]:
        from sealtorch.keyserver.schemas import KeyVersionInfo

        path = f"/models/{quote(model_id, safe='')}/keys"
        result: list[KeyVersionInfo] = self._as(list[KeyVersionInfo], self._call("GET", path))
        return result

    def rotate_key(self, model_id: str, *, key: DataKey | None = None) -> KeyVersionInfo:
        from sealtorch.keyserver.schemas import KeyVersionInfo, RotateRequest

        path = f"/models/{quote(model_id, safe='')}/keys"
        body = RotateRequest(key=key.material if key else None)
        result: KeyVersionInfo = self._as(KeyVersionInfo, self._call("POST", path, body))
        return result

    def revoke_key(self, model_id: str, version: int) -> KeyVersionInfo:
        from sealtorch.keyserver.schemas import KeyVersionInfo

        path = f"/models/{quote(model_id, safe='')}/keys/{int(version)}/revoke"
        result: KeyVersionInfo = self._as(KeyVersionInfo, self._call("POST", path))
        return result

    # -- policies --

    def set_policy(self, model_id: str, policy: Mapping[str, Any]) -> PolicyInfo:
        from sealtorch.keyserver.schemas import PolicyInfo, SetPolicyRequest

        path = f"/models/{quote(model_id, safe='')}/policy"
        body = SetPolicyRequest(policy=dict(policy))
        result: PolicyInfo = self._as(PolicyInfo, self._call("PUT", path, body))
        return result

    def show_policy(self, model_id: str) -> PolicyInfo:
        from sealtorch.keyserver.schemas import PolicyInfo

        path = f"/models/{quote(model_id, safe='')}/policy"
        result: PolicyInfo = self._as(PolicyInfo, self._call("GET", path))
        return result

    def policy_history(self, model_id: str) -> list[PolicyInfo]:
        from sealtorch.keyserver.schemas import PolicyInfo

        path = f"/models/{quote(model_id, safe='')}/policies"
        result: list[PolicyInfo] = self._as(list[PolicyInfo], self._call("GET", path))
        return result

    # -- tokens --

    def create_token(self, name: str, *, expires_in: int | None = None) -> CreatedToken:
        from sealtorch.keyserver.schemas import CreatedToken, CreateTokenRequest

        body = CreateTokenRequest(name=name, expires_in=expires_in)
        result: CreatedToken = self._as(CreatedToken, self._call("POST", "/tokens", body))
        return result

    def list_tokens(self) -> list[TokenInfo]:
        from sealtorch.keyserver.schemas import TokenInfo

        result: list[TokenInfo] = self._as(list[TokenInfo], self._call("GET", "/tokens"))
        return result

    def revoke_token(self, token_id: str) -> TokenInfo:
        from sealtorch.keyserver.schemas import TokenInfo

        path = f"/tokens/{quote(token_id, safe='')}/revoke"
        result: TokenInfo = self._as(TokenInfo, self._call("POST", path))
        return result

    # -- audit --

    def audit_head(self) -> AuditHead:
        from sealtorch.keyserver.audit import AuditHead
        from sealtorch.keyserver.schemas import AuditPage

        page = self._as(AuditPage, self._call("GET", "/audit", after=2**62, limit=1))
        return AuditHead(seq=page.head.seq, hash=page.head.hash)

    def iter_audit(self, *, after: int = 0) -> Iterator[AuditRecord]:
        """Every audit record after ``after``, in order (strictly parsed for verification)."""
        from sealtorch.keyserver.audit import read_jsonl
        from sealtorch.keyserver.schemas import AuditPage

        cursor: int | None = after
        while cursor is not None:
            page = self._as(AuditPage, self._call("GET", "/audit", after=cursor, limit=1000))
            lines = [json.dumps(record, sort_keys=True) for record in page.records]
            yield from read_jsonl(lines)
            cursor = page.next_after

    # -- content keys --

    def wrap(self, *, model_id: str, body_digest: bytes, cek: bytes) -> KeyBlock:
        """Have the server wrap ``cek`` under the model's current data key version."""
        from sealtorch.keyserver.schemas import KeyBlockWire, WrapRequest
        from sealtorch.sealed.header import KeyBlock

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
        from sealtorch.keyserver.schemas import KeyBlockWire, RewrapRequest
        from sealtorch.sealed.header import KeyBlock

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
