"""DCAP verification collateral: loading, freshness, offline sources and a cached PCCS/PCS fetcher.

*Collateral* is what a verifier needs besides the quote: Intel's root CA CRL and PCK CRL, the
platform's TCB info (per FMSPC) and the quoting enclave's identity, each signed by Intel. It
expires: every piece has a ``nextUpdate``. sealtorch never accepts expired collateral — it is
reported as :class:`~sealtorch.errors.CollateralError` with ``stale=True``.

Sources (all implement :class:`CollateralSource`):

* :class:`CollateralFile` — one dcap-qvl collateral JSON file (like ``sealtorch attest verify
  --collateral``), for one platform.
* :class:`CollateralDirectory` — a directory of such files, indexed by the (TEE, FMSPC, CA) read
  from each file's content; fully offline.
* :class:`PccsCollateral` — fetched from a PCCS or Intel PCS (API v4), cached on disk per
  (TEE, FMSPC, CA) and in memory, refreshed in the background before ``nextUpdate``. A fresh
  cached copy is always served without touching the network.

The on-disk cache is itself a valid collateral directory. See ``docs/attestation.md``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, runtime_checkable

import dcap_qvl

from sealtorch._crypto.x509info import chain_info, crl_info, crl_to_der
from sealtorch.errors import CollateralError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import httpx

__all__ = [
    "INTEL_PCS_URL",
    "Clock",
    "Collateral",
    "CollateralDirectory",
    "CollateralFile",
    "CollateralKey",
    "CollateralSource",
    "PccsCollateral",
    "system_clock",
]

_log = logging.getLogger(__name__)

INTEL_PCS_URL: Final = "https://api.trustedservices.intel.com"

#: A function returning the current time (timezone-aware UTC). Tests pin it.
Clock = Callable[[], datetime]

CollateralTee = Literal["sgx", "tdx"]
CaType = Literal["processor", "platform"]

_REQUIRED_FIELDS: Final = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)
_HEX_FIELDS: Final = ("root_ca_crl", "pck_crl", "tcb_info_signature", "qe_identity_signature")
_MAX_COLLATERAL_SIZE: Final = 1024 * 1024
_FMSPC = re.compile(r"[0-9A-F]{12}")
_CA_BY_CN: Final[dict[str, CaType]] = {
    "Intel SGX PCK Processor CA": "processor",
    "Intel SGX PCK Platform CA": "platform",
}
_QE_ID_BY_TEE: Final[dict[str, str]] = {"sgx": "QE", "tdx": "TD_QE"}


def system_clock() -> datetime:
    """The verifier's clock: the current time in UTC."""
    return datetime.now(UTC)


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ConfigError("times must be timezone-aware (e.g. datetime.now(UTC))")
    return now


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_intel_time(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"{what} is missing")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"{what} has no timezone")
    return parsed.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class CollateralKey:
    """Which collateral a quote needs: TEE kind, platform FMSPC and PCK issuing CA."""

    tee: CollateralTee
    fmspc: str
    ca: CaType

    def __post_init__(self) -> None:
        if self.tee not in ("sgx", "tdx"):
            raise ConfigError(f"collateral TEE must be sgx or tdx, not {self.tee!r}")
        fmspc: object = self.fmspc
        if not isinstance(fmspc, str) or not _FMSPC.fullmatch(fmspc):
            raise ConfigError(f"FMSPC must be 12 uppercase hex digits, not {self.fmspc!r}")
        if self.ca not in ("processor", "platform"):
            raise ConfigError(f"PCK CA must be processor or platform, not {self.ca!r}")

    @property
    def filename(self) -> str:
        """File name in a collateral directory / cache: ``sgx-00A067110000-processor.json``."""
        return f"{self.tee}-{self.fmspc}-{self.ca}.json"

    def __str__(self) -> str:
        return f"{self.tee.upper()} FMSPC {self.fmspc} ({self.ca} CA)"


@dataclass(frozen=True, slots=True, eq=False)
class Collateral:
    """One platform's parsed collateral, ready for dcap-qvl, with its validity window."""

    key: CollateralKey
    #: Latest issue date over its parts (TCB info, QE identity, CRLs).
    issued_at: datetime
    #: Earliest ``nextUpdate`` / expiry over its parts: stale from this moment on.
    next_update: datetime
    #: Where it came from (file path or URL), for messages.
    source: str
    #: The dcap-qvl collateral JSON text.
    json_text: str = field(repr=False)
    qvl: dcap_qvl.QuoteCollateralV3 = field(repr=False)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str) -> Collateral:
        """Parse dcap-qvl collateral JSON (the format of ``sgx_quote_collateral.json``)."""
        if len(text) > _MAX_COLLATERAL_SIZE:
            raise CollateralError(
                f"{source}: collateral is larger than 1 MiB; is it the right file?"
            )
        try:
            obj = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CollateralError(f"{source}: collateral is not valid JSON") from exc
        return cls.from_dict(obj, source=source)

    @classmethod
    def from_dict(cls, obj: object, *, source: str) -> Collateral:
        if not isinstance(obj, dict):
            raise CollateralError(f"{source}: collateral must be a JSON object")
        missing = [name for name in _REQUIRED_FIELDS if not isinstance(obj.get(name), str)]
        if missing:
            raise CollateralError(
                f"{source}: not dcap-qvl collateral JSON; missing or non-string field(s): "
                + ", ".join(missing)
            )
        fields: dict[str, str] = {name: obj[name] for name in _REQUIRED_FIELDS}
        try:
            binary = {name: bytes.fromhex(fields[name]) for name in _HEX_FIELDS}
            tcb_info = json.loads(fields["tcb_info"])
            qe_identity = json.loads(fields["qe_identity"])
            if not isinstance(tcb_info, dict) or not isinstance(qe_identity, dict):
                raise ValueError("tcb_info and qe_identity must be JSON objects")
            pck_crl = crl_info(binary["pck_crl"])
            root_crl = crl_info(binary["root_ca_crl"])
            chains = [
                chain_info(fields[name])
                for name in (
                    "pck_crl_issuer_chain",
                    "tcb_info_issuer_chain",
                    "qe_identity_issuer_chain",
                )
            ]
            tee: CollateralTee = "tdx" if tcb_info.get("id") == "TDX" else "sgx"
            fmspc = str(tcb_info.get("fmspc", "")).upper()
            ca = _CA_BY_CN.get(pck_crl.issuer_cn)
            if ca is None:
                raise ValueError(f"PCK CRL issuer {pck_crl.issuer_cn!r} is not an Intel PCK CA")
            if qe_identity.get("id", "QE") != _QE_ID_BY_TEE[tee]:
                raise ValueError(
                    f"QE identity {qe_identity.get('id')!r} does not belong with "
                    f"{tee.upper()} TCB info (mixed collateral)"
                )
            key = CollateralKey(tee=tee, fmspc=fmspc, ca=ca)
            issued_at = max(
                _parse_intel_time(tcb_info.get("issueDate"), "tcbInfo.issueDate"),
                _parse_intel_time(qe_identity.get("issueDate"), "qeIdentity.issueDate"),
                pck_crl.this_update,
                root_crl.this_update,
            )
            next_update = min(
                _parse_intel_time(tcb_info.get("nextUpdate"), "tcbInfo.nextUpdate"),
                _parse_intel_time(qe_identity.get("nextUpdate"), "qeIdentity.nextUpdate"),
                pck_crl.next_update,
                root_crl.next_update,
                *(chain.not_after for chain in chains),
            )
            qvl = dcap_qvl.QuoteCollateralV3.from_json(json.dumps(fields))
        except (ValueError, TypeError, ConfigError) as exc:
            raise CollateralError(f"{source}: collateral is malformed: {exc}") from exc
        return cls(
            key=key,
            issued_at=issued_at,
            next_update=next_update,
            source=source,
            json_text=json.dumps(fields, indent=1),
            qvl=qvl,
        )

    def is_stale(self, now: datetime) -> bool:
        return _aware(now) >= self.next_update

    def require_fresh(self, now: datetime) -> Collateral:
        """Return self if usable at ``now``; else raise :class:`CollateralError` (stale)."""
        now = _aware(now)
        if now >= self.next_update:
            raise CollateralError(
                f"collateral for {self.key} from {self.source} expired at "
                f"{_iso(self.next_update)} (verifier time {_iso(now)}); it is stale and is not "
                "accepted: fetch current collateral (a PCCS URL refreshes it automatically)",
                stale=True,
            )
        if now < self.issued_at:
            raise CollateralError(
                f"collateral for {self.key} from {self.source} was issued at "
                f"{_iso(self.issued_at)}, after the verifier time {_iso(now)}; check the clock"
            )
        return self


@runtime_checkable
class CollateralSource(Protocol):
    """Where a :class:`~sealtorch.attestation.DcapVerifier` gets collateral."""

    def collateral_for(self, key: CollateralKey, *, now: datetime) -> Collateral:
        """Collateral for ``key``; raises :class:`CollateralError` (``stale=True`` if only
        expired collateral is available)."""
        ...


def _read_collateral(path: Path) -> Collateral:
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_COLLATERAL_SIZE + 1)
    except FileNotFoundError as exc:
        raise CollateralError(f"collateral file {path} does not exist") from exc
    except OSError as exc:
        raise CollateralError(f"cannot read collateral file {path}: {exc.strerror}") from exc
    return Collateral.from_json(data, source=str(path))


class CollateralFile:
    """Collateral for one platform, from one dcap-qvl collateral JSON file (read once)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._collateral = _read_collateral(self.path)

    @property
    def collateral(self) -> Collateral:
        return self._collateral

    def collateral_for(self, key: CollateralKey, *, now: datetime) -> Collateral:
        del now  # a file is what it is; the verifier checks freshness
        if key != self._collateral.key:
            raise CollateralError(
                f"collateral file {self.path} is for {self._collateral.key}, but the quote "
                f"needs {key}; use the collateral of that platform (or a --collateral-dir / "
                "--pccs-url)"
            )
        return self._collateral

    def __repr__(self) -> str:
        return f"CollateralFile({str(self.path)!r}, key={self._collateral.key})"


class CollateralDirectory:
    """Offline collateral: every ``*.json`` file in a directory, indexed by its content.

    Each file is dcap-qvl collateral JSON; its (TEE, FMSPC, CA) is read from the file itself,
    so names do not matter (the PCCS cache writes ``sgx-<FMSPC>-<ca>.json``). When several files
    cover the same platform, the one with the latest ``nextUpdate`` wins. The directory is
    re-scanned when it changes (files added, replaced or removed). Unreadable files are skipped
    with a warning.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CollateralError(f"collateral directory {self.path} does not exist")
        self._lock = threading.Lock()
        self._index: dict[CollateralKey, Collateral] = {}
        self._stamp: tuple[int, ...] | None = None
        self._scan()

    def _dir_stamp(self) -> tuple[int, ...]:
        try:
            entries = sorted(self.path.glob("*.json"))
            return tuple(
                value
                for entry in entries
                for value in (hash(entry.name), entry.stat().st_mtime_ns, entry.stat().st_size)
            )
        except OSError:
            return ()

    def _scan(self) -> None:
        stamp = self._dir_stamp()
        index: dict[CollateralKey, Collateral] = {}
        for entry in sorted(self.path.glob("*.json")):
            try:
                collateral = _read_collateral(entry)
            except CollateralError as exc:
                _log.warning("skipping %s: %s", entry, exc)
                continue
            current = index.get(collateral.key)
            if current is None or collateral.next_update > current.next_update:
                index[collateral.key] = collateral
        self._index = index
        self._stamp = stamp

    @property
    def keys(self) -> tuple[CollateralKey, ...]:
        return tuple(self._index)

    def collateral_for(self, key: CollateralKey, *, now: datetime) -> Collateral:
        now = _aware(now)
        found = self._index.get(key)
        if found is None or found.is_stale(now):
            with self._lock:
                if self._dir_stamp() != self._stamp:
                    self._scan()
                found = self._index.get(key)
        if found is None:
            known = ", ".join(str(k) for k in self._index) or "none"
            raise CollateralError(
                f"no collateral for {key} in {self.path} (it has: {known}); add the file "
                f"(e.g. {key.filename}) or use a PCCS URL"
            )
        return found

    def __repr__(self) -> str:
        return f"CollateralDirectory({str(self.path)!r}, {len(self._index)} platform(s))"


def _raw_member(text: str, member: str) -> tuple[str, Any]:
    """The exact source text of a top-level member of a JSON object, and the parsed object.

    Intel signs the *exact bytes* of ``tcbInfo`` / ``enclaveIdentity`` as they appear in the
    response, so they must be cut out, never re-serialised.
    """
    decoder = json.JSONDecoder()
    whole = json.loads(text)
    if not isinstance(whole, dict) or member not in whole:
        raise ValueError(f"response has no {member!r}")
    index = 0
    length = len(text)

    def skip(i: int) -> int:
        while i < length and text[i] in " \t\r\n":
            i += 1
        return i

    index = skip(index)
    if text[index] != "{":
        raise ValueError("response is not a JSON object")
    index += 1
    while True:
        index = skip(index)
        name, index = decoder.raw_decode(text, index)
        index = skip(index)
        if text[index] != ":":
            raise ValueError("malformed JSON object")
        index = skip(index + 1)
        start = index
        _, index = decoder.raw_decode(text, index)
        if name == member:
            return text[start:index], whole
        index = skip(index)
        if text[index] != ",":
            raise ValueError(f"response has no {member!r}")
        index += 1


class PccsCollateral:
    """Collateral from a PCCS or Intel PCS (API v4), cached on disk and in memory.

    ``collateral_for`` never waits on the network while a fresh copy is cached (in memory or in
    ``cache_dir``). Within ``refresh_before`` of a copy's ``nextUpdate`` it starts a background
    refresh (at most one per platform at a time, and not more often than ``retry_after``) and
    keeps serving the cached copy. With no fresh copy it fetches synchronously; if that fails
    and only an expired copy exists, it raises :class:`CollateralError` with ``stale=True``.

    Endpoints, relative to the base URL (a trailing ``/sgx|tdx/certification/v4`` is ignored):
    ``/sgx/certification/v4/pckcrl?ca=<processor|platform>&encoding=der``,
    ``/<sgx|tdx>/certification/v4/tcb?fmspc=<FMSPC>``,
    ``/<sgx|tdx>/certification/v4/qe/identity?update=standard`` and, for a PCCS,
    ``/sgx/certification/v4/rootcacrl`` (hex or DER). For Intel's PCS, or when the PCCS has no
    ``rootcacrl``, the root CA CRL comes from ``root_ca_crl_url`` or else from the CRL
    distribution point of Intel's root certificate.

    Collateral is signed by Intel and verified by dcap-qvl against Intel's root, so the
    transport is not what protects it; TLS certificates are still verified (``verify``).
    """

    def __init__(
        self,
        url: str,
        *,
        cache_dir: str | os.PathLike[str],
        refresh_before: timedelta = timedelta(days=1),
        retry_after: timedelta = timedelta(minutes=5),
        timeout: float = 15.0,
        verify: bool | str = True,
        root_ca_crl_url: str | None = None,
        clock: Clock = system_clock,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"PCCS URL must be http(s)://host[:port][/path], not {url!r}")
        base = url.rstrip("/")
        for suffix in ("/sgx/certification/v4", "/tdx/certification/v4"):
            base = base.removesuffix(suffix)
        self.url = base
        self.cache_dir = Path(cache_dir)
        self.refresh_before = refresh_before
        self.retry_after = retry_after
        self._timeout = timeout
        self._verify = verify
        self._root_ca_crl_url = root_ca_crl_url
        self._clock = clock
        self._transport = transport
        self._lock = threading.Lock()
        self._memory: dict[CollateralKey, Collateral] = {}
        self._inflight: dict[CollateralKey, threading.Thread] = {}
        self._last_attempt: dict[CollateralKey, datetime] = {}
        #: Number of completed network fetches (for operators and tests).
        self.fetch_count = 0

    def __repr__(self) -> str:
        return f"PccsCollateral({self.url!r}, cache_dir={str(self.cache_dir)!r})"

    # -- the hot path ---------------------------------------------------------------------------

    def collateral_for(self, key: CollateralKey, *, now: datetime) -> Collateral:
        now = _aware(now)
        cached = self._memory.get(key)
        if cached is None or cached.is_stale(now):
            # First use in this process, or expired in memory: another process (a replica
            # sharing the cache directory) may have stored a fresher copy.
            cached = self._load_cached(key) or cached
        if cached is not None and not cached.is_stale(now):
            if now >= cached.next_update - self.refresh_before:
                self._schedule_refresh(key, now)
            return cached
        # No fresh copy: this request has to wait for the network.
        try:
            fetched = self.refresh(key)
        except CollateralError as exc:
            if cached is not None:
                raise CollateralError(
                    f"cached collateral for {key} expired at {_iso(cached.next_update)} and "
                    f"refreshing it from {self.url} failed: {exc}",
                    stale=True,
                ) from exc
            raise
        return fetched

    # -- refreshing -----------------------------------------------------------------------------

    def refresh(self, key: CollateralKey) -> Collateral:
        """Fetch ``key``'s collateral now, store it (disk and memory) and return it."""
        fetched = self._fetch(key)
        with self._lock:
            current = self._memory.get(key)
            if current is None or fetched.next_update >= current.next_update:
                self._store(fetched)
                self._memory[key] = fetched
                current = fetched
        return current

    def refresh_due(self, now: datetime | None = None) -> tuple[CollateralKey, ...]:
        """Platforms whose cached collateral is within ``refresh_before`` of expiry (or past)."""
        now = _aware(now or self._clock())
        return tuple(
            key
            for key, collateral in self._memory.items()
            if now >= collateral.next_update - self.refresh_before
        )

    def wait_for_refreshes(self, timeout: float | None = None) -> None:
        """Wait for background refreshes to finish (shutdown, tests)."""
        with self._lock:
            threads = list(self._inflight.values())
        for thread in threads:
            thread.join(timeout)

    def _schedule_refresh(self, key: CollateralKey, now: datetime) -> None:
        with self._lock:
            if key in self._inflight:
                return
            last = self._last_attempt.get(key)
            if last is not None and now - last < self.retry_after:
                return
            self._last_attempt[key] = now
            thread = threading.Thread(
                target=self._background_refresh,
                args=(key,),
                name=f"sealtorch-collateral-{key.fmspc}",
                daemon=True,
            )
            self._inflight[key] = thread
        thread.start()

    def _background_refresh(self, key: CollateralKey) -> None:
        try:
            # Another process (replica) may already have refreshed the shared cache.
            on_disk = self._load_cached(key, adopt=False)
            current = self._memory.get(key)
            if on_disk is not None and (
                current is None or on_disk.next_update > current.next_update
            ):
                with self._lock:
                    self._memory[key] = on_disk
                if self._clock() < on_disk.next_update - self.refresh_before:
                    return
            self.refresh(key)
            _log.info("refreshed collateral for %s from %s", key, self.url)
        except CollateralError as exc:
            _log.warning("background refresh of collateral for %s failed: %s", key, exc)
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    # -- disk cache -----------------------------------------------------------------------------

    def _load_cached(self, key: CollateralKey, *, adopt: bool = True) -> Collateral | None:
        path = self.cache_dir / key.filename
        if not path.is_file():
            return None
        try:
            collateral = _read_collateral(path)
        except CollateralError as exc:
            _log.warning("ignoring damaged cached collateral %s: %s", path, exc)
            return None
        if collateral.key != key:
            _log.warning("ignoring cached collateral %s: it is for %s", path, collateral.key)
            return None
        if adopt:
            with self._lock:
                current = self._memory.get(key)
                if current is None or collateral.next_update > current.next_update:
                    self._memory[key] = collateral
                return self._memory[key]
        return collateral

    def _store(self, collateral: Collateral) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".collateral-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(collateral.json_text + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                Path(tmp).chmod(0o644)  # collateral is public data
                Path(tmp).replace(self.cache_dir / collateral.key.filename)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            # The in-memory copy still serves this process; say so and carry on.
            _log.warning("cannot write collateral cache in %s: %s", self.cache_dir, exc.strerror)

    # -- network --------------------------------------------------------------------------------

    def _client(self) -> httpx.Client:
        import httpx

        return httpx.Client(
            timeout=self._timeout,
            verify=self._verify,
            transport=self._transport,
            follow_redirects=True,
            headers={"User-Agent": "sealtorch-collateral/1"},
        )

    def _fetch(self, key: CollateralKey) -> Collateral:
        import httpx

        def url(tee: str, path: str) -> str:
            return f"{self.url}/{tee}/certification/v4/{path}"

        try:
            with self._client() as client:
                pck = self._get(client, url("sgx", f"pckcrl?ca={key.ca}&encoding=der"))
                tcb = self._get(client, url(key.tee, f"tcb?fmspc={key.fmspc}"))
                qe = self._get(client, url(key.tee, "qe/identity?update=standard"))
                root_crl = self._root_ca_crl(client, qe)
        except httpx.HTTPError as exc:
            raise CollateralError(
                f"cannot fetch collateral for {key} from {self.url}: {exc}"
            ) from exc
        try:
            tcb_text, tcb_obj = _raw_member(tcb.text, "tcbInfo")
            qe_text, qe_obj = _raw_member(qe.text, "enclaveIdentity")
            fields = {
                "pck_crl_issuer_chain": _header(pck, "SGX-PCK-CRL-Issuer-Chain"),
                "root_ca_crl": root_crl.hex(),
                "pck_crl": crl_to_der(pck.content).hex(),
                "tcb_info_issuer_chain": _header(
                    tcb, "TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"
                ),
                "tcb_info": tcb_text,
                "tcb_info_signature": _hex_signature(tcb_obj),
                "qe_identity_issuer_chain": _header(qe, "SGX-Enclave-Identity-Issuer-Chain"),
                "qe_identity": qe_text,
                "qe_identity_signature": _hex_signature(qe_obj),
            }
        except (ValueError, KeyError, IndexError) as exc:
            raise CollateralError(
                f"{self.url} returned malformed collateral for {key}: {exc}"
            ) from exc
        collateral = Collateral.from_dict(fields, source=self.url)
        if collateral.key != key:
            raise CollateralError(
                f"{self.url} returned collateral for {collateral.key} when asked for {key}"
            )
        self.fetch_count += 1
        return collateral

    def _get(self, client: httpx.Client, url: str) -> httpx.Response:
        response = client.get(url)
        if response.status_code != 200:
            raise CollateralError(f"GET {url} answered HTTP {response.status_code}")
        if len(response.content) > _MAX_COLLATERAL_SIZE:
            raise CollateralError(f"GET {url} returned more than 1 MiB")
        return response

    def _root_ca_crl(self, client: httpx.Client, qe: httpx.Response) -> bytes:
        candidates: list[str] = []
        if self._root_ca_crl_url:
            candidates.append(self._root_ca_crl_url)
        else:
            if not self.url.startswith(INTEL_PCS_URL):
                candidates.append(f"{self.url}/sgx/certification/v4/rootcacrl")
            try:
                chain = chain_info(_header(qe, "SGX-Enclave-Identity-Issuer-Chain"))
            except ValueError:
                chain = None
            if chain is not None and chain.root_crl_url:
                candidates.append(chain.root_crl_url)
        errors = []
        for candidate in candidates:
            try:
                return crl_to_der(self._get(client, candidate).content)
            except (CollateralError, ValueError) as exc:
                errors.append(str(exc))
        raise CollateralError(
            "cannot fetch Intel's root CA CRL: " + ("; ".join(errors) or "no URL")
        )


def _header(response: httpx.Response, *names: str) -> str:
    for name in names:
        value = response.headers.get(name)
        if value:
            return urllib.parse.unquote(value)
    raise ValueError(f"{response.request.url} has no {names[0]} header")


def _hex_signature(obj: Mapping[str, Any]) -> str:
    signature = obj.get("signature")
    if not isinstance(signature, str):
        raise ValueError("response has no signature")
    bytes.fromhex(signature)
    return signature.lower()
