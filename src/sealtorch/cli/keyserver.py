"""``sealtorch keyserver``: create a key server data directory and run the server."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from sealtorch.cli._options import trust_sim_key_option
from sealtorch.errors import ConfigError


@click.group(
    epilog="""\b
Examples:
  sealtorch keyserver init ./ks --name keys.example.com --admin-token-file admin.token
  sealtorch keyserver serve ./ks --port 8443
  sealtorch admin --server https://127.0.0.1:8443 --ca ./ks/tls/ca.crt \\
      --token-file admin.token model list

Docs: docs/keyserver.md (operations), docs/protocol.md (key release protocol).
"""
)
def keyserver() -> None:
    """The key server: model keys, release policies, attested key release and audit."""


@keyserver.command(
    epilog="""\b
Examples:
  sealtorch keyserver init ./ks
  sealtorch keyserver init ./ks --name keys.internal --name 10.0.0.5 \\
      --trust-sim-key "$(sealtorch attest sim-key --show-public)"
  SEALTORCH_PKCS11_PIN=... sealtorch keyserver init ./ks --pkcs11-module \\
      /usr/lib/softhsm/libsofthsm2.so --token-label sealtorch --key-label master
  sealtorch keyserver init ./replica --database-url postgresql+psycopg://ks:PW@db/keys

\b
The admin token is printed once (or written to --admin-token-file, mode 0600) and stored
only as a hash: keep it safe. The data directory holds the master key file, the
release-signing key and the TLS keys: back it up and protect it like the keys themselves.
The release-signing public key is printed (and written to DATA_DIR/release-signing.pub):
pin it in every enclave and key cache with --keyserver-pubkey.
"""
)
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option(
    "--name",
    "names",
    multiple=True,
    metavar="HOST",
    help="Extra DNS name or IP address for the server certificate (repeatable); "
    "localhost, 127.0.0.1 and ::1 are always included.",
)
@click.option(
    "--database-url",
    metavar="URL",
    help="Key store URL; default: an SQLite file in DATA_DIR. PostgreSQL "
    "(postgresql+psycopg://USER:PW@HOST/DB) lets several servers run as replicas.",
)
@click.option("--port", type=click.IntRange(0, 65535), help="Port written to the config.")
@trust_sim_key_option(
    "Trust evidence of the simulated TEE signed by this key (development only; repeatable)."
)
@click.option(
    "--admin-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the first admin token to this new file (mode 0600) instead of printing it.",
)
@click.option(
    "--pkcs11-module", metavar="PATH", help="Keep the master key in a PKCS#11 token (HSM)."
)
@click.option("--token-label", metavar="LABEL", help="PKCS#11 token label.")
@click.option(
    "--key-label",
    default="sealtorch-master-key",
    show_default=True,
    help="Label of the master key inside the token.",
)
@click.option(
    "--pin-env",
    default="SEALTORCH_PKCS11_PIN",
    show_default=True,
    help="Environment variable that holds the token's user PIN.",
)
@click.option(
    "--signing-key-label",
    default="sealtorch-release-signing-key",
    show_default=True,
    help="Label of the release-signing key pair inside the token (with --pkcs11-module).",
)
@click.option(
    "--existing-key",
    is_flag=True,
    help="Use a master key and release-signing key that already exist in the token "
    "(another replica's).",
)
def init(
    data_dir: Path,
    names: tuple[str, ...],
    database_url: str | None,
    port: int | None,
    sim_keys: tuple[str, ...],
    admin_token_file: Path | None,
    pkcs11_module: str | None,
    token_label: str | None,
    key_label: str,
    pin_env: str,
    signing_key_label: str,
    existing_key: bool,
) -> None:
    """Create a key server data directory: config, database, master key, release-signing key,
    TLS, admin token.

    Refuses to touch an existing non-empty directory or an already initialised database.
    """
    from sealtorch.attestation import parse_sim_public_key
    from sealtorch.keyserver.datadir import init_data_dir
    from sealtorch.keyserver.masterkey import Pkcs11MasterKeyConfig
    from sealtorch.protocol.admin import ADMIN_SCOPES

    pkcs11 = None
    if pkcs11_module or token_label:
        if not (pkcs11_module and token_label):
            raise click.UsageError("--pkcs11-module and --token-label go together")
        pkcs11 = Pkcs11MasterKeyConfig(
            token_label=token_label, key_label=key_label, module=pkcs11_module, pin_env=pin_env
        )
    elif existing_key:
        raise click.UsageError("--existing-key applies to a PKCS#11 master key only")
    for key in sim_keys:
        parse_sim_public_key(key)  # ConfigError with a clear message when malformed
    if admin_token_file is not None and admin_token_file.exists():
        raise ConfigError(f"{admin_token_file} already exists; choose a new file for the token")
    result = init_data_dir(
        data_dir,
        names=names,
        pkcs11=pkcs11,
        use_existing_pkcs11_key=existing_key,
        database_url=database_url,
        sim_trusted_keys=sim_keys,
        port=port,
        signing_key_label=signing_key_label,
    )
    click.echo(f"created key server data directory {result.data_dir}")
    click.echo(f"  config:      {result.config_path}")
    click.echo(f"  master key:  {result.master_key_id}")
    click.echo(
        f"  release-signing public key (pin it: --keyserver-pubkey; also in "
        f"{result.release_public_key_path}):"
    )
    click.echo(f"    {result.release_public_key}")
    click.echo(f"  TLS CA:      {result.ca_path}  (give this file to clients: --ca)")
    click.echo(f"  start it:    sealtorch keyserver serve {result.data_dir}")
    if sim_keys:
        click.echo(
            "  simulated TEE: trusted (INSECURE, development only): the config says "
            "[attestation] allow_simulated_tee_insecure = true; set it to false, or remove "
            "sim_trusted_keys, before any production use"
        )
    click.echo(
        "  admin token scopes: all (" + ", ".join(scope.value for scope in ADMIN_SCOPES) + "); "
        "for CI sealing make a narrower one: sealtorch admin token create --name ci --scope seal"
    )
    if admin_token_file is not None:
        fd = os.open(admin_token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(result.admin_token + "\n")
        click.echo(f"  admin token: written to {admin_token_file} (mode 0600)")
    else:
        click.echo("admin token (shown once, stored only as a hash; keep it safe):")
        click.echo(result.admin_token)


@keyserver.command(
    epilog="""\b
Examples:
  sealtorch keyserver serve ./ks
  sealtorch --log-format json -v keyserver serve ./ks --host 0.0.0.0 --port 8443 --workers 2
  sealtorch keyserver serve ./ks --port 0        # a free port; the URL is printed
  SEALTORCH_KEYSERVER_DATABASE_URL=postgresql+psycopg://... sealtorch keyserver serve ./ks

\b
Prints "listening on https://HOST:PORT" once the socket is bound. Settings: options >
environment (SEALTORCH_KEYSERVER_<SECTION>_<KEY>) > DATA_DIR/keyserver.toml > defaults.
SIGTERM or Ctrl-C shuts down gracefully (in-flight requests finish). Endpoints: /v1/...,
/healthz, /readyz (503 while the store cannot commit), /v1/admin/status (scope read),
/metrics, /openapi.json. It never creates a store (only `keyserver init` does): a missing,
empty, damaged or foreign database is refused (docs/keyserver.md, Operations). Trusted
simulated-TEE keys are refused unless --allow-simulated-tee-insecure (development only).
"""
)
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", help="Address to listen on (config: [server] host; 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port; 0 picks a free one.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Worker processes, each with its own listening socket on the port "
    "(config: [server] workers; 1).",
)
@click.option(
    "--unix-socket",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Serve plain HTTP on this Unix socket instead of HTTPS on TCP (local clients only).",
)
@click.option(
    "--allow-simulated-tee-insecure",
    "allow_sim",
    is_flag=True,
    default=None,
    help="INSECURE, development only: start although simulated-TEE keys are trusted "
    "([attestation] sim_trusted_keys); without it such a server refuses to start "
    "(config: [attestation] allow_simulated_tee_insecure).",
)
def serve(
    data_dir: Path,
    host: str | None,
    port: int | None,
    workers: int | None,
    unix_socket: Path | None,
    allow_sim: bool | None,
) -> None:
    """Run the key server over HTTPS (one or more worker processes)."""
    from sealtorch.cli._logging import configure_logging
    from sealtorch.keyserver.server import run

    root = logging.getLogger()
    json_logs = any(type(h.formatter).__name__ == "JsonFormatter" for h in root.handlers)

    def announce(url: str) -> None:
        click.echo(f"listening on {url}")
        sys.stdout.flush()

    run(
        data_dir,
        overrides={
            "server": {"host": host, "port": port, "workers": workers},
            "attestation": {"allow_simulated_tee_insecure": allow_sim or None},
        },
        unix_socket=unix_socket,
        announce=announce,
        worker_setup=functools.partial(configure_logging, level=root.level, json_format=json_logs),
    )


@keyserver.group("signing-key")
def signing_key() -> None:
    """The release-signing key: it signs a statement for every key the server releases."""


@signing_key.command(
    "show",
    epilog="""\b
Examples:
  sealtorch keyserver signing-key show ./ks
  sealtorch keycache serve ... --keyserver-pubkey "$(sealtorch keyserver signing-key show ./ks)"

\b
Prints the public key (sealtorch-release-key-v1:...) that enclaves and key caches pin with
--keyserver-pubkey; its key id goes to stderr. Copy it to the enclave configuration through
a channel you trust: the enclave accepts only keys vouched for by a pinned key.
""",
)
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def signing_key_show(data_dir: Path) -> None:
    """Print the release-signing public key of the key server in DATA_DIR."""
    from sealtorch.keyserver.settings import load_settings
    from sealtorch.keyserver.signingkey import open_signing_key

    settings = load_settings(data_dir)
    if settings.signing_key is None:  # pragma: no cover - load_settings always sets it
        raise ConfigError("the configuration names no release-signing key")
    signer = open_signing_key(settings.signing_key)
    try:
        click.echo(signer.public_key.text)
        click.echo(f"key id {signer.key_id}", err=True)
    finally:
        signer.close()


@signing_key.command(
    "create",
    epilog="""\b
Examples:
  # a data directory made before release statements: create the configured key
  sealtorch keyserver signing-key create ./ks
  # a rollover: a new key next to the current one (docs/keyserver.md)
  sealtorch keyserver signing-key create ./ks --path ./ks/release-signing-2.key
  SEALTORCH_PKCS11_PIN=... sealtorch keyserver signing-key create ./ks --key-label rsk-2027

\b
Never overwrites a key. A new key is not used until [signing_key] in keyserver.toml names
it: pin it in every enclave next to the current one first, then switch the server.
""",
)
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--path",
    "key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Create a new file key here (a rollover), instead of the configured one.",
)
@click.option(
    "--key-label",
    metavar="LABEL",
    help="Create a new key pair with this label in the configured PKCS#11 token (a rollover).",
)
def signing_key_create(data_dir: Path, key_path: Path | None, key_label: str | None) -> None:
    """Create a release-signing key for the key server in DATA_DIR and print its public key."""
    from sealtorch.keyserver.datadir import create_signing_key

    created = create_signing_key(data_dir, path=key_path, key_label=key_label)
    click.echo(created.public_key)
    click.echo(f"key id {created.key_id}", err=True)
    if created.configured:
        click.echo("the key server uses it from its next start", err=True)
    else:
        click.echo(
            "not used yet: pin it in every enclave and key cache next to the current key "
            "(--keyserver-pubkey, twice), redeploy them, then set "
            f"[signing_key] {created.config_line} in keyserver.toml and restart the key "
            "server; unpin the old key once no enclave needs it (docs/keyserver.md)",
            err=True,
        )
