"""The attacker has the database and rolls the audit log back or rewrites it consistently, so
the plain chain check passes: the owner's saved checkpoints (signed audit heads) show it.

Real key server (SQLite and PostgreSQL), real CLI, the attacker in SQL with the triggers gone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from _fixtures.keyserver import KeyServerUnderTest
from sealtorch.cli import cli
from sealtorch.keyserver.signingkey import FileReleaseSigningKey
from sealtorch.protocol._wire import b64decode, b64encode
from sealtorch.protocol.checkpoint import AuditCheckpoint, issue_checkpoint


@pytest.fixture
def attacker(keyserver: KeyServerUnderTest, store_url: str) -> Iterator[sa.Engine]:
    """A direct database connection that first removes the append-only triggers."""
    del keyserver  # started first: it migrates the database
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
        else:
            conn.execute(sa.text("DROP TRIGGER audit_log_no_update"))
            conn.execute(sa.text("DROP TRIGGER audit_log_no_delete"))
    yield engine
    engine.dispose()


def _admin(keyserver: KeyServerUnderTest, *args: str) -> Result:
    return CliRunner().invoke(
        cli,
        ["admin", "--server", keyserver.url, "--ca", str(keyserver.ca), *args],
        env={"SEALTORCH_ADMIN_TOKEN": keyserver.admin_token},
    )


def _decisions(keyserver: KeyServerUnderTest, *names: str) -> None:
    with keyserver.admin() as admin:
        for name in names:
            admin.create_model(name)


def _checkpoint(keyserver: KeyServerUnderTest, path: Path) -> AuditCheckpoint:
    result = _admin(keyserver, "audit", "checkpoint", "-o", str(path))
    assert result.exit_code == 0, result.output
    line = path.read_text().splitlines()[-1]
    return AuditCheckpoint.from_payload(b64decode(json.loads(line)["payload"]))


def _verify(keyserver: KeyServerUnderTest, *args: str, pins: tuple[str, ...] = ()) -> Result:
    pinned = [a for key in (pins or (keyserver.release_key,)) for a in ("--keyserver-pubkey", key)]
    return _admin(keyserver, "audit", "verify", *pinned, *args)


def _roll_back(keyserver: KeyServerUnderTest, attacker: sa.Engine, *, to: int) -> None:
    """Delete the tail and move the head back consistently (the plain check then passes)."""
    records = list(keyserver.store.iter_audit())
    with attacker.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_log WHERE seq > :s"), {"s": to})
        conn.execute(
            sa.text("UPDATE audit_head SET seq = :s, hash = :h"),
            {"s": to, "h": records[to - 1].hash},
        )


def _rewrite(keyserver: KeyServerUnderTest, attacker: sa.Engine, *, at: int) -> None:
    """Edit record ``at`` and re-hash the chain forward, head included."""
    records = list(keyserver.store.iter_audit())
    prev = records[at - 2].hash
    with attacker.begin() as conn:
        for record in records[at - 1 :]:
            changed = dataclasses.replace(
                record,
                decision="deny" if record.seq == at else record.decision,
                prev_hash=prev,
                hash="",
            )
            prev = changed.computed_hash()
            conn.execute(
                sa.text(
                    "UPDATE audit_log SET decision = :d, prev_hash = :p, hash = :h WHERE seq = :s"
                ),
                {"d": changed.decision, "p": changed.prev_hash, "h": prev, "s": record.seq},
            )
        conn.execute(
            sa.text("UPDATE audit_head SET seq = :s, hash = :h"), {"s": records[-1].seq, "h": prev}
        )


def test_healthy_log_with_several_checkpoints_passes(
    keyserver: KeyServerUnderTest, tmp_path: Path
) -> None:
    saved = tmp_path / "checkpoints.jsonl"
    first = _checkpoint(keyserver, saved)
    _decisions(keyserver, "m1", "m2")
    second = _checkpoint(keyserver, saved)
    _decisions(keyserver, "m3")
    other = tmp_path / "later.jsonl"
    third = _checkpoint(keyserver, other)
    assert first.seq < second.seq < third.seq
    assert first.signing_key_id == keyserver.signing_key.key_id
    result = _verify(keyserver, "--checkpoint", str(saved), "--checkpoint", str(other))
    assert result.exit_code == 0, result.output
    assert "3 checkpoint(s) hold" in result.output
    # The offline verify of an export takes them too.
    export = tmp_path / "audit.jsonl"
    assert _admin(keyserver, "audit", "export", "-o", str(export)).exit_code == 0
    result = _verify(keyserver, "--file", str(export), "--checkpoint", str(saved))
    assert result.exit_code == 0, result.output


def test_rolled_back_log_is_found(
    keyserver: KeyServerUnderTest, attacker: sa.Engine, tmp_path: Path
) -> None:
    _decisions(keyserver, "m1")
    saved = tmp_path / "checkpoints.jsonl"
    _checkpoint(keyserver, saved)
    _decisions(keyserver, "m2", "m3")
    checkpoint = _checkpoint(keyserver, saved)
    _roll_back(keyserver, attacker, to=checkpoint.seq - 2)
    plain = _admin(keyserver, "audit", "verify")
    assert plain.exit_code == 0, plain.output  # the hash chain alone cannot tell
    result = _verify(keyserver, "--checkpoint", str(saved))
    assert result.exit_code != 0
    assert "audit_rolled_back" in result.output
    assert f"{saved} line 2" in result.output
    assert f"ends at record {checkpoint.seq - 2}" in result.output
    # Offline too: an export made after the rollback.
    export = tmp_path / "audit.jsonl"
    assert _admin(keyserver, "audit", "export", "-o", str(export)).exit_code == 0
    result = _verify(keyserver, "--file", str(export), "--checkpoint", str(saved))
    assert result.exit_code != 0
    assert "audit_rolled_back" in result.output


def test_rewritten_and_rehashed_log_is_found(
    keyserver: KeyServerUnderTest, attacker: sa.Engine, tmp_path: Path
) -> None:
    _decisions(keyserver, "m1", "m2", "m3")
    saved = tmp_path / "checkpoints.jsonl"
    checkpoint = _checkpoint(keyserver, saved)
    _rewrite(keyserver, attacker, at=2)
    plain = _admin(keyserver, "audit", "verify")
    assert plain.exit_code == 0, plain.output
    result = _verify(keyserver, "--checkpoint", str(saved))
    assert result.exit_code != 0
    assert "audit_rewritten" in result.output
    assert f"audit record {checkpoint.seq} has hash" in result.output


def test_rollback_then_new_records_is_found(
    keyserver: KeyServerUnderTest, attacker: sa.Engine, tmp_path: Path
) -> None:
    """Rolled back, then the server appends again up to (and past) the checkpoint's seq."""
    _decisions(keyserver, "m1", "m2")
    saved = tmp_path / "checkpoints.jsonl"
    checkpoint = _checkpoint(keyserver, saved)
    _roll_back(keyserver, attacker, to=checkpoint.seq - 1)
    _decisions(keyserver, "m4", "m5")
    assert _admin(keyserver, "audit", "verify").exit_code == 0
    result = _verify(keyserver, "--checkpoint", str(saved))
    assert result.exit_code != 0
    assert "audit_rewritten" in result.output


def _forge(path: Path, line: dict[str, str]) -> None:
    path.write_text(json.dumps(line) + "\n")


def test_forged_checkpoints_are_refused(keyserver: KeyServerUnderTest, tmp_path: Path) -> None:
    _decisions(keyserver, "m1")
    saved = tmp_path / "checkpoints.jsonl"
    _checkpoint(keyserver, saved)
    genuine = json.loads(saved.read_text())
    # A tampered byte: the payload names another sequence number than the one signed.
    payload = b64decode(genuine["payload"]).replace(b'"seq":', b'"seq":1', 1)
    tampered = tmp_path / "tampered.jsonl"
    _forge(tampered, {**genuine, "payload": b64encode(payload)})
    result = _verify(keyserver, "--checkpoint", str(tampered))
    assert result.exit_code != 0
    assert "checkpoint_invalid" in result.output
    # A checkpoint signed by another key (another key server, or the attacker's own key).
    stranger = FileReleaseSigningKey.create(tmp_path / "other.key")
    head = keyserver.store.audit_head()
    forged = issue_checkpoint(
        stranger, seq=head.seq, head_hash=head.hash, issued_at=datetime.now(UTC)
    )
    other = tmp_path / "other.jsonl"
    other.write_text(forged.model_dump_json() + "\n")
    result = _verify(keyserver, "--checkpoint", str(other))
    assert result.exit_code != 0
    assert "checkpoint_unpinned_key" in result.output
    # The other key's id swapped in: the signature is still the stranger's.
    _forge(other, {**json.loads(other.read_text()), "key_id": keyserver.signing_key.key_id})
    result = _verify(keyserver, "--checkpoint", str(other))
    assert result.exit_code != 0
    assert "checkpoint_invalid" in result.output
    # Our server's genuine checkpoint, verified under another server's pin.
    result = _verify(keyserver, "--checkpoint", str(saved), pins=(stranger.public_key.text,))
    assert result.exit_code != 0
    assert "checkpoint_unpinned_key" in result.output


def test_checkpoint_needs_a_pinned_key(keyserver: KeyServerUnderTest, tmp_path: Path) -> None:
    saved = tmp_path / "checkpoints.jsonl"
    _checkpoint(keyserver, saved)
    result = _admin(keyserver, "audit", "verify", "--checkpoint", str(saved))
    assert result.exit_code != 0
    assert "--keyserver-pubkey" in result.output
