"""``sealtorch admin``: manage a running key server over its admin API (bearer token)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sealtorch.errors import ConfigError
from sealtorch.protocol.admin import ADMIN_SCOPES, SCOPE_RIGHTS, check_scopes

if TYPE_CHECKING:
    from pydantic import BaseModel

    from sealtorch.client import AdminClient


class _Context:
    def __init__(
        self,
        *,
        server: str | None,
        ca: Path | None,
        token_file: Path | None,
        token_env: str,
        as_json: bool,
    ) -> None:
        self.server = server
        self.ca = ca
        self.token_file = token_file
        self.token_env = token_env
        self.as_json = as_json

    def client(self) -> AdminClient:
        from sealtorch.client import AdminClient, read_token

        if not self.server:
            # Checked here rather than by click, so that `admin SUBCOMMAND --help` works alone.
            raise click.UsageError(
                "which key server? give --server https://HOST:PORT (before the subcommand) "
                "or set SEALTORCH_KEYSERVER_URL"
            )
        token = read_token(token=os.environ.get(self.token_env), token_file=self.token_file)
        return AdminClient(self.server, token=token, ca=self.ca)


pass_context = click.make_pass_decorator(_Context)


def _emit(ctx: _Context, value: BaseModel | list[Any], rows: Iterable[tuple[str, ...]]) -> None:
    """JSON with --json, else aligned text rows."""
    if ctx.as_json:
        if isinstance(value, list):
            click.echo(json.dumps([item.model_dump(mode="json") for item in value], indent=2))
        else:
            click.echo(value.model_dump_json(indent=2))
        return
    table = [tuple(str(cell) for cell in row) for row in rows]
    if not table:
        return
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def _time(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else "-"


@click.group(
    epilog="""\b
Examples:
  export SEALTORCH_KEYSERVER_URL=https://127.0.0.1:8443 SEALTORCH_KEYSERVER_CA=ks/tls/ca.crt
  sealtorch admin --token-file admin.token model create resnet50
  sealtorch admin --token-file admin.token policy set resnet50 policy.yaml
  sealtorch admin --token-file admin.token key rotate resnet50
  sealtorch admin --token-file admin.token audit verify --expected-head 42:9f2c...

\b
The token comes from --token-file FILE, or from the environment variable named by
--token-env (default SEALTORCH_ADMIN_TOKEN). Exit code 1 when the server refuses.
"""
)
@click.option(
    "--server",
    envvar="SEALTORCH_KEYSERVER_URL",
    metavar="URL",
    help="Key server URL, https://HOST:PORT (env SEALTORCH_KEYSERVER_URL). Required.",
)
@click.option(
    "--ca",
    envvar="SEALTORCH_KEYSERVER_CA",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA certificate to trust (the server's DATA_DIR/tls/ca.crt; env SEALTORCH_KEYSERVER_CA)."
    " Default: the system trust store.",
)
@click.option(
    "--token-file",
    envvar="SEALTORCH_ADMIN_TOKEN_FILE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding the admin token (env SEALTORCH_ADMIN_TOKEN_FILE).",
)
@click.option(
    "--token-env",
    default="SEALTORCH_ADMIN_TOKEN",
    show_default=True,
    metavar="VAR",
    help="Environment variable holding the admin token (used when set).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def admin(
    ctx: click.Context,
    server: str | None,
    ca: Path | None,
    token_file: Path | None,
    token_env: str,
    as_json: bool,
) -> None:
    """Manage a key server: models, keys, policies, admin tokens, audit log."""
    ctx.obj = _Context(
        server=server, ca=ca, token_file=token_file, token_env=token_env, as_json=as_json
    )


# -- models ------------------------------------------------------------------------------------


@admin.group()
def model() -> None:
    """Create, list, show and delete models."""


def _import_key(path: Path | None) -> Any:
    if path is None:
        return None
    from sealtorch.keys import read_key_file

    return read_key_file(path)


@model.command("create")
@click.argument("model_id")
@click.option(
    "--import-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Use this key file (`sealtorch keygen`) as version 1 instead of a new server key.",
)
@pass_context
def model_create(ctx: _Context, model_id: str, import_key: Path | None) -> None:
    """Create MODEL_ID with key version 1 (generated in the server unless imported)."""
    with ctx.client() as client:
        created = client.create_model(model_id, key=_import_key(import_key))
    _emit(
        ctx,
        created,
        [
            (
                f"created model {created.model.model_id}",
                f"key v{created.key.version}",
                f"fingerprint {created.key.fingerprint}",
            )
        ],
    )
    if not ctx.as_json:
        click.echo(f"next: sealtorch admin policy set {model_id} POLICY.yaml", err=True)


@model.command("list")
@pass_context
def model_list(ctx: _Context) -> None:
    """List live models with their current key and policy versions."""
    with ctx.client() as client:
        models = client.list_models()
    rows = [("MODEL", "KEY", "POLICY", "CREATED")]
    rows += [
        (
            m.model_id,
            f"v{m.current_key_version}" if m.current_key_version else "-",
            f"v{m.policy_version}" if m.policy_version else "-",
            _time(m.created_at),
        )
        for m in models
    ]
    _emit(ctx, models, rows)


@model.command("show")
@click.argument("model_id")
@pass_context
def model_show(ctx: _Context, model_id: str) -> None:
    """A model's key versions and current policy."""
    with ctx.client() as client:
        detail = client.show_model(model_id)
    rows = [("MODEL", detail.model.model_id, "created " + _time(detail.model.created_at))]
    rows += [(f"key v{k.version}", k.state, f"fingerprint {k.fingerprint}") for k in detail.keys]
    if detail.policy is not None:
        rows.append((f"policy v{detail.policy.version}", "digest", detail.policy.digest))
    else:
        rows.append(("policy", "-", "none (nothing is released)"))
    _emit(ctx, detail, rows)


@model.command("delete")
@click.argument("model_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_context
def model_delete(ctx: _Context, model_id: str, yes: bool) -> None:
    """Delete MODEL_ID and erase its keys: files sealed for it can never be opened again."""
    if not yes:
        click.confirm(
            f"Delete {model_id!r} and destroy every key version (irreversible)?", abort=True
        )
    with ctx.client() as client:
        deleted = client.delete_model(model_id)
    _emit(ctx, deleted, [(f"deleted model {model_id}; its keys are destroyed",)])


# -- keys --------------------------------------------------------------------------------------


@admin.group()
def key() -> None:
    """Rotate, revoke and list data key versions."""


@key.command("rotate")
@click.argument("model_id")
@click.option(
    "--import-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Use this key file as the new version instead of a new server key.",
)
@pass_context
def key_rotate(ctx: _Context, model_id: str, import_key: Path | None) -> None:
    """Add a new key version; new files are sealed under it (rewrap old ones)."""
    with ctx.client() as client:
        version = client.rotate_key(model_id, key=_import_key(import_key))
    _emit(
        ctx,
        version,
        [(f"model {model_id}: new key v{version.version}", f"fingerprint {version.fingerprint}")],
    )


@key.command("revoke")
@click.argument("model_id")
@click.argument("version", type=click.IntRange(1))
@pass_context
def key_revoke(ctx: _Context, model_id: str, version: int) -> None:
    """Revoke VERSION of MODEL_ID: it is never released again (rewrap still works)."""
    with ctx.client() as client:
        revoked = client.revoke_key(model_id, version)
    _emit(ctx, revoked, [(f"model {model_id}: key v{version} revoked",)])


@key.command("list")
@click.argument("model_id")
@pass_context
def key_list(ctx: _Context, model_id: str) -> None:
    """List MODEL_ID's key versions."""
    with ctx.client() as client:
        keys = client.list_keys(model_id)
    rows = [("VERSION", "STATE", "FINGERPRINT", "CREATED", "REVOKED")]
    rows += [
        (f"v{k.version}", k.state, k.fingerprint, _time(k.created_at), _time(k.revoked_at))
        for k in keys
    ]
    _emit(ctx, keys, rows)


# -- policies ----------------------------------------------------------------------------------


@admin.group()
def policy() -> None:
    """Set and inspect release policies (docs/policy.md)."""


@policy.command("set")
@click.argument("model_id")
@click.argument("policy_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_context
def policy_set(ctx: _Context, model_id: str, policy_file: Path) -> None:
    """Attach POLICY_FILE (YAML or JSON) to MODEL_ID as its new policy version."""
    from sealtorch.attestation import Policy

    document = Policy.from_file(policy_file).to_dict()  # validated here and on the server
    with ctx.client() as client:
        info = client.set_policy(model_id, document)
    _emit(ctx, info, [(f"model {model_id}: policy v{info.version}", f"digest {info.digest}")])


@policy.command("show")
@click.argument("model_id")
@pass_context
def policy_show(ctx: _Context, model_id: str) -> None:
    """Print MODEL_ID's current policy (normalised)."""
    with ctx.client() as client:
        info = client.show_policy(model_id)
    if ctx.as_json:
        click.echo(info.model_dump_json(indent=2))
        return
    import yaml

    click.echo(f"# model {model_id}, policy v{info.version}, digest {info.digest}")
    click.echo(yaml.safe_dump(info.policy, sort_keys=False).rstrip())


@policy.command("history")
@click.argument("model_id")
@pass_context
def policy_history(ctx: _Context, model_id: str) -> None:
    """Every policy version of MODEL_ID."""
    with ctx.client() as client:
        history = client.policy_history(model_id)
    rows = [("VERSION", "CREATED", "DIGEST", "NAME")]
    rows += [
        (f"v{p.version}", _time(p.created_at), p.digest, str(p.policy.get("name") or "-"))
        for p in history
    ]
    _emit(ctx, history, rows)


# -- tokens ------------------------------------------------------------------------------------


@admin.group()
def token() -> None:
    """Create, list and revoke admin tokens."""


_SCOPE_HELP = "; ".join(f"{scope.value}: {SCOPE_RIGHTS[scope]}" for scope in ADMIN_SCOPES)


@token.command(
    "create",
    epilog="""\b
Examples:
  sealtorch admin token create --name ci-seal --scope seal -o ci.token
  sealtorch admin token create --name auditor --scope read --expires-in 86400
  sealtorch admin token create --name ops --scope read --scope policy-admin

\b
A token can only give scopes it holds itself, and a token that expires can only
create tokens that expire no later.
""",
)
@click.option("--name", required=True, help="What the token is for (shown in listings).")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    metavar="SCOPE",
    help=f"What the token may do; repeat for several (at least one). {_SCOPE_HELP}.",
)
@click.option("--expires-in", type=click.IntRange(60), help="Lifetime in seconds.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the token to this new file (mode 0600) instead of printing it.",
)
@pass_context
def token_create(
    ctx: _Context,
    name: str,
    scopes: tuple[str, ...],
    expires_in: int | None,
    output: Path | None,
) -> None:
    """Create an admin token with the given scopes; it is shown once (stored only as a hash)."""
    try:
        checked = check_scopes(scopes)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if output is not None and output.exists():
        raise ConfigError(f"{output} already exists; choose a new file for the token")
    with ctx.client() as client:
        created = client.create_token(name, scopes=checked, expires_in=expires_in)
    if output is not None:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(created.token + "\n")
        click.echo(
            f"token {created.info.token_id} ({', '.join(created.info.scopes)}) written to "
            f"{output} (mode 0600)"
        )
    elif ctx.as_json:
        click.echo(created.model_dump_json(indent=2))
    else:
        click.echo(
            f"token {created.info.token_id} ({name}; scopes {', '.join(created.info.scopes)}); "
            "shown once:",
            err=True,
        )
        click.echo(created.token)


@token.command("list")
@pass_context
def token_list(ctx: _Context) -> None:
    """List admin tokens (ids, names and scopes; never the secrets)."""
    with ctx.client() as client:
        tokens = client.list_tokens()
    rows = [("TOKEN ID", "NAME", "SCOPES", "CREATED", "EXPIRES", "REVOKED")]
    rows += [
        (
            t.token_id,
            t.name,
            ",".join(t.scopes) or "-",
            _time(t.created_at),
            _time(t.expires_at),
            _time(t.revoked_at),
        )
        for t in tokens
    ]
    _emit(ctx, tokens, rows)


@token.command("revoke")
@click.argument("token_id")
@pass_context
def token_revoke(ctx: _Context, token_id: str) -> None:
    """Revoke an admin token (one with no scope yours lacks; never the last usable token with
    every scope)."""
    with ctx.client() as client:
        info = client.revoke_token(token_id)
    _emit(ctx, info, [(f"token {token_id} revoked",)])


# -- audit -------------------------------------------------------------------------------------


@admin.group()
def audit() -> None:
    """Verify and export the hash-chained audit log."""


def _parse_head(text: str | None) -> Any:
    if text is None:
        return None
    from sealtorch.protocol.audit import AuditHead

    seq, sep, digest = text.partition(":")
    if not sep or not seq.isdigit() or len(digest) != 64:
        raise click.BadParameter("use SEQ:HASH (64 hex digits)", param_hint="--expected-head")
    return AuditHead(seq=int(seq), hash=digest.lower())


@audit.command("verify")
@click.option(
    "--expected-head",
    metavar="SEQ:HASH",
    help="A head recorded earlier (e.g. by `audit export`); the log must still contain it.",
)
@click.option(
    "--file",
    "export_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Verify this export file offline instead of the server's log.",
)
@click.option(
    "--checkpoint",
    "checkpoint_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A JSON Lines file of checkpoints saved by `audit checkpoint` (repeatable): the log "
    "must still hold each one's record. Needs --keyserver-pubkey.",
)
@click.option(
    "--keyserver-pubkey",
    "keyserver_pubkeys",
    multiple=True,
    metavar="KEY",
    help="The key server's release-signing public key (sealtorch-release-key-v1:...; "
    "repeatable during a rollover): every checkpoint must be signed by it.",
)
@pass_context
def audit_verify(
    ctx: _Context,
    expected_head: str | None,
    export_file: Path | None,
    checkpoint_files: tuple[Path, ...],
    keyserver_pubkeys: tuple[str, ...],
) -> None:
    """Recompute the whole chain; any edited, deleted, inserted or reordered record fails.

    With --checkpoint, a log rolled back (tail deleted, head rewritten) or rewritten since a
    saved checkpoint fails too (audit_rolled_back, audit_rewritten). The records are fetched and
    checked here, not by the server."""
    from sealtorch.protocol.audit import read_jsonl, verify_chain
    from sealtorch.protocol.checkpoint import (
        check_log_against,
        read_checkpoints,
        verify_checkpoint,
    )
    from sealtorch.protocol.statement import TrustedReleaseKeys

    anchor = _parse_head(expected_head)
    checkpoints = []
    if checkpoint_files:
        if not keyserver_pubkeys:
            raise click.UsageError(
                "--checkpoint needs --keyserver-pubkey (`sealtorch keyserver signing-key show "
                "DATA_DIR` prints it): a checkpoint is only as good as the key that signed it"
            )
        trusted = TrustedReleaseKeys(keyserver_pubkeys)
        for path in checkpoint_files:
            with open(path, encoding="utf-8") as handle:
                for where, signed in read_checkpoints(handle, name=str(path)):
                    checkpoints.append((where, verify_checkpoint(signed, trusted, where=where)))
    hashes: dict[int, str] = {}
    wanted = {checkpoint.seq for _, checkpoint in checkpoints}

    def remember(records: Any) -> Any:
        for record in records:
            if record.seq in wanted:
                hashes[record.seq] = record.hash
            yield record

    if export_file is not None:
        with open(export_file, encoding="utf-8") as handle:
            summary = verify_chain(remember(read_jsonl(handle)), expected_head=anchor)
    else:
        with ctx.client() as client:
            records = list(client.iter_audit())
            head = client.audit_head()
        summary = verify_chain(
            remember(r for r in records if r.seq <= head.seq), head=head, expected_head=anchor
        )
    for where, checkpoint in checkpoints:
        check_log_against(hashes, last_seq=summary.last_seq, checkpoint=checkpoint, where=where)
    if ctx.as_json:
        click.echo(
            json.dumps(
                {"records": summary.count, "head": f"{summary.last_seq}:{summary.last_hash}"}
            )
        )
    else:
        click.echo(
            f"audit chain verified: {summary.count} records; head "
            f"{summary.last_seq}:{summary.last_hash}"
            + (f"; {len(checkpoints)} checkpoint(s) hold" if checkpoints else "")
        )


@audit.command("checkpoint")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON Lines file to append the checkpoint to (created if missing; '-' for stdout). "
    "Keep it off the key server's host.",
)
@pass_context
def audit_checkpoint(ctx: _Context, output: Path) -> None:
    """Save the server's signed audit head (a checkpoint) for `audit verify --checkpoint`.

    Run it regularly from somewhere the key server's operators cannot write to (your CI, a
    WORM bucket's uploader): a later rollback or rewrite of the log cannot match it."""
    with ctx.client() as client:
        signed = client.audit_checkpoint()
    line = signed.model_dump_json() + "\n"
    if str(output) == "-":
        click.echo(line, nl=False)
    else:
        with open(output, "a", encoding="ascii") as handle:
            handle.write(line)
    from sealtorch.protocol.checkpoint import AuditCheckpoint

    checkpoint = AuditCheckpoint.from_payload(signed.payload)
    click.echo(
        f"checkpoint {checkpoint.seq}:{checkpoint.head_hash} (key {checkpoint.signing_key_id}) "
        f"{'written' if str(output) == '-' else f'appended to {output}'}",
        err=True,
    )


@audit.command("export")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON Lines file to write ('-' for stdout). Refuses to overwrite.",
)
@pass_context
def audit_export(ctx: _Context, output: Path) -> None:
    """Export every audit record as JSON Lines (keep exports elsewhere: they anchor the chain)."""
    from sealtorch.protocol.audit import export_jsonl, verify_chain

    with ctx.client() as client:
        records = list(client.iter_audit())
    summary = verify_chain(records)
    if str(output) == "-":
        export_jsonl(records, sys.stdout)
    else:
        try:
            handle = open(output, "x", encoding="ascii")  # noqa: SIM115 - closed below
        except FileExistsError as exc:
            raise ConfigError(f"{output} already exists; choose a new file") from exc
        with handle:
            export_jsonl(records, handle)
    click.echo(
        f"exported {summary.count} records; head {summary.last_seq}:{summary.last_hash} "
        "(keep it: `audit verify --expected-head` checks later logs against it)",
        err=True,
    )
