"""The key cache as a *client* of the key server: attest, fetch, renew.

:class:`Upstream` wraps :class:`~sealtorch.client.KeyReleaseClient` (the same client every
enclave uses; it verifies each released key's binding and policy digest, and the key server's
release statement under the pinned key server key(s), which must be issued to this cache's own
HPKE key) and sorts failures into what the cache must do about them:

The three outcomes are classes of the project's one error tree (``sealtorch.errors``); the
names below are this module's aliases of them.

* :class:`Unreachable` (:class:`~sealtorch.errors.KeySourceUnreachableError`) — no answer from
  any of the key servers it knows (``[keyserver] url`` may list several: it moves to the next on
  a connection failure or a 503), a 5xx, a TLS certificate this cache does not trust (its
  message says so, and to pass ``--ca``), or a transient protocol refusal (an expired nonce, the
  server's collateral source down): keep serving keys whose leases run, retry with backoff;
* :class:`Refused` (:class:`~sealtorch.errors.KeyReleaseRefusedError`) — the key server
  refuses *this cache's evidence* (untrusted attestation key,
  invalid evidence, stale collateral, ...): the cache must drop every key, since serving them
  would make it more permissive than the server;
* :class:`~sealtorch.errors.ProtocolError` — a response that fails the client's checks
  (tampered, or a key without a valid statement of the pinned key server: a fake key source,
  :class:`~sealtorch.errors.ReleaseStatementError`): nothing from it is used; treated like an
  outage (keys from the real key server keep being served until their leases end).

:class:`AttestFailed` (:class:`~sealtorch.errors.SelfAttestationError`): this cache could not
produce its own evidence.

A refresh renews with the session token while the session lasts (no new quote) and attests
afresh when there is no session, it is about to end, or the server no longer knows it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Final

import httpx

from sealtorch._crypto.tls import untrusted_server_message
from sealtorch._uds import UnixSocketTransport
from sealtorch.attestation import EvidenceProvider
from sealtorch.client import KeyReleaseClient, ReleaseResult
from sealtorch.client._http import split_urls
from sealtorch.errors import (
    Error,
    KeyReleaseError,
    KeyReleaseRefusedError,
    KeySourceUnreachableError,
    SelfAttestationError,
)
from sealtorch.protocol import DEFAULT_HPKE_SUITE, TrustedReleaseKeys

__all__ = ["AttestFailed", "Refresh", "Refused", "Unreachable", "Upstream"]

_log = logging.getLogger("sealtorch.keycache")

#: Refusals that say nothing about the cache's evidence: retry as after an outage.
_TRANSIENT: Final = frozenset({"nonce_invalid", "nonce_expired", "collateral_unavailable"})
#: Renew with the session only if it lasts at least this much longer.
_SESSION_MARGIN: Final = timedelta(seconds=5)


#: No useful answer from any key server (network, 5xx, transient refusal).
Unreachable = KeySourceUnreachableError
#: This cache could not produce its own evidence (TEE device missing or refusing).
AttestFailed = SelfAttestationError
#: The key server refused this cache's own release request.
Refused = KeyReleaseRefusedError


class Refresh:
    """A verified key server answer and how it was obtained (``release`` or ``renew``)."""

    __slots__ = ("how", "received_at", "result")

    def __init__(self, result: ReleaseResult, *, how: str, received_at: datetime) -> None:
        self.result = result
        self.how = how
        self.received_at = received_at

    def __repr__(self) -> str:
        return (
            f"Refresh(how={self.how!r}, {len(self.result.keys)} keys, "
            f"{len(self.result.denied)} denied)"
        )


class Upstream:
    """Fetches this cache's keys from the key server (see module docstring)."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        attester: EvidenceProvider,
        models: Sequence[str] | None,
        clock: Callable[[], datetime],
        trusted_release_keys: TrustedReleaseKeys,
        ca: str | os.PathLike[str] | None = None,
        suite: str = DEFAULT_HPKE_SUITE,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        urls = split_urls(url)
        self.models = tuple(models) if models is not None else None
        if transport is None and len(urls) == 1 and urls[0].startswith("unix://"):
            transport = UnixSocketTransport(urls[0][len("unix://") :])
        self._clock = clock
        self._client = KeyReleaseClient(
            urls,
            attester=attester,
            ca=ca,
            session=True,
            timeout=timeout,
            retries=0,  # the cache schedules its own retries (jittered exponential backoff)
            remember=False,  # the cache's holdings are the only copy; revoked keys vanish
            transport=transport,
            suite=suite,
            trusted_release_keys=trusted_release_keys,
            # The cache talks to the key server itself: every statement must be issued to it.
            accept_forwarded_statements=False,
        )
        #: When the current renewal session ends, on the cache's clock.
        self.session_expires_at: datetime | None = None

    @property
    def url(self) -> str:
        """The key server that answered last (the first one before any answer)."""
        return self._client.url

    @property
    def urls(self) -> tuple[str, ...]:
        return self._client.urls

    def __repr__(self) -> str:
        return f"Upstream({', '.join(self.urls)!r}, models={self.models!r})"

    def close(self) -> None:
        self._client.close()

    def refresh(self) -> Refresh:
        """Renew (session) or release (fresh attestation); raises Unreachable / Refused /
        ProtocolError."""
        now = self._clock()
        if (
            self._client.session is not None
            and self.session_expires_at is not None
            and now + _SESSION_MARGIN < self.session_expires_at
        ):
            try:
                result = self._client.renew(self.models)
            except KeyReleaseError as exc:
                if exc.status_code in (401, 403):
                    _log.info(
                        "the key server no longer accepts the renewal session (%s); attesting "
                        "again",
                        ", ".join(exc.reasons) or exc.status_code,
                    )
                else:
                    raise _classify(exc, self.url) from exc
            else:
                return Refresh(result, how="renew", received_at=self._clock())
        try:
            result = self._client.release(self.models, session=True)
        except KeyReleaseError as exc:
            raise _classify(exc, self.url) from exc
        received = self._clock()
        if result.session is not None:
            self.session_expires_at = received + (result.session.expires_at - result.server_time)
        else:
            self.session_expires_at = None
        return Refresh(result, how="release", received_at=received)


def _classify(exc: KeyReleaseError, url: str) -> Error:
    status = exc.status_code
    if status is None:
        if isinstance(exc, KeySourceUnreachableError):
            untrusted = untrusted_server_message(
                exc, server=f"the key server at {url}", ca_option="--ca (config: [keyserver] ca)"
            )
            return Unreachable(untrusted or f"cannot reach the key server at {url}: {exc}")
        return AttestFailed(f"this key cache could not attest: {exc}")
    if status >= 500:
        return Unreachable(f"the key server at {url} is unavailable: {exc}", status_code=status)
    code = exc.reasons[0] if exc.reasons else f"http_{status}"
    if set(exc.reasons) & _TRANSIENT:
        return Unreachable(
            f"the key server refused a request, will retry: {exc}", status_code=status
        )
    return Refused(
        f"the key server refused this key cache: {exc}",
        code=code,
        reasons=exc.reasons or (code,),
        status_code=status,
    )
