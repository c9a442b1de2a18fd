"""The key server's two services behind one object: :class:`KeyService`.

- :class:`~sealtorch.keyserver.release_service.ReleaseService` (``service.releases``): the key
  release protocol, ``challenge``, ``release``, ``renew`` (the hot path; asynchronous, through
  the store's group commit);
- :class:`~sealtorch.keyserver.admin_service.AdminService` (``service.admin``): models, keys,
  policies, tokens, the audit log and content key wrapping (synchronous, thread-safe).

Both share one store, master key, release-signing key, clock and policy cache; what else they
share (their error, the audit context, storage failures as ``503``) is in
:mod:`sealtorch.keyserver._service`. None of it imports the web framework: the routes
translate HTTP into calls and :class:`ServiceError` into responses.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sealtorch._release import DecisionObserver
from sealtorch.attestation import VerifierSet
from sealtorch.errors import StorageError
from sealtorch.keyserver._service import (
    Actor,
    AuditContext,
    Clock,
    ErrorKind,
    Offload,
    PolicyCache,
    ServiceError,
)
from sealtorch.keyserver.admin_service import AdminService
from sealtorch.keyserver.masterkey import MasterKey
from sealtorch.keyserver.release_service import ReleaseService
from sealtorch.keyserver.settings import KeyServerSettings
from sealtorch.keyserver.signingkey import ReleaseSigningKey
from sealtorch.keyserver.store import Store
from sealtorch.protocol import ReleasePublicKey

__all__ = [
    "Actor",
    "AdminService",
    "AuditContext",
    "DecisionObserver",
    "ErrorKind",
    "KeyService",
    "Offload",
    "ReleaseService",
    "ServiceError",
]


class KeyService:
    """Attested key release (:attr:`releases`) and key administration (:attr:`admin`) over
    one :class:`Store`, with the health checks of both (see the module docstring)."""

    def __init__(
        self,
        settings: KeyServerSettings,
        *,
        store: Store,
        master_key: MasterKey,
        signing_key: ReleaseSigningKey,
        verifiers: VerifierSet,
        clock: Callable[[], datetime] | None = None,
        observer: DecisionObserver | None = None,
        offload: Offload | None = None,
        simulated_observer: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._signer = signing_key
        service_clock = Clock(clock)
        policies = PolicyCache()
        self.now: Callable[[], datetime] = service_clock.now
        self.releases = ReleaseService(
            settings,
            store=store,
            master_key=master_key,
            signing_key=signing_key,
            verifiers=verifiers,
            clock=service_clock,
            policies=policies,
            observer=observer,
            offload=offload,
            simulated_observer=simulated_observer,
        )
        self.admin = AdminService(
            store=store,
            master_key=master_key,
            signing_key=signing_key,
            clock=service_clock,
            policies=policies,
        )

    @property
    def store(self) -> Store:
        return self._store

    @property
    def simulated_tee(self) -> bool:
        """Whether simulated-TEE evidence is verified (sim keys trusted): development only."""
        return "sim" in self.releases.evidence_types

    @property
    def release_public_key(self) -> ReleasePublicKey:
        """The public key of the key that signs release statements (enclaves pin it)."""
        return self._signer.public_key

    def check_ready(self) -> None:
        """Raise :class:`ServiceError` (unavailable) unless the store answers with our schema."""
        try:
            self._store.ping()
            self._store.check_schema()
        except StorageError as exc:
            raise ServiceError(ErrorKind.UNAVAILABLE, "store_unavailable", str(exc)) from exc

    def purge_expired(self) -> int:
        return self._store.purge_expired(now=self.now())

    def insecure_policies(self) -> dict[str, int]:
        """How many live models' current policies turn on each ``*_insecure`` flag."""
        return self.admin.insecure_policies()
