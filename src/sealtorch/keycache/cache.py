"""The key cache: holds leased keys from the key server and keeps them fresh.

:class:`KeyCache` owns the current :class:`~sealtorch.keycache.holdings.Holdings` snapshot and
the refresh schedule. It knows nothing about HTTP; the local release protocol is
:class:`~sealtorch.keycache.service.LocalReleaseService`, which reads :meth:`KeyCache.holdings`.

Schedule (all on the injectable clock):

* after a successful refresh, the next one is due at the earlier of ``refresh_interval`` later
  (this bounds how long a revocation takes to reach the cache) and the moment
  ``renew_fraction`` of the shortest held lease has passed (renew well before expiry);
* after a failure, retry after a jittered exponential backoff (``backoff_initial`` doubling up
  to ``backoff_max``, "equal jitter": between half and all of it);
* a lease that ends drops its key from the holdings at that moment; requests for it are refused with
  ``lease_expired`` until a refresh succeeds again.

A refresh *replaces* the holdings with what the key server just released: a revoked key version,
or a model whose policy no longer admits this cache, is gone from then on. If the key server
refuses the cache's own evidence, the cache drops every key and serves nothing.

:meth:`tick` runs one step of that loop and returns how long to sleep; the background thread
(:meth:`start_background`) just calls it. Tests call :meth:`tick` directly with a fake clock, or
wait on :meth:`wait_for` instead of sleeping.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final

from sealtorch.attestation import Policy
from sealtorch.client import ReleasedKey
from sealtorch.errors import (
    ConfigError,
    Error,
    FormatError,
    PolicyError,
    ProtocolError,
    ReleaseStatementError,
)
from sealtorch.keycache.holdings import (
    HeldKey,
    Holdings,
    Refusal,
    ServerDenial,
    lease_end_local,
)
from sealtorch.keycache.metrics import CacheMetrics
from sealtorch.keycache.persist import SealedState, StateRefused
from sealtorch.keycache.status import (
    AttestationState,
    AttestationStatus,
    CacheStatus,
    DeniedStatus,
    ExpiredStatus,
    KeyServerStatus,
    ModelStatus,
    PersistenceStatus,
    State,
)
from sealtorch.keycache.upstream import AttestFailed, Refresh, Refused, Unreachable, Upstream

__all__ = ["KeyCache"]

_log = logging.getLogger("sealtorch.keycache")

#: Longest single sleep of the background loop (re-reads the clock at least this often).
_MAX_SLEEP: Final = 30.0


class KeyCache:
    """Leased keys from the key server, kept fresh (see the module docstring)."""

    def __init__(
        self,
        *,
        upstream: Upstream,
        clock: Callable[[], datetime],
        tee: str,
        measurement: str | None = None,
        refresh_interval: timedelta = timedelta(minutes=5),
        renew_fraction: float = 0.5,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        state: SealedState | None = None,
        metrics: CacheMetrics | None = None,
        random_fraction: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < renew_fraction < 1:
            raise ConfigError("renew_fraction must be between 0 and 1")
        self._upstream = upstream
        self._clock = clock
        self._tee = tee
        self._measurement = measurement
        self._refresh_interval = refresh_interval
        self._renew_fraction = renew_fraction
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._state = state
        self.metrics = metrics or CacheMetrics()
        self._random = random_fraction

        self._holdings = Holdings()
        self._changed = threading.Condition()
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

        self._attempts = 0
        self._failures = 0
        self._next_due: datetime = clock()
        self._last_success: datetime | None = None
        self._last_attempt: datetime | None = None
        self._last_contact: datetime | None = None
        self._last_error: str | None = None
        self._reachable: bool | None = None
        self._attestation: tuple[AttestationState, tuple[str, ...], str | None] = (
            "pending",
            (),
            None,
        )
        self._restored = 0
        self._saved_at: datetime | None = None
        self._state_error: str | None = None
        self._logged_models: dict[str, tuple[int, ...]] | None = None

    def __repr__(self) -> str:
        return f"KeyCache({self._upstream.url!r}, {self._holdings!r})"

    # -- reading ----------------------------------------------------------------------------------

    def holdings(self) -> Holdings:
        """The current snapshot (never locked; replaced as a whole)."""
        return self._holdings

    def now(self) -> datetime:
        return self._clock()

    @property
    def upstream(self) -> Upstream:
        return self._upstream

    # -- start ------------------------------------------------------------------------------------

    def start(self) -> Holdings:
        """Restore the sealed state (if configured), then attest and fetch once. Never raises
        for an unreachable or refusing key server: the outcome is logged and in :meth:`status`."""
        self.restore()
        self.refresh_once()
        return self._holdings

    def restore(self) -> int:
        """Load keys from the sealed state file; returns how many leases were still running."""
        if self._state is None:
            return 0
        now = self._clock()
        try:
            keys = self._state.load(now=now)
        except (StateRefused, FormatError, ConfigError) as exc:
            self._state_error = str(exc)
            _log.error("sealed key cache state %s refused: %s", self._state.path, exc)
            return 0
        if keys:
            self._set(Holdings.build(keys))
        self._restored = len(keys)
        _log.info(
            "restored %d key(s) with running leases from %s",
            len(keys),
            self._state.path,
            extra={"models": sorted({k.model_id for k in keys})},
        )
        return len(keys)

    # -- refreshing -------------------------------------------------------------------------------

    def refresh_once(self) -> bool:
        """One refresh from the key server now; True if it succeeded."""
        with self._refresh_lock:
            now = self._clock()
            self._last_attempt = now
            self._attempts += 1
            how = "renew" if self._upstream.session_expires_at else "release"
            try:
                refresh = self._upstream.refresh()
            except Unreachable as exc:
                self._failed(how, "unreachable", str(exc), reachable=False)
                return False
            except AttestFailed as exc:
                self._attestation = ("error", (), str(exc))
                self._failed(how, "attest_failed", str(exc), reachable=self._reachable)
                return False
            except ReleaseStatementError as exc:  # a fake key source, or a forged response
                message = f"rejected a key server response ({exc.reason}): {exc}"
                self._failed(how, "protocol_error", message)
                return False
            except ProtocolError as exc:
                self._failed(how, "protocol_error", f"rejected a key server response: {exc}")
                return False
            except Refused as exc:
                self._refused(exc)
                return False
            self._apply(refresh)
            return True

    def _failed(
        self, how: str, outcome: str, message: str, *, reachable: bool | None = True
    ) -> None:
        self._failures += 1
        self._reachable = reachable
        self._last_error = message
        if reachable:
            self._last_contact = self._clock()
        base = min(self._backoff_max, self._backoff_initial * 2 ** min(self._failures - 1, 30))
        delay = base / 2 + base / 2 * self._random()
        self._next_due = self._clock() + timedelta(seconds=delay)
        held = self._holdings.key_count
        _log.warning(
            "key cache refresh failed (%s: %s); %s; retrying in %.1f s",
            outcome,
            message,
            f"serving {held} key(s) until their leases end" if held else "holding no keys",
            delay,
            extra={"error": message, "failures": self._failures},
        )
        self.metrics.refreshes.labels(how, outcome).inc()
        self._update_gauges()
        self._notify()

    def _refused(self, exc: Refused) -> None:
        """The key server refused this cache: drop everything (never more permissive)."""
        self._attestation = ("denied", exc.reasons, str(exc))
        if self._holdings.key_count:
            _log.error(
                "dropping %d key(s): the key server refused this cache", self._holdings.key_count
            )
        self._set(Holdings.build((), refusal=Refusal(exc.code, exc.reasons, str(exc))))
        self._save()
        _log.error(
            "the key server refused this key cache's attestation (%s); serving nothing",
            ", ".join(exc.reasons),
            extra={"reasons": list(exc.reasons), "error": str(exc)},
        )
        # Retry like after an outage: an operator may fix the policy or trust in the meantime.
        how = "renew" if self._upstream.session_expires_at else "release"
        self._failed(how, "refused", str(exc), reachable=True)

    def _apply(self, refresh: Refresh) -> None:
        result = refresh.result
        received = refresh.received_at
        held: list[HeldKey] = []
        denied = [ServerDenial(d.model_id, d.reasons, d.message) for d in result.denied]
        unusable: set[str] = set()
        for released in result.keys:
            try:
                held.append(self._held(released, server_time=result.server_time, received=received))
            except (PolicyError, ProtocolError) as exc:
                _log.error(
                    "model %s: the policy sent with key version %d cannot be enforced here "
                    "(%s); the cache will not serve this model",
                    released.model_id,
                    released.key_version,
                    exc,
                )
                unusable.add(released.model_id)
        denied.extend(
            ServerDenial(
                model_id,
                ("policy_invalid",),
                f"the key cache cannot enforce the policy sent with model {model_id!r} "
                "(a newer policy schema?), so it refuses to serve that key",
            )
            for model_id in sorted(unusable)
        )
        held = [k for k in held if k.model_id not in unusable]
        self._set(Holdings.build(held, denied=denied))
        self._failures = 0
        self._reachable = True
        self._last_error = None
        self._last_contact = received
        self._last_success = received
        self._attestation = ("granted", (), None)
        self._next_due = self._schedule_after_success(received)
        self.metrics.refreshes.labels(refresh.how, "ok").inc()
        self._log_changes(refresh)
        self._save()
        self._update_gauges()
        self._notify()

    def _held(self, released: ReleasedKey, *, server_time: datetime, received: datetime) -> HeldKey:
        document = dict(released.policy)
        policy = Policy.from_dict(document, source=f"policy of {released.model_id}")
        if policy.digest != released.policy_digest:
            raise ProtocolError("the policy does not match its digest once parsed")
        return HeldKey(
            model_id=released.model_id,
            key_version=released.key_version,
            key=released.key,
            expires_at=lease_end_local(
                lease_expires_at=released.lease_expires_at,
                server_time=server_time,
                received_at=received,
            ),
            received_at=received,
            policy=policy,
            policy_document=document,
            policy_version=released.policy_version,
            policy_digest=released.policy_digest,
            statement=released.statement,
        )

    def _schedule_after_success(self, now: datetime) -> datetime:
        due = now + self._refresh_interval
        renew = self._holdings.next_renewal(self._renew_fraction)
        return min(due, renew) if renew is not None else due

    def _log_changes(self, refresh: Refresh) -> None:
        models = {m: tuple(k.key_version for k in v) for m, v in self._holdings.keys.items()}
        first = self._logged_models is None
        previous = self._logged_models or {}
        for model_id, versions in sorted(models.items()):
            if first or previous.get(model_id) != versions:
                lease = self._holdings.keys[model_id][0].expires_at
                _log.info(
                    "model %s: granted key version(s) %s, lease until %s",
                    model_id,
                    ", ".join(map(str, versions)),
                    lease.astimezone(UTC).isoformat(),
                    extra={"model_id": model_id, "key_versions": list(versions)},
                )
        for model_id in sorted(set(previous) - set(models)):
            _log.warning(
                "model %s: no longer released to this cache (revoked or policy changed); dropped",
                model_id,
                extra={"model_id": model_id},
            )
        for denial in self._holdings.denied.values():
            if first or denial.model_id in previous:
                _log.warning(
                    "model %s: denied to this cache (%s): %s",
                    denial.model_id,
                    ", ".join(denial.reasons),
                    denial.message,
                    extra={"model_id": denial.model_id, "reasons": list(denial.reasons)},
                )
        if first and not models and not self._holdings.denied:
            _log.warning(
                "the key server released no keys to this cache (list --model ids to see why)"
            )
        self._logged_models = models
        _log.debug("refresh (%s) done", refresh.how, extra={"models": len(models)})

    def _save(self) -> None:
        if self._state is None:
            return
        now = self._clock()
        try:
            self._state.save(self._holdings, now=now)
        except ConfigError as exc:
            self._state_error = str(exc)
            _log.error("could not save the sealed key cache state: %s", exc)
        else:
            self._saved_at = now

    # -- expiry and the loop --------------------------------------------------------------------

    def expire(self) -> int:
        """Drop every key whose lease has ended; returns how many were dropped."""
        now = self._clock()
        current = self._holdings
        pruned = current.without_expired(now)
        if pruned is current:
            return 0
        dropped = current.key_count - pruned.key_count
        for model_id in sorted(set(current.keys) - set(pruned.keys)):
            _log.warning(
                "model %s: lease ended without renewal (key server unreachable); key dropped, "
                "requests are refused with lease_expired",
                model_id,
                extra={"model_id": model_id},
            )
        self._set(pruned)
        self._update_gauges()
        self._notify()
        return dropped

    def tick(self) -> float:
        """One step of the refresh loop; returns the seconds until the next step is due."""
        self.expire()
        if self._clock() >= self._next_due:
            self.refresh_once()
            self.expire()
        now = self._clock()
        wake = self._next_due
        expiry = self._holdings.next_expiry()
        if expiry is not None and expiry < wake:
            wake = expiry
        return max(0.0, (wake - now).total_seconds())

    def wake(self) -> None:
        """Refresh now (e.g. on SIGHUP) instead of at the scheduled time."""
        self._next_due = self._clock()
        self._wake.set()

    def start_background(self) -> None:
        """Run :meth:`tick` in a daemon thread until :meth:`stop_background`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="keycache-refresh", daemon=True)
        self._thread.start()

    def stop_background(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        self.stop_background()
        self._upstream.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.tick()
            except Error as exc:  # pragma: no cover - refresh_once handles the expected ones
                _log.error("key cache refresh loop error: %s", exc)
                delay = self._backoff_max
            self._wake.wait(min(delay, _MAX_SLEEP))
            self._wake.clear()

    # -- change notification ----------------------------------------------------------------------

    def _set(self, holdings: Holdings) -> None:
        self._holdings = holdings

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[KeyCache], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds after some change (or now); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)

    @property
    def attempts(self) -> int:
        """How many refreshes were attempted (tests wait for this to grow)."""
        return self._attempts

    # -- status -----------------------------------------------------------------------------------

    def _update_gauges(self) -> None:
        holdings = self._holdings
        now = self._clock()
        self.metrics.models_held.set(sum(1 for m in holdings.keys if holdings.valid(m, now)))
        self.metrics.keys_held.set(holdings.key_count)
        self.metrics.keyserver_reachable.set(1 if self._reachable else 0)
        self.metrics.attested.set(1 if self._attestation[0] == "granted" else 0)
        expiry = holdings.next_expiry()
        self.metrics.next_lease_expiry.set(expiry.timestamp() if expiry else 0)
        if self._last_success is not None:
            self.metrics.last_renewal.set(self._last_success.timestamp())

    def state(self) -> State:
        holdings = self._holdings
        now = self._clock()
        serving = any(holdings.valid(m, now) for m in holdings.keys)
        if self._attempts == 0 and not serving:
            return "starting"
        if holdings.refusal is not None or (not serving and holdings.denied):
            return "denied"
        if serving:
            return "ready" if self._failures == 0 else "degraded"
        if self._reachable is False or self._attestation[0] == "error":
            return "unavailable"
        return "empty"

    def status(self) -> CacheStatus:
        """What the cache holds and how it is doing — never key material."""
        now = self._clock()
        holdings = self._holdings
        models = []
        for model_id in sorted(holdings.keys):
            live = holdings.valid(model_id, now)
            if not live:
                continue
            lease = min(k.expires_at for k in live)
            models.append(
                ModelStatus(
                    model_id=model_id,
                    key_versions=tuple(k.key_version for k in live),
                    lease_expires_at=lease,
                    lease_remaining_seconds=round((lease - now).total_seconds(), 3),
                    received_at=live[0].received_at,
                    policy_version=live[0].policy_version,
                    policy_digest=live[0].policy_digest,
                    policy_name=live[0].policy.name,
                )
            )
        expired = [
            ExpiredStatus(model_id=m, expired_at=t) for m, t in sorted(holdings.expired.items())
        ] + [
            ExpiredStatus(model_id=m, expired_at=max(k.expires_at for k in v))
            for m, v in sorted(holdings.keys.items())
            if not holdings.valid(m, now)
        ]
        state, reasons, message = self._attestation
        persistence = None
        if self._state is not None:
            persistence = PersistenceStatus(
                path=str(self._state.path),
                restored_keys=self._restored,
                last_saved_at=self._saved_at,
                error=self._state_error,
            )
        session_end = self._upstream.session_expires_at
        return CacheStatus(
            state=self.state(),
            now=now,
            keyserver=KeyServerStatus(
                url=self._upstream.url,
                reachable=self._reachable,
                last_contact_at=self._last_contact,
                last_error=self._last_error,
                consecutive_failures=self._failures,
            ),
            attestation=AttestationStatus(
                state=state,
                reasons=reasons,
                message=message,
                tee=self._tee,
                measurement=self._measurement,
            ),
            last_renewal_at=self._last_success,
            last_attempt_at=self._last_attempt,
            next_refresh_at=self._next_due if self._attempts else None,
            session_expires_at=session_end if session_end and session_end > now else None,
            refresh_interval_seconds=self._refresh_interval.total_seconds(),
            models=tuple(models),
            denied=tuple(
                DeniedStatus(model_id=d.model_id, reasons=d.reasons, message=d.message)
                for d in sorted(holdings.denied.values(), key=lambda d: d.model_id)
            ),
            expired=tuple(expired),
            persistence=persistence,
        )
