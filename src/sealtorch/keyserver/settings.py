"""Key server settings: the data directory's ``keyserver.toml``, environment variables, options.

Precedence, highest first: command-line options (``sealtorch keyserver serve --port ...``),
environment variables, the config file, built-in defaults. Every config file key has an
environment variable named ``SEALTORCH_KEYSERVER_<SECTION>_<KEY>`` in upper case, e.g.
``[database] url`` is ``SEALTORCH_KEYSERVER_DATABASE_URL`` and ``[server] port`` is
``SEALTORCH_KEYSERVER_SERVER_PORT``; list values are comma-separated. Relative paths (and a
relative ``sqlite:///`` database path) are resolved against the data directory.

Nothing here opens a database, a key or a socket: :func:`load_settings` returns a frozen
:class:`KeyServerSettings` that ``main()`` passes to ``create_app`` (see ``docs/keyserver.md``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import Field, ValidationError

from sealtorch._listen import ReadTimeouts
from sealtorch._settings import Section as _Section
from sealtorch._settings import (
    VerifierSection,
    check_environment,
    file_sources,
    format_errors,
    read_toml,
    resolve_path,
)
from sealtorch.errors import ConfigError
from sealtorch.keyserver.masterkey import (
    PIN_ENV,
    SOFTHSM2_MODULE,
    FileMasterKeyConfig,
    MasterKeyConfig,
    Pkcs11MasterKeyConfig,
)
from sealtorch.keyserver.signingkey import (
    DEFAULT_KEY_LABEL,
    SIGNING_KEY_FILE,
    FileSigningKeyConfig,
    Pkcs11SigningKeyConfig,
    SigningKeyConfig,
)

__all__ = [
    "CONFIG_FILE",
    "ENV_PREFIX",
    "KeyServerSettings",
    "config_env_names",
    "load_settings",
    "render_config",
]

CONFIG_FILE: Final = "keyserver.toml"
ENV_PREFIX: Final = "SEALTORCH_KEYSERVER_"
DEFAULT_PORT: Final = 8443
#: Largest request body accepted by default (evidence included), as in ``docs/protocol.md``.
DEFAULT_MAX_REQUEST_BYTES: Final = 64 * 1024


# -- the config file schema --------------------------------------------------------------------


class _Server(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = DEFAULT_PORT
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    #: Seconds to let in-flight requests finish on shutdown.
    graceful_timeout: Annotated[float, Field(gt=0, le=600)] = 10.0
    #: Seconds a client may take to send a request's headers, pause in a body, stay idle.
    header_timeout: Annotated[float, Field(gt=0, le=3600)] = 10.0
    body_timeout: Annotated[float, Field(gt=0, le=3600)] = 30.0
    keep_alive_timeout: Annotated[float, Field(gt=0, le=3600)] = 30.0


class _Database(_Section):
    url: str = "sqlite:///keyserver.db"
    sqlite_synchronous: Literal["FULL", "NORMAL", "EXTRA"] = "FULL"
    busy_timeout: Annotated[float, Field(gt=0, le=600)] = 10.0
    pool_size: Annotated[int, Field(ge=1, le=200)] = 10


class _MasterKey(_Section):
    kind: Literal["file", "pkcs11"] = "file"
    path: str = "master.key"
    module: str = SOFTHSM2_MODULE
    token_label: str | None = None
    key_label: str = "sealtorch-master-key"
    pin_env: str = PIN_ENV


class _SigningKey(_Section):
    kind: Literal["file", "pkcs11"] = "file"
    path: str = SIGNING_KEY_FILE
    module: str = SOFTHSM2_MODULE
    token_label: str | None = None
    key_label: str = DEFAULT_KEY_LABEL
    pin_env: str = PIN_ENV


class _Tls(_Section):
    enabled: bool = True
    cert: str = "tls/server.crt"
    key: str = "tls/server.key"
    ca: str | None = "tls/ca.crt"


class _Attestation(VerifierSection):
    """How the evidence of release requests is verified."""

    #: Start although ``sim_trusted_keys`` is set (development only: sim evidence is signed by
    #: a key on a host, not by hardware).
    allow_simulated_tee_insecure: bool = False


class _Release(_Section):
    nonce_ttl_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    lease_seconds: Annotated[float, Field(gt=0, le=30 * 86400)] = 3600.0
    session_seconds: Annotated[float, Field(ge=0, le=30 * 86400)] = 4 * 3600.0
    max_request_bytes: Annotated[int, Field(ge=4096, le=16 * 1024 * 1024)] = (
        DEFAULT_MAX_REQUEST_BYTES
    )
    #: Threads per worker for blocking work: DCAP verification, PKCS#11 master key operations,
    #: the admin API and health checks. (Sim evidence is verified on the event loop; release
    #: decisions are committed by the store's group-commit thread.)
    verify_threads: Annotated[int, Field(ge=1, le=256)] = 2


class _Audit(_Section):
    #: Seconds between signed audit checkpoints written to the log (0 = never), for log
    #: shipping to carry off the host; ``sealtorch admin audit checkpoint`` fetches one on demand.
    checkpoint_log_seconds: Annotated[float, Field(ge=0, le=86400)] = 300.0


class _ConfigFile(_Section):
    server: _Server = _Server()
    database: _Database = _Database()
    master_key: _MasterKey = _MasterKey()
    signing_key: _SigningKey = _SigningKey()
    tls: _Tls = _Tls()
    attestation: _Attestation = _Attestation()
    release: _Release = _Release()
    audit: _Audit = _Audit()


_SECTIONS: Final[dict[str, type[_Section]]] = {
    name: info.annotation  # type: ignore[misc]
    for name, info in _ConfigFile.model_fields.items()
}


def config_env_names() -> dict[str, tuple[str, str]]:
    """Every environment variable the settings read: name -> (section, key)."""
    return {
        f"{ENV_PREFIX}{section.upper()}_{key.upper()}": (section, key)
        for section, model in _SECTIONS.items()
        for key in model.model_fields
    }


# -- the settings object -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class KeyServerSettings:
    """Everything a key server process needs, resolved (absolute paths, typed durations)."""

    data_dir: Path | None = None
    database_url: str
    sqlite_synchronous: str = "FULL"
    busy_timeout: float = 10.0
    pool_size: int = 10
    master_key: MasterKeyConfig
    #: The release-signing key; ``None`` only when ``create_app`` is given an open one.
    signing_key: SigningKeyConfig | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    workers: int = 1
    graceful_timeout: float = 10.0
    #: How long a client may take to send a request.
    read_timeouts: ReadTimeouts = field(default_factory=ReadTimeouts)
    sim_trusted_keys: tuple[str, ...] = ()
    #: The server refuses to start with ``sim_trusted_keys`` unless this is set.
    allow_simulated_tee_insecure: bool = False
    pccs_url: str | None = None
    collateral_path: Path | None = None
    collateral_cache_dir: Path | None = None
    nonce_ttl: timedelta = timedelta(seconds=60)
    lease_duration: timedelta = timedelta(hours=1)
    session_duration: timedelta = timedelta(hours=4)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    verify_threads: int = 2
    #: How often each worker logs a signed audit checkpoint (``None``: never).
    audit_checkpoint_interval: timedelta | None = timedelta(minutes=5)
    #: Where each setting came from (``"default"``, ``"file"``, ``"env:NAME"``, ``"option"``).
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None

    def store_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`~sealtorch.keyserver.store.open_store`."""
        options: dict[str, Any] = {"busy_timeout": self.busy_timeout}
        if self.database_url.startswith("sqlite"):
            options["sqlite_synchronous"] = self.sqlite_synchronous
        else:
            options["pool_size"] = self.pool_size
        return options

    def with_overrides(self, **changes: Any) -> KeyServerSettings:
        """A copy with some fields replaced (tests, command-line options)."""
        return replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """A secret-free summary for logs and ``keyserver serve`` start-up output."""
        return {
            "data_dir": str(self.data_dir) if self.data_dir else None,
            "database": _redact_url(self.database_url),
            "master_key": (
                "file"
                if isinstance(self.master_key, FileMasterKeyConfig)
                else f"pkcs11:{self.master_key.token_label}/{self.master_key.key_label}"
            ),
            "signing_key": (
                f"pkcs11:{self.signing_key.token_label}/{self.signing_key.key_label}"
                if isinstance(self.signing_key, Pkcs11SigningKeyConfig)
                else "file"
                if self.signing_key is not None
                else None
            ),
            "tls": self.tls_enabled,
            "workers": self.workers,
            "evidence": {
                "sim_trusted_keys": len(self.sim_trusted_keys),
                "allow_simulated_tee_insecure": self.allow_simulated_tee_insecure,
                "pccs_url": self.pccs_url,
                "collateral_path": str(self.collateral_path) if self.collateral_path else None,
            },
        }


def _redact_url(url: str) -> str:
    """A database URL without its password."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.partition(":")[0]
    return f"{scheme}://{user}:***@{host}"


def _coerce_env(model: type[_Section], key: str, text: str) -> Any:
    annotation = str(model.model_fields[key].annotation)
    if "tuple" in annotation:
        return tuple(item.strip() for item in text.split(",") if item.strip())
    if text == "" and "None" in annotation:
        return None
    return text


def _resolve_database(base: Path | None, url: str) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix):
        rest = url[len(prefix) :]
        if rest and not rest.startswith("/") and base is not None and ":memory:" not in rest:
            return prefix + str((base / rest).absolute())
    return url


def load_settings(
    data_dir: str | os.PathLike[str] | None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> KeyServerSettings:
    """Settings of the key server in ``data_dir`` (its ``keyserver.toml``), environment
    variables (``environ``, default ``os.environ``) and ``overrides`` (``{section: {key: value}}``,
    command-line options). ``data_dir=None`` reads no file (everything from the environment)."""
    env = os.environ if environ is None else environ
    base = Path(data_dir).absolute() if data_dir is not None else None
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if base is not None:
        config_path = base / CONFIG_FILE
        raw = read_toml(
            config_path,
            missing=f"{config_path} does not exist; create a key server data directory with "
            "`sealtorch keyserver init DIR`",
        )
        source = str(config_path)
        sources.update(file_sources(raw))
    else:
        source = "the environment"
    merged: dict[str, dict[str, Any]] = {
        name: dict(raw.get(name) or {}) if isinstance(raw.get(name, {}), dict) else raw[name]
        for name in _SECTIONS
    }
    for name in raw:
        if name not in _SECTIONS:
            merged[name] = raw[name]  # reported as an unknown section below
    for variable, (section, key) in config_env_names().items():
        if variable in env:
            merged[section][key] = _coerce_env(_SECTIONS[section], key, env[variable])
            sources[f"{section}.{key}"] = f"env:{variable}"
    # An option never hides an invalid value in the file or the environment (`--port 8443`
    # with `port = "x"` in keyserver.toml is still an error): check them before the options.
    try:
        config = _ConfigFile.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source, docs="docs/keyserver.md")) from exc
    pin_envs = {config.master_key.pin_env, config.signing_key.pin_env}
    check_environment(
        env,
        prefix=ENV_PREFIX,
        known={*config_env_names(), *pin_envs},
        docs="docs/keyserver.md",
    )
    if any(value is not None for values in (overrides or {}).values() for value in values.values()):
        for section, values in (overrides or {}).items():
            for key, value in values.items():
                if value is not None:
                    merged.setdefault(section, {})[key] = value
                    sources[f"{section}.{key}"] = "option"
        try:
            config = _ConfigFile.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(format_errors(exc, "the options", docs="docs/keyserver.md")) from exc
    return _build(config, base, sources)


def _build(config: _ConfigFile, base: Path | None, sources: dict[str, str]) -> KeyServerSettings:
    master: MasterKeyConfig
    if config.master_key.kind == "pkcs11":
        if not config.master_key.token_label:
            raise ConfigError(
                "master_key.kind = 'pkcs11' needs master_key.token_label (the HSM token)"
            )
        master = Pkcs11MasterKeyConfig(
            token_label=config.master_key.token_label,
            key_label=config.master_key.key_label,
            module=config.master_key.module,
            pin_env=config.master_key.pin_env,
        )
    else:
        path = resolve_path(base, config.master_key.path)
        if path is None:  # pragma: no cover - the schema gives a default
            raise ConfigError("master_key.path is required for a file master key")
        master = FileMasterKeyConfig(path=path)
    tls = config.tls
    release = config.release
    return KeyServerSettings(
        signing_key=_signing_key(config.signing_key, base),
        data_dir=base,
        database_url=_resolve_database(base, config.database.url),
        sqlite_synchronous=config.database.sqlite_synchronous,
        busy_timeout=config.database.busy_timeout,
        pool_size=config.database.pool_size,
        master_key=master,
        tls_cert=resolve_path(base, tls.cert) if tls.enabled else None,
        tls_key=resolve_path(base, tls.key) if tls.enabled else None,
        tls_ca=resolve_path(base, tls.ca) if tls.enabled else None,
        host=config.server.host,
        port=config.server.port,
        workers=config.server.workers,
        graceful_timeout=config.server.graceful_timeout,
        read_timeouts=ReadTimeouts(
            header=config.server.header_timeout,
            body=config.server.body_timeout,
            keep_alive=config.server.keep_alive_timeout,
        ),
        sim_trusted_keys=config.attestation.sim_trusted_keys,
        allow_simulated_tee_insecure=config.attestation.allow_simulated_tee_insecure,
        pccs_url=config.attestation.pccs_url,
        collateral_path=resolve_path(base, config.attestation.collateral_path),
        collateral_cache_dir=resolve_path(base, config.attestation.collateral_cache_dir),
        nonce_ttl=timedelta(seconds=release.nonce_ttl_seconds),
        lease_duration=timedelta(seconds=release.lease_seconds),
        session_duration=timedelta(seconds=release.session_seconds),
        max_request_bytes=release.max_request_bytes,
        verify_threads=release.verify_threads,
        audit_checkpoint_interval=(
            timedelta(seconds=config.audit.checkpoint_log_seconds)
            if config.audit.checkpoint_log_seconds
            else None
        ),
        sources=dict(sources),
    )


def _signing_key(section: _SigningKey, base: Path | None) -> SigningKeyConfig:
    if section.kind == "pkcs11":
        if not section.token_label:
            raise ConfigError(
                "signing_key.kind = 'pkcs11' needs signing_key.token_label (the HSM token)"
            )
        return Pkcs11SigningKeyConfig(
            token_label=section.token_label,
            key_label=section.key_label,
            module=section.module,
            pin_env=section.pin_env,
        )
    path = resolve_path(base, section.path)
    if path is None:  # pragma: no cover - the schema gives a default
        raise ConfigError("signing_key.path is required for a file release-signing key")
    return FileSigningKeyConfig(path=path)


def _toml_string(value: str) -> str:
    # JSON string escapes (\" \\ \n \uXXXX) are valid TOML basic-string escapes.
    import json

    return json.dumps(value, ensure_ascii=True)


def render_config(
    *,
    master_key: MasterKeyConfig | None = None,
    sim_trusted_keys: tuple[str, ...] = (),
    database_url: str = "sqlite:///keyserver.db",
    port: int = DEFAULT_PORT,
    signing_key_label: str = DEFAULT_KEY_LABEL,
) -> str:
    """The text of a new ``keyserver.toml`` (written by ``sealtorch keyserver init``)."""
    if isinstance(master_key, Pkcs11MasterKeyConfig):
        master = (
            'kind = "pkcs11"\n'
            f"module = {_toml_string(master_key.module)}\n"
            f"token_label = {_toml_string(master_key.token_label)}\n"
            f"key_label = {_toml_string(master_key.key_label)}\n"
            f"# the user PIN is read from this environment variable, never from a file\n"
            f"pin_env = {_toml_string(master_key.pin_env)}\n"
        )
    else:
        master = (
            'kind = "file"\n'
            "# 0600 file; keep it on an encrypted disk and back it up separately from the DB\n"
            'path = "master.key"\n'
        )
    if isinstance(master_key, Pkcs11MasterKeyConfig):
        signing = (
            'kind = "pkcs11"\n'
            f"module = {_toml_string(master_key.module)}\n"
            f"token_label = {_toml_string(master_key.token_label)}\n"
            f"key_label = {_toml_string(signing_key_label)}\n"
            f"pin_env = {_toml_string(master_key.pin_env)}\n"
        )
    else:
        signing = (
            'kind = "file"\n'
            "# 0600 file; its public key (release-signing.pub) is pinned by every enclave\n"
            f"path = {_toml_string(SIGNING_KEY_FILE)}\n"
        )
    keys = ", ".join(_toml_string(key) for key in sim_trusted_keys)
    allow_sim = "true" if sim_trusted_keys else "false"
    return f"""\
# sealtorch key server configuration (docs/keyserver.md).
# Every key can be overridden by an environment variable SEALTORCH_KEYSERVER_<SECTION>_<KEY>,
# e.g. SEALTORCH_KEYSERVER_DATABASE_URL; command-line options override both.
# Relative paths are relative to this directory.

[server]
host = "127.0.0.1"
port = {port}
workers = 1
graceful_timeout = 10.0
# seconds a client may take to send a request's headers, pause in its body, stay idle
header_timeout = 10.0
body_timeout = 30.0
keep_alive_timeout = 30.0

[database]
# SQLite file (embedded default) or postgresql+psycopg://USER:PASSWORD@HOST/DB for replicas
url = {_toml_string(database_url)}
# FULL survives power loss; NORMAL survives process crashes only (faster)
sqlite_synchronous = "FULL"
busy_timeout = 10.0

[master_key]
{master}
[signing_key]
# signs a statement for every released key; enclaves and key caches pin its public key
# (`sealtorch keyserver signing-key show DIR`) and refuse keys without such a statement
{signing}
[tls]
enabled = true
cert = "tls/server.crt"
key = "tls/server.key"
# the development CA that signed the server certificate; give it to clients (--ca)
ca = "tls/ca.crt"

[attestation]
# simulated-TEE attestation keys to trust (`sealtorch attest sim-key --show-public` on the TEE
# host); development only
sim_trusted_keys = [{keys}]
# INSECURE, development only: the server refuses to start with sim_trusted_keys unless this is
# true. Whoever holds a trusted sim key's private half obtains the keys of every model whose
# policy names "sim". Written true by `keyserver init --trust-sim-key`; never in production.
allow_simulated_tee_insecure = {allow_sim}
# DCAP (SGX/TDX) collateral: a PCCS URL (cached on disk) or an offline collateral file/directory
# pccs_url = "https://pccs.example.com/sgx/certification/v4"
# collateral_path = "collateral/"

[release]
nonce_ttl_seconds = 60
lease_seconds = 3600
session_seconds = 14400
max_request_bytes = 65536

[audit]
# seconds between signed audit checkpoints written to the log, for your log shipping to keep
# off this host (0 = never); `sealtorch admin audit verify --checkpoint` reads them
checkpoint_log_seconds = 300
"""
