"""``sealtorch keycache``: run the key cache on a TEE host, and ask it how it is doing."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from sealtorch.cli._options import (
    sim_key_option,
    tee_option,
    tee_root_option,
    trust_sim_key_option,
)


@click.group(
    epilog="""\b
Examples:
  sealtorch keycache serve --config /etc/sealtorch/keycache.toml
  sealtorch keycache serve --keyserver https://keys.example.com:8443 --ca ks-ca.crt \\
      --keyserver-pubkey sealtorch-release-key-v1:... \\
      --tee gramine --socket /run/sealtorch/keycache.sock --pccs-url https://pccs:8081
  sealtorch keycache status --socket /run/sealtorch/keycache.sock

Docs: docs/keycache.md (operations, config file), docs/protocol.md (the release protocol).
"""
)
def keycache() -> None:
    """The key cache: attested, leased keys for the inference enclaves on this host."""


_SERVE_EPILOG = """\b
Examples:
  # development on one machine, simulated TEE (trust this host's sim key for local clients)
  sealtorch keycache serve --keyserver https://127.0.0.1:8443 --ca ./ks/tls/ca.crt \\
      --keyserver-pubkey "$(sealtorch keyserver signing-key show ./ks)" \\
      --tee sim --socket /tmp/keycache.sock \\
      --trust-sim-key "$(sealtorch attest sim-key --show-public)" \\
      --allow-simulated-tee-insecure
\b
  # production in Gramine-SGX: two models, loopback HTTPS for the inference enclave,
  # metrics for Prometheus, keys sealed to this enclave across restarts
  sealtorch keycache serve --keyserver https://keys.example.com:8443 --ca ks-ca.crt \\
      --keyserver-pubkey sealtorch-release-key-v1:... \\
      --tee gramine --model resnet50 --model efficientnet-lite0 \\
      --socket /run/sealtorch/keycache.sock --socket-group sealtorch \\
      --tcp 127.0.0.1:7443 --tls-cert cache.crt --tls-key cache.key \\
      --metrics 127.0.0.1:9464 --pccs-url https://pccs.internal:8081/sgx/certification/v4 \\
      --persist /var/lib/sealtorch/keycache.sealed
\b
  # everything from a file (options override it)
  sealtorch keycache serve --config keycache.toml --refresh 60
\b
At start the cache attests to the key server and fetches its keys (each model is logged:
granted, or denied with reason codes); it accepts a key only with a release statement signed
by a pinned --keyserver-pubkey and forwards that statement with the key. It then serves the
same release protocol as the key server, enforcing on local enclaves the policy that came with
each key. Stdout carries the machine-readable line "ready: URL... (N models)" once it serves
(and "metrics: URL" before it with --metrics). A cache the key server refuses still starts,
says so in the log and in `keycache status`, and serves nothing. Every local release is
logged (one structured line: request id, client measurement, models granted/denied with
reasons; no key material), also without -v; -q silences it. SIGTERM/Ctrl-C stops; SIGHUP
refreshes at once.
"""


@keycache.command(epilog=_SERVE_EPILOG)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML config file (docs/keycache.md); options given here override it.",
)
@click.option(
    "--keyserver",
    "keyserver_url",
    metavar="URL",
    multiple=True,
    callback=lambda _ctx, _param, value: ",".join(value) or None,
    help="The key server: https://HOST:PORT (or unix:///PATH on the same host). Repeat it "
    "(or give a comma list) for replicas: a connection failure or a 503 moves to the next.",
)
@click.option(
    "--ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA certificate the key server's TLS certificate must chain to.",
)
@click.option(
    "--keyserver-pubkey",
    "keyserver_pubkeys",
    multiple=True,
    metavar="KEY",
    help="The key server's release-signing public key (sealtorch-release-key-v1:...; "
    "repeatable: old and new during a rollover). Required (here or [keyserver] pubkeys): keys "
    "without a statement signed by it are refused.",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="ID",
    help="Hold only this model (repeatable). Default: every model the key server releases "
    "to this cache. Listing models makes denials visible with their reasons.",
)
@tee_option("The TEE this cache runs in; its evidence goes to the key server.")
@sim_key_option()
@tee_root_option()
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Unix socket for local enclaves, e.g. /run/sealtorch/keycache.sock.",
)
@click.option(
    "--socket-mode",
    metavar="OCTAL",
    help="Socket file mode: 0600 (default: this user only) or 0660 (with --socket-group).",
)
@click.option(
    "--socket-group",
    metavar="GROUP",
    help="Group allowed to connect (the socket becomes 0660 unless --socket-mode says).",
)
@click.option(
    "--tcp",
    metavar="HOST:PORT",
    help="Also listen on loopback TCP (e.g. 127.0.0.1:7443 for Gramine enclaves, which "
    "cannot share a Unix socket); port 0 picks one.",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Serve HTTPS on --tcp with this certificate.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Private key of --tls-cert (mode 0600).",
)
@click.option(
    "--metrics",
    metavar="HOST:PORT",
    help="Loopback listener for /metrics, /healthz, /readyz and status only (no keys).",
)
@trust_sim_key_option(
    "Accept sim evidence from local clients signed by this key (development; repeatable)."
)
@click.option(
    "--allow-simulated-tee-insecure",
    "allow_sim",
    is_flag=True,
    default=None,
    help="INSECURE, development only: start although --trust-sim-key / [local] "
    "sim_trusted_keys is set; without it such a cache refuses to start "
    "(config: [local] allow_simulated_tee_insecure).",
)
@click.option("--pccs-url", metavar="URL", help="PCCS for verifying local SGX/TDX quotes.")
@click.option(
    "--collateral",
    "collateral_path",
    type=click.Path(exists=True, path_type=Path),
    help="Collateral JSON file or directory for verifying local quotes offline.",
)
@click.option(
    "--collateral-cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where PCCS collateral is cached (default ~/.cache/sealtorch/collateral).",
)
@click.option(
    "--refresh",
    "refresh_seconds",
    type=click.FloatRange(min=0.05),
    help="Seconds between refreshes from the key server (default 300): the longest a "
    "revocation takes to reach this cache.",
)
@click.option(
    "--renew-fraction",
    type=click.FloatRange(0.05, 0.95),
    help="Renew a lease once this fraction of it has passed (default 0.5).",
)
@click.option(
    "--backoff-max",
    type=click.FloatRange(min=0.05),
    help="Longest wait between retries while the key server is unreachable (default 60 s).",
)
@click.option(
    "--nonce-ttl",
    type=click.FloatRange(min=0.1, max=600),
    help="Seconds a local challenge nonce stays valid (default 30).",
)
@click.option(
    "--persist",
    "persist_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep keys across restarts in this file, sealed to this enclave (gramine: the SGX "
    "sealing key; sim: a host key file). Never plaintext.",
)
@click.option(
    "--sim-sealing-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="sim only: the host sealing key file for --persist (default: next to it).",
)
def serve(
    config_file: Path | None,
    keyserver_url: str | None,
    ca: Path | None,
    keyserver_pubkeys: tuple[str, ...],
    models: tuple[str, ...],
    tee: str | None,
    sim_key: Path | None,
    tee_root: Path | None,
    socket_path: Path | None,
    socket_mode: str | None,
    socket_group: str | None,
    tcp: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    metrics: str | None,
    sim_keys: tuple[str, ...],
    allow_sim: bool | None,
    pccs_url: str | None,
    collateral_path: Path | None,
    collateral_cache_dir: Path | None,
    refresh_seconds: float | None,
    renew_fraction: float | None,
    backoff_max: float | None,
    nonce_ttl: float | None,
    persist_path: Path | None,
    sim_sealing_key: Path | None,
) -> None:
    """Attest to the key server, hold the keys this host may have, serve local enclaves."""
    from sealtorch.keycache.server import run
    from sealtorch.keycache.settings import load_settings

    def text(value: Path | None) -> str | None:
        return str(value) if value is not None else None

    overrides: dict[str, dict[str, Any]] = {
        "keyserver": {
            "url": keyserver_url,
            "ca": text(ca),
            "pubkeys": keyserver_pubkeys or None,
            "models": models or None,
        },
        "tee": {"type": tee, "sim_key": text(sim_key), "root": text(tee_root)},
        "listen": {
            "socket": text(socket_path),
            "socket_mode": socket_mode,
            "socket_group": socket_group,
            "tcp": tcp,
            "tls_cert": text(tls_cert),
            "tls_key": text(tls_key),
            "metrics": metrics,
        },
        "local": {
            "sim_trusted_keys": sim_keys or None,
            "allow_simulated_tee_insecure": allow_sim or None,
            "pccs_url": pccs_url,
            "collateral_path": text(collateral_path),
            "collateral_cache_dir": text(collateral_cache_dir),
            "nonce_ttl_seconds": nonce_ttl,
        },
        "leases": {
            "refresh_seconds": refresh_seconds,
            "renew_fraction": renew_fraction,
            "backoff_max_seconds": backoff_max,
        },
        "persistence": {"path": text(persist_path), "sim_sealing_key": text(sim_sealing_key)},
    }
    if backoff_max is not None:
        overrides["leases"].setdefault("backoff_initial_seconds", min(1.0, backoff_max))
    settings = load_settings(config_file, overrides=overrides)
    _log_releases_by_default()

    def announce(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    run(settings, announce=announce)


def _log_releases_by_default() -> None:
    """The per-model start-up outcome and every local release are the cache's audit trail:
    logged at INFO even without -v (``-q`` silences them)."""
    context = click.get_current_context()
    root_context = context.find_root()
    if isinstance(root_context.obj, dict) and root_context.obj.get("quiet"):
        return
    level = min(logging.getLogger().getEffectiveLevel(), logging.INFO)
    logging.getLogger("sealtorch.keycache").setLevel(level)


_STATUS_EPILOG = """\b
Examples:
  sealtorch keycache status --socket /run/sealtorch/keycache.sock
  sealtorch keycache status --url http://127.0.0.1:9464          # the --metrics listener
  sealtorch keycache status --url https://127.0.0.1:7443 --ca cache-ca.crt --json
  sealtorch keycache status --socket /run/sealtorch/keycache.sock --require-ready
\b
Shows the held models, key versions, lease expiry, the last renewal, key server reachability
and any denial reasons — never key material. Exit status: 0, or 3 with --require-ready when
the cache serves no key (states denied, empty, unavailable, starting).
"""


@keycache.command(epilog=_STATUS_EPILOG)
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The cache's Unix socket.",
)
@click.option("--url", metavar="URL", help="Or its TCP/metrics listener: http(s)://HOST:PORT.")
@click.option(
    "--ca", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="CA for https."
)
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON.")
@click.option(
    "--require-ready", is_flag=True, help="Exit 3 unless the cache serves at least one key."
)
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True)
def status(
    socket_path: Path | None,
    url: str | None,
    ca: Path | None,
    as_json: bool,
    require_ready: bool,
    timeout: float,
) -> None:
    """Show what a running key cache holds and how it is doing (no key material)."""
    from sealtorch.keycache.client import fetch_status

    if (socket_path is None) == (url is None):
        raise click.UsageError("give exactly one of --socket PATH or --url URL")
    report = fetch_status(socket=socket_path, url=url, ca=ca, timeout=timeout)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_status(report)
    if require_ready and report.get("state") not in ("ready", "degraded"):
        sys.exit(3)


def _ago(text: str | None, now: datetime) -> str:
    if not text:
        return "never"
    moment = datetime.fromisoformat(text)
    seconds = (now - moment).total_seconds()
    return f"{text} ({seconds:.0f} s ago)" if seconds >= 0 else f"{text} (in {-seconds:.0f} s)"


def _print_status(report: dict[str, Any]) -> None:
    now = datetime.fromisoformat(report["now"]) if report.get("now") else datetime.now(UTC)
    keyserver = report["keyserver"]
    attestation = report["attestation"]
    reachable = {True: "reachable", False: "UNREACHABLE", None: "not contacted yet"}[
        keyserver.get("reachable")
    ]
    click.echo(f"state:          {report['state']}")
    if report.get("simulated_tee"):
        click.echo("INSECURE:       the simulated TEE is trusted for local enclaves (development)")
    click.echo(f"key server:     {keyserver['url']} ({reachable})")
    if keyserver.get("last_error"):
        click.echo(f"  last error:   {keyserver['last_error']}")
    line = f"attestation:    {attestation['state']} ({attestation['tee']}"
    if attestation.get("measurement"):
        line += f", measurement {attestation['measurement'][:16]}..."
    click.echo(line + ")")
    if attestation.get("reasons"):
        click.echo(f"  reasons:      {', '.join(attestation['reasons'])}")
    click.echo(f"last renewal:   {_ago(report.get('last_renewal_at'), now)}")
    click.echo(f"next refresh:   {_ago(report.get('next_refresh_at'), now)}")
    models = report.get("models") or []
    click.echo(f"models held:    {len(models)}")
    for model in models:
        versions = ",".join(str(v) for v in model["key_versions"])
        click.echo(
            f"  {model['model_id']:<32} v{versions:<8} lease until {model['lease_expires_at']} "
            f"({model['lease_remaining_seconds']:.0f} s)  policy v{model['policy_version']}"
        )
    for denial in report.get("denied") or []:
        click.echo(f"  {denial['model_id']:<32} DENIED ({', '.join(denial['reasons'])})")
    for expired in report.get("expired") or []:
        click.echo(f"  {expired['model_id']:<32} LEASE EXPIRED at {expired['expired_at']}")
    persistence = report.get("persistence")
    if persistence:
        click.echo(
            f"persistence:    {persistence['path']} (restored {persistence['restored_keys']}, "
            f"saved {_ago(persistence.get('last_saved_at'), now)})"
        )
        if persistence.get("error"):
            click.echo(f"  error:        {persistence['error']}")
