"""``sealtorch keyserver init DIR``: a new key server data directory.

Layout (mode 0700; secrets 0600)::

    DIR/keyserver.toml     configuration (docs/keyserver.md)
    DIR/keyserver.db       SQLite key store, migrated (unless --database-url names another)
    DIR/master.key         file master key (absent with a PKCS#11 master key)
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
from sealtorch.keyserver.settings import CONFIG_FILE, load_settings, render_config
from sealtorch.keyserver.store import open_store
from sealtorch.keyserver.tokens import TokenKind, issue_token
from sealtorch.protocol.admin import ADMIN_SCOPES
from sealtorch.protocol.audit import AuditEntry, AuditKind

__all__ = ["InitResult", "init_data_dir"]

_log = logging.getLogger(__name__)

DEFAULT_DATABASE = "sqlite:///keyserver.db"


@dataclass(frozen=True)
class InitResult:
    """What ``init`` created. :attr:`admin_token` is shown once and stored only hashed."""

    data_dir: Path
    config_path: Path
    ca_path: Path
    admin_token_id: str
    admin_token: str = field(repr=False)
    master_key_id: str


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
) -> InitResult:
    """Create a key server data directory (see the module docstring)."""
    target = Path(path).absolute()
    created_dir = _check_target(target)
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    target.chmod(0o700)
    master: MasterKey | None = None
    try:
        config_text = render_config(
            master_key=pkcs11,
            sim_trusted_keys=tuple(sim_trusted_keys),
            database_url=database_url or DEFAULT_DATABASE,
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
                        },
                    )
                )
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
    _log.info("key server data directory created", extra={"data_dir": str(target)})
    return InitResult(
        data_dir=target,
        config_path=config_path,
        ca_path=ca.cert,
        admin_token_id=issued.token_id,
        admin_token=issued.token,
        master_key_id=master.key_id,
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
