"""``sealtorch keyserver init DIR``: a new key server data directory.

Layout (mode 0700; secrets 0600)::

    DIR/keyserver.toml     configuration (docs/keyserver.md)
    DIR/keyserver.db       SQLite key store, migrated (unless --database-url names another)
    DIR/instance-id        the store's instance id: `serve` refuses a database that differs
    DIR/master.key         file master key (absent with a PKCS#11 master key)
    DIR/release-signing.key  release-signing key (absent with PKCS#11: then in the same token)
    DIR/release-signing.pub  its public key, which every enclave and key cache pins
    DIR/tls/ca.crt         development CA certificate: give it to clients (--ca)
    DIR/tls/ca.key         its private key (keep it, or delete it once certificates are issued)
    DIR/tls/server.crt     server certificate for localhost, 127.0.0.1, ::1 and --name values
    DIR/tls/server.key

The first admin token is created in the store (hashed) and returned once. Nothing is ever
overwritten: an existing non-empty directory, or a database that already holds a key server,
is refused. If a step fails, the files created so far are removed again.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sealtorch._crypto.tls import create_dev_ca, create_server_certificate
from sealtorch.errors import ConfigError, Error
from sealtorch.keyserver.masterkey import (
    FileMasterKeyConfig,
    MasterKey,
    Pkcs11MasterKeyConfig,
    open_master_key,
)
from sealtorch.keyserver.settings import (
    CONFIG_FILE,
    KeyServerSettings,
    load_settings,
    render_config,
)
from sealtorch.keyserver.signingkey import (
    DEFAULT_KEY_LABEL,
    SIGNING_KEY_FILE,
    FileSigningKeyConfig,
    Pkcs11SigningKeyConfig,
    ReleaseSigningKey,
    open_signing_key,
    public_key_path,
    write_public_key,
)
from sealtorch.keyserver.store import Store, open_store
from sealtorch.keyserver.tokens import TokenKind, issue_token
from sealtorch.protocol.admin import ADMIN_SCOPES
from sealtorch.protocol.audit import AuditEntry, AuditKind

__all__ = [
    "INSTANCE_ID_FILE",
    "InitResult",
    "NewSigningKey",
    "create_signing_key",
    "init_data_dir",
    "open_serving_store",
]

_log = logging.getLogger(__name__)

DEFAULT_DATABASE = "sqlite:///keyserver.db"
#: The store's instance id, written by ``init`` (and by the first start after an upgrade).
INSTANCE_ID_FILE = "instance-id"


@dataclass(frozen=True)
class InitResult:
    """What ``init`` created. :attr:`admin_token` is shown once and stored only hashed."""

    data_dir: Path
    config_path: Path
    ca_path: Path
    admin_token_id: str
    admin_token: str = field(repr=False)
    master_key_id: str
    #: The release-signing public key (``sealtorch-release-key-v1:...``): pin it in every
    #: enclave and key cache (``--keyserver-pubkey``).
    release_public_key: str
    #: Where that public key was written (``DIR/release-signing.pub``).
    release_public_key_path: Path


def _check_target(path: Path) -> bool:
    """True when the directory must be created; refuses a non-empty one."""
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{path} exists and is not a directory")
        if any(path.iterdir()):
            raise ConfigError(
                f"{path} is not empty; `keyserver init` never overwrites a data directory "
                "(choose a new directory)"
            )
        return False
    return True


def init_data_dir(
    path: str | os.PathLike[str],
    *,
    names: Iterable[str] = (),
    pkcs11: Pkcs11MasterKeyConfig | None = None,
    use_existing_pkcs11_key: bool = False,
    database_url: str | None = None,
    sim_trusted_keys: Iterable[str] = (),
    port: int | None = None,
    environ: Mapping[str, str] | None = None,
    signing_key_label: str = DEFAULT_KEY_LABEL,
) -> InitResult:
    """Create a key server data directory (see the module docstring). With ``pkcs11``, the
    release-signing key is created in the same token (label ``signing_key_label``), or used
    from there with ``use_existing_pkcs11_key``."""
    target = Path(path).absolute()
    created_dir = _check_target(target)
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    target.chmod(0o700)
    master: MasterKey | None = None
    signer: ReleaseSigningKey | None = None
    try:
        config_text = render_config(
            master_key=pkcs11,
            sim_trusted_keys=tuple(sim_trusted_keys),
            database_url=database_url or DEFAULT_DATABASE,
            signing_key_label=signing_key_label,
            **({"port": port} if port is not None else {}),
        )
        config_path = target / CONFIG_FILE
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(config_text)
        settings = load_settings(target, environ=environ or {})
        if isinstance(settings.master_key, FileMasterKeyConfig):
            master = open_master_key(settings.master_key, create=True)
        else:
            master = open_master_key(
                settings.master_key, environ=environ, create=not use_existing_pkcs11_key
            )
        signing = settings.signing_key
        if signing is None:  # pragma: no cover - load_settings always sets it
            raise ConfigError("the configuration names no release-signing key")
        if isinstance(signing, FileSigningKeyConfig):
            signer = open_signing_key(signing, create=True)
        else:
            signer = open_signing_key(signing, environ=environ, create=not use_existing_pkcs11_key)
        public_path = target / public_key_path(Path(SIGNING_KEY_FILE)).name
        if not public_path.exists():
            write_public_key(public_path, signer.public_key)
        tls = target / "tls"
        tls.mkdir(mode=0o700)
        ca = create_dev_ca(cert_path=tls / "ca.crt", key_path=tls / "ca.key")
        create_server_certificate(
            ca=ca, cert_path=tls / "server.crt", key_path=tls / "server.key", names=names
        )
        store = open_store(settings.database_url, **settings.store_options())
        try:
            store.migrate()
            if store.list_admin_tokens() or store.list_models(include_deleted=True):
                raise ConfigError(
                    "this database already belongs to a key server; for another replica, copy "
                    "that server's data directory instead of running init again"
                )
            issued = issue_token(TokenKind.ADMIN)
            with store.transaction() as tx:
                tx.create_admin_token(
                    token_id=issued.token_id,
                    digest=issued.digest,
                    name="initial admin token",
                    scopes=ADMIN_SCOPES,
                )
                tx.append_audit(
                    AuditEntry(
                        kind=AuditKind.ADMIN,
                        action="keyserver.init",
                        decision="ok",
                        details={
                            "token_id": issued.token_id,
                            "scopes": [scope.value for scope in ADMIN_SCOPES],
                            "master_key_id": master.key_id,
                            "release_signing_key_id": signer.key_id,
                        },
                    )
                )
            _write_instance_id(target, store.instance_id())
        finally:
            store.close()
    except (Error, OSError) as exc:
        _cleanup(target, created_dir)
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot create the data directory {target}: {exc}") from exc
        raise
    finally:
        if master is not None:
            master.close()
        if signer is not None:
            signer.close()
    _log.info("key server data directory created", extra={"data_dir": str(target)})
    return InitResult(
        data_dir=target,
        config_path=config_path,
        ca_path=ca.cert,
        admin_token_id=issued.token_id,
        admin_token=issued.token,
        master_key_id=master.key_id,
        release_public_key=signer.public_key.text,
        release_public_key_path=public_path,
    )


def _write_instance_id(data_dir: Path, instance_id: str) -> None:
    path = data_dir / INSTANCE_ID_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(instance_id + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def open_serving_store(data_dir: str | os.PathLike[str], settings: KeyServerSettings) -> Store:
    """The store ``keyserver serve`` may start on, checked and migrated; refuses the wrong data.

    * a missing or empty (0-byte) SQLite file: ConfigError (never created here: only ``init``
      creates a store — a volume that failed to mount looks exactly like a missing file);
    * a database that was never initialised (no schema: an empty PostgreSQL database):
      ConfigError;
    * damage (SQLite ``quick_check``): :class:`~sealtorch.errors.StorageCorruptError`;
    * a foreign database — its instance id is not the one in ``DIR/instance-id``: ConfigError
      naming both (``database_url`` or ``SEALTORCH_KEYSERVER_DATABASE_URL`` points elsewhere).

    A data directory from before instance ids adopts the store's id (logged at WARNING).
    """
    directory = Path(data_dir).absolute()
    store = open_store(settings.database_url, create=False, **settings.store_options())
    try:
        store.integrity_check()
        if store.schema_version() == 0:
            raise ConfigError(
                f"the key store ({_shown(store)}) holds no key server: it was never initialised; "
                "check database_url (or SEALTORCH_KEYSERVER_DATABASE_URL) and that the right "
                "database is mounted (`sealtorch keyserver init` creates a new key server)"
            )
        store.migrate()
        _check_instance(directory, store)
    except BaseException:
        store.close()
        raise
    return store


def _shown(store: Store) -> str:
    return repr(store).removeprefix("SqlStore(").removesuffix(")")


def _check_instance(directory: Path, store: Store) -> None:
    actual = store.instance_id()
    path = directory / INSTANCE_ID_FILE
    try:
        expected = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        _write_instance_id(directory, actual)
        _log.warning(
            "this data directory had no instance id; recorded the key store's (%s) in %s",
            actual,
            path,
        )
        return
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; restore it from a backup") from exc
    if expected != actual:
        raise ConfigError(
            f"the key store ({_shown(store)}) belongs to another key server (instance "
            f"{actual}, but {path} says {expected}); check database_url (or "
            "SEALTORCH_KEYSERVER_DATABASE_URL) and which volume is mounted"
        )


def _cleanup(target: Path, created_dir: bool) -> None:
    if created_dir:
        shutil.rmtree(target, ignore_errors=True)
        return
    for child in target.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


@dataclass(frozen=True)
class NewSigningKey:
    """A release-signing key created by :func:`create_signing_key`."""

    public_key: str
    key_id: str
    #: ``path = ...`` or ``key_label = ...``: what ``[signing_key]`` must say to use it.
    config_line: str
    #: Whether the configuration already names it (no switch needed).
    configured: bool


def create_signing_key(
    data_dir: str | os.PathLike[str],
    *,
    path: str | os.PathLike[str] | None = None,
    key_label: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> NewSigningKey:
    """Create a release-signing key for the key server in ``data_dir``.

    Without ``path``/``key_label``: the key its configuration names (a data directory made
    before release statements existed). With one of them: a *new* key next to the current one,
    for a rollover (``docs/keyserver.md``); the configuration is not changed. Nothing is
    overwritten.
    """
    settings = load_settings(data_dir, environ=environ)
    config = settings.signing_key
    if config is None:  # pragma: no cover - load_settings always sets it
        raise ConfigError("the configuration names no release-signing key")
    if path is not None and key_label is not None:
        raise ConfigError("give a new file path or a new PKCS#11 key label, not both")
    if isinstance(config, FileSigningKeyConfig):
        if key_label is not None:
            raise ConfigError(
                "this key server keeps its release-signing key in a file ([signing_key] kind "
                "= 'file'): give a new file path, not a PKCS#11 key label"
            )
        target = Path(path).absolute() if path is not None else config.path
        config = FileSigningKeyConfig(path=target)
        line = f'path = "{target}"'
        configured = path is None
    else:
        if path is not None:
            raise ConfigError(
                "this key server keeps its release-signing key in a PKCS#11 token: give a new "
                "key label (--key-label), not a file path"
            )
        label = key_label or config.key_label
        config = Pkcs11SigningKeyConfig(
            token_label=config.token_label,
            key_label=label,
            module=config.module,
            pin_env=config.pin_env,
        )
        line = f'key_label = "{label}"'
        configured = key_label is None
    signer = open_signing_key(config, environ=environ, create=True)
    try:
        return NewSigningKey(
            public_key=signer.public_key.text,
            key_id=signer.key_id,
            config_line=line,
            configured=configured,
        )
    finally:
        signer.close()
