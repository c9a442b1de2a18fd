"""Key cache settings: an optional TOML config file, overridden by command-line options.

Precedence, highest first: options (``sealtorch keycache serve --socket ...``), the config file
(``--config keycache.toml``), built-in defaults. Relative paths in the file are resolved against
the file's directory. The schema (``docs/keycache.md``)::

    [keyserver]
    url = "https://keys.example.com:8443"  # or unix:///PATH for a key server on this host;
    # several replicas: url = ["https://ks-a:8443", "https://ks-b:8443"] (failover in order)
    ca = "keyserver-ca.crt"
    # the key server's release-signing public key(s) (two during a rollover); required
    pubkeys = ["sealtorch-release-key-v1:..."]
    models = ["resnet50"]  # omit: every model this cache may hold
    timeout_seconds = 10
    hpke_suite = "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM"

    [tee]  # the cache's own TEE
    type = "gramine"  # sim | gramine | tdx | snp
    sim_key = "sim-attestation.key"  # sim only
    root = "/dev/attestation"  # gramine / tdx / snp device root (tests use a fake one)

    [listen]
    socket = "/run/sealtorch/keycache.sock"
    socket_mode = "0600"  # "0660" with socket_group
    socket_group = "sealtorch"
    tcp = "127.0.0.1:9443"  # optional, loopback only
    tls_cert = "cache.crt"  # HTTPS on the TCP listener (recommended)
    tls_key = "cache.key"
    metrics = "127.0.0.1:9464"  # /metrics, /healthz, /readyz, status only
    header_timeout_seconds = 10  # a request's headers (and a TLS handshake) take at most this
    body_timeout_seconds = 30  # longest pause in a request body
    keep_alive_timeout_seconds = 30  # an idle connection is closed after this

    [local]  # how local enclaves are verified
    sim_trusted_keys = ["ed25519:..."]
    pccs_url = "https://pccs.internal:8081/sgx/certification/v4"
    collateral_path = "collateral/"
    collateral_cache_dir = "collateral-cache/"
    nonce_ttl_seconds = 30
    session_seconds = 600
    max_request_bytes = 65536

    [leases]
    refresh_seconds = 300  # longest time a revocation takes to arrive
    renew_fraction = 0.5  # renew when this much of a lease has passed
    backoff_initial_seconds = 1
    backoff_max_seconds = 60

    [persistence]
    path = "/var/lib/sealtorch/keycache.sealed"  # omit: keys live in memory only
    sim_sealing_key = "keycache-sealing.key"  # sim only: the host's sealing key file

Nothing here opens a socket or a key: :func:`load_settings` returns a frozen
:class:`KeyCacheSettings` that the CLI passes on.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import Field, ValidationError, field_validator

from sealtorch._listen import ReadTimeouts
from sealtorch._settings import Section as _Section
from sealtorch._settings import (
    VerifierSection,
    file_sources,
    format_errors,
    read_toml,
    resolve_path,
)
from sealtorch.errors import ConfigError
from sealtorch.protocol import (
    DEFAULT_HPKE_SUITE,
    HPKE_SUITES,
    MODEL_ID_PATTERN,
    ReleasePublicKey,
    TrustedReleaseKeys,
)

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "KeyCacheSettings",
    "TeeName",
    "load_settings",
    "parse_host_port",
]

TeeName = Literal["sim", "gramine", "tdx", "snp"]
DEFAULT_MAX_REQUEST_BYTES: Final = 64 * 1024
_MODEL_ID = re.compile(MODEL_ID_PATTERN)


class _KeyServer(_Section):
    #: One key server, or several (a list, or commas): replicas to fail over between.
    url: str | tuple[str, ...] | None = None
    ca: str | None = None
    pubkeys: tuple[str, ...] = ()
    models: tuple[str, ...] | None = None
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 10.0
    hpke_suite: str = DEFAULT_HPKE_SUITE

    @field_validator("models")
    @classmethod
    def _model_ids(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        bad = [m for m in value if not _MODEL_ID.fullmatch(m)]
        if bad:
            raise ValueError(f"not valid model ids: {', '.join(map(repr, bad[:5]))}")
        if len(set(value)) != len(value):
            raise ValueError("model ids must not repeat")
        if not value:
            raise ValueError("an empty list holds nothing; omit models to hold every model")
        return value

    @field_validator("hpke_suite")
    @classmethod
    def _suite(cls, value: str) -> str:
        if value not in HPKE_SUITES:
            raise ValueError(f"must be one of: {', '.join(HPKE_SUITES)}")
        return value


class _Tee(_Section):
    type: TeeName | None = None
    sim_key: str | None = None
    root: str | None = None


class _Listen(_Section):
    socket: str | None = None
    socket_mode: str | None = None
    socket_group: str | None = None
    tcp: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics: str | None = None
    header_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 10.0
    body_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    keep_alive_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0


class _Local(VerifierSection):
    #: Start although ``sim_trusted_keys`` is set (development only).
    allow_simulated_tee_insecure: bool = False
    nonce_ttl_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    session_seconds: Annotated[float, Field(ge=0, le=86400)] = 600.0
    max_request_bytes: Annotated[int, Field(ge=4096, le=1024 * 1024)] = DEFAULT_MAX_REQUEST_BYTES


class _Leases(_Section):
    refresh_seconds: Annotated[float, Field(gt=0, le=7 * 86400)] = 300.0
    renew_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5
    backoff_initial_seconds: Annotated[float, Field(gt=0, le=3600)] = 1.0
    backoff_max_seconds: Annotated[float, Field(gt=0, le=86400)] = 60.0


class _Persistence(_Section):
    path: str | None = None
    sim_sealing_key: str | None = None


class _ConfigFile(_Section):
    keyserver: _KeyServer = _KeyServer()
    tee: _Tee = _Tee()
    listen: _Listen = _Listen()
    local: _Local = _Local()
    leases: _Leases = _Leases()
    persistence: _Persistence = _Persistence()


@dataclass(frozen=True, kw_only=True)
class KeyCacheSettings:
    """Everything a key cache process needs, resolved (absolute paths, typed durations)."""

    keyserver_url: str
    #: The key server's release-signing public keys this cache pins (``--keyserver-pubkey``).
    keyserver_pubkeys: tuple[str, ...] = ()
    keyserver_ca: Path | None = None
    #: Model ids to hold; ``None`` holds every model the key server releases to this cache.
    models: tuple[str, ...] | None = None
    keyserver_timeout: float = 10.0
    hpke_suite: str = DEFAULT_HPKE_SUITE
    tee: TeeName = "sim"
    sim_key: Path | None = None
    tee_root: Path | None = None
    socket_path: Path | None = None
    socket_mode: int = 0o600
    socket_group: str | None = None
    tcp: tuple[str, int] | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics: tuple[str, int] | None = None
    #: How long a client of any listener may take to send a request.
    read_timeouts: ReadTimeouts = field(default_factory=ReadTimeouts)
    local_sim_trusted_keys: tuple[str, ...] = ()
    #: ``keycache serve`` refuses to start with ``local_sim_trusted_keys`` unless this is set.
    local_allow_simulated_tee_insecure: bool = False
    local_pccs_url: str | None = None
    local_collateral_path: Path | None = None
    local_collateral_cache_dir: Path | None = None
    nonce_ttl: timedelta = timedelta(seconds=30)
    session_duration: timedelta = timedelta(minutes=10)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    refresh_interval: timedelta = timedelta(minutes=5)
    renew_fraction: float = 0.5
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    persist_path: Path | None = None
    sim_sealing_key: Path | None = None
    #: Where each setting came from (``"default"``, ``"file"``, ``"option"``).
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.trusted_release_keys()  # ConfigError when none is pinned, or one is malformed
        if self.socket_path is None and self.tcp is None:
            raise ConfigError(
                "the key cache needs somewhere to listen: give --socket PATH (a Unix socket "
                "for local enclaves) and/or --tcp 127.0.0.1:PORT"
            )
        if self.socket_mode & 0o007:
            raise ConfigError(
                f"socket mode {self.socket_mode:04o} lets every user on the host connect; use "
                "0600 (the cache's user only) or 0660 with --socket-group GROUP"
            )
        if self.socket_mode & 0o070 and self.socket_group is None:
            raise ConfigError(
                f"socket mode {self.socket_mode:04o} grants a group access: name it with "
                "--socket-group GROUP"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_cert is not None and self.tcp is None:
            raise ConfigError("--tls-cert/--tls-key apply to the TCP listener: give --tcp too")
        if self.backoff_max < self.backoff_initial:
            raise ConfigError("leases.backoff_max_seconds must be >= backoff_initial_seconds")
        if self.persist_path is not None and self.tee in ("tdx", "snp"):
            raise ConfigError(
                f"{self.tee.upper()} has no platform sealing key, so the key cache cannot persist "
                "keys across restarts there; remove --persist (keys are fetched again at start)"
            )
        if not self.local_sim_trusted_keys and not (
            self.local_pccs_url or self.local_collateral_path
        ):
            raise ConfigError(
                "no verifier for local enclaves: give --trust-sim-key (sim) and/or "
                "--pccs-url / --collateral (SGX, TDX), so the cache can check who asks for keys"
            )

    def with_overrides(self, **changes: Any) -> KeyCacheSettings:
        return replace(self, **changes)

    def trusted_release_keys(self) -> TrustedReleaseKeys:
        """The pinned key server keys (ConfigError when none is pinned)."""
        if not self.keyserver_pubkeys:
            raise ConfigError(
                "the key cache pins no key server release-signing public key, so it could not "
                "tell the key server's keys from a fake's: give --keyserver-pubkey KEY "
                "([keyserver] pubkeys); `sealtorch keyserver signing-key show DATA_DIR` on the "
                "key server prints it"
            )
        return TrustedReleaseKeys(ReleasePublicKey.parse(k) for k in self.keyserver_pubkeys)

    @property
    def tcp_tls(self) -> bool:
        return self.tls_cert is not None

    def describe(self) -> dict[str, Any]:
        """A secret-free summary for the start-up log."""
        return {
            "keyserver": self.keyserver_url,
            "keyserver_pubkeys": [ReleasePublicKey.parse(k).key_id for k in self.keyserver_pubkeys],
            "models": list(self.models) if self.models is not None else "all",
            "tee": self.tee,
            "socket": str(self.socket_path) if self.socket_path else None,
            "socket_mode": f"{self.socket_mode:04o}",
            "socket_group": self.socket_group,
            "tcp": _host_port_text(self.tcp) if self.tcp else None,
            "tls": self.tcp_tls,
            "metrics": _host_port_text(self.metrics) if self.metrics else None,
            "refresh_seconds": self.refresh_interval.total_seconds(),
            "persistence": str(self.persist_path) if self.persist_path else None,
            "local_verifiers": {
                "sim_trusted_keys": len(self.local_sim_trusted_keys),
                "allow_simulated_tee_insecure": self.local_allow_simulated_tee_insecure,
                "pccs_url": self.local_pccs_url,
                "collateral_path": (
                    str(self.local_collateral_path) if self.local_collateral_path else None
                ),
            },
        }


def _host_port_text(value: tuple[str, int]) -> str:
    host, port = value
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_port(text: str, *, what: str, loopback_only: bool = True) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) → ``(host, port)``; port 0 picks a free one."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", text.strip())
    if match is None:
        raise ConfigError(f"{what} {text!r}: write HOST:PORT, e.g. 127.0.0.1:9443 or [::1]:9443")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ConfigError(f"{what} {text!r}: the port must be 0..65535")
    if loopback_only and not _is_loopback(host):
        raise ConfigError(
            f"{what} {text!r}: the key cache serves this host only; listen on a loopback "
            "address (127.0.0.1, ::1 or localhost)"
        )
    return host, port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_mode(text: str) -> int:
    if not re.fullmatch(r"0?[0-7]{3}", text.strip()):
        raise ConfigError(f"socket mode {text!r}: write it in octal, e.g. 0600 or 0660")
    return int(text.strip(), 8)


def load_settings(
    config: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> KeyCacheSettings:
    """Settings from the TOML file ``config`` (optional) and ``overrides``
    (``{section: {key: value}}``, from command-line options; ``None`` values are ignored).
    Relative paths in the file are resolved against its directory, in options against the
    working directory."""
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    base: Path | None = None
    source = "the command line"
    if config is not None:
        path = Path(config).absolute()
        base = path.parent
        raw = read_toml(path, missing=f"key cache config {path} does not exist")
        source = str(path)
        sources.update(file_sources(raw))
    option_paths: set[str] = set()
    merged: dict[str, Any] = {
        name: dict(value) if isinstance(value, dict) else value for name, value in raw.items()
    }
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            if value is None or value == ():
                continue
            bucket = merged.setdefault(section, {})
            if not isinstance(bucket, dict):
                raise ConfigError(f"{source}: [{section}] must be a table")
            bucket[key] = value
            sources[f"{section}.{key}"] = "option"
            option_paths.add(f"{section}.{key}")
    try:
        parsed = _ConfigFile.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source, docs="docs/keycache.md")) from exc

    def path_of(section: str, key: str, value: str | None) -> Path | None:
        """Relative paths from the file against its directory, from options against the
        working directory."""
        from_file = base is not None and f"{section}.{key}" not in option_paths
        return resolve_path(base if from_file else Path.cwd(), value)

    ks, tee, listen, local, leases, persist = (
        parsed.keyserver,
        parsed.tee,
        parsed.listen,
        parsed.local,
        parsed.leases,
        parsed.persistence,
    )
    if not ks.url:
        raise ConfigError(
            "no key server: give --keyserver https://HOST:PORT (or [keyserver] url in the "
            "config file)"
        )
    if tee.type is None:
        raise ConfigError("give the cache's own TEE with --tee sim|gramine|tdx|snp ([tee] type)")
    mode = _parse_mode(listen.socket_mode) if listen.socket_mode else None
    if mode is None:
        mode = 0o660 if listen.socket_group else 0o600
    return KeyCacheSettings(
        keyserver_url=ks.url if isinstance(ks.url, str) else ",".join(ks.url),
        keyserver_pubkeys=ks.pubkeys,
        keyserver_ca=path_of("keyserver", "ca", ks.ca),
        models=ks.models,
        keyserver_timeout=ks.timeout_seconds,
        hpke_suite=ks.hpke_suite,
        tee=tee.type,
        sim_key=path_of("tee", "sim_key", tee.sim_key),
        tee_root=path_of("tee", "root", tee.root),
        socket_path=path_of("listen", "socket", listen.socket),
        socket_mode=mode,
        socket_group=listen.socket_group,
        tcp=parse_host_port(listen.tcp, what="tcp") if listen.tcp else None,
        tls_cert=path_of("listen", "tls_cert", listen.tls_cert),
        tls_key=path_of("listen", "tls_key", listen.tls_key),
        metrics=parse_host_port(listen.metrics, what="metrics") if listen.metrics else None,
        read_timeouts=ReadTimeouts(
            header=listen.header_timeout_seconds,
            body=listen.body_timeout_seconds,
            keep_alive=listen.keep_alive_timeout_seconds,
        ),
        local_sim_trusted_keys=local.sim_trusted_keys,
        local_allow_simulated_tee_insecure=local.allow_simulated_tee_insecure,
        local_pccs_url=local.pccs_url,
        local_collateral_path=path_of("local", "collateral_path", local.collateral_path),
        local_collateral_cache_dir=path_of(
            "local", "collateral_cache_dir", local.collateral_cache_dir
        ),
        nonce_ttl=timedelta(seconds=local.nonce_ttl_seconds),
        session_duration=timedelta(seconds=local.session_seconds),
        max_request_bytes=local.max_request_bytes,
        refresh_interval=timedelta(seconds=leases.refresh_seconds),
        renew_fraction=leases.renew_fraction,
        backoff_initial=leases.backoff_initial_seconds,
        backoff_max=leases.backoff_max_seconds,
        persist_path=path_of("persistence", "path", persist.path),
        sim_sealing_key=path_of("persistence", "sim_sealing_key", persist.sim_sealing_key),
        sources=sources,
    )
