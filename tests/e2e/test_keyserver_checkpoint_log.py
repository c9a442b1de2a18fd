"""The key server signs its audit head periodically into its log (issue 12, item 5), so log
shipping carries checkpoints off the host without an owner's cron job; ``audit verify
--checkpoint`` reads that log and finds a rollback made after the logged checkpoint.

Real ``sealtorch keyserver serve`` process, real CLI, the attacker in SQLite with the triggers
gone.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from _fixtures.keyserver import ServeProcess, init_dir, start_serve
from _fixtures.polling import eventually
from sealtorch.attestation import SimAttester
from sealtorch.cli import cli
from sealtorch.client import AdminClient, read_token

pytestmark = pytest.mark.e2e

INTERVAL_ENV = "SEALTORCH_KEYSERVER_AUDIT_CHECKPOINT_LOG_SECONDS"


def _logged_checkpoints(server: ServeProcess) -> list[dict[str, object]]:
    records = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    return [r for r in records if "audit_checkpoint" in r]


def _verify(server: ServeProcess, token_file: Path, *args: str) -> Result:
    return CliRunner().invoke(
        cli,
        ["admin", "--server", server.url, "--ca", str(server.data_dir / "tls" / "ca.crt"),
         "--token-file", str(token_file), "audit", "verify",
         "--keyserver-pubkey", server.release_key, *args],
    )  # fmt: skip


def test_logged_checkpoints_verify_and_reveal_a_rollback(tmp_path: Path) -> None:
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    data, token_file = init_dir(tmp_path, attester)
    assert "checkpoint_log_seconds = 300" in (data / "keyserver.toml").read_text()  # default
    server = start_serve(
        data, "--allow-simulated-tee-insecure", env={INTERVAL_ENV: "0.2"}, log_dir=tmp_path / "log"
    )
    try:
        admin = AdminClient(
            server.url, token=read_token(token_file=token_file), ca=data / "tls" / "ca.crt"
        )
        with admin:
            for name in ("m1", "m2", "m3"):
                admin.create_model(name)
            head = admin.audit_head()

        def current() -> list[dict[str, object]]:
            prefix = f"audit checkpoint {head.seq}:"
            return [c for c in _logged_checkpoints(server) if str(c["message"]).startswith(prefix)]

        eventually(lambda: bool(current()), what="a logged checkpoint of the current head")
        assert current()[0]["level"] == "info"
        # The log itself is a checkpoint file (its other records are skipped).
        log_file = tmp_path / "keyserver.jsonl"
        log_file.write_text(
            "".join(f"{line}\n" for line in server.logs().splitlines() if line.startswith("{"))
        )
        result = _verify(server, token_file, "--checkpoint", str(log_file))
        assert result.exit_code == 0, result.output
        # An idle server logs no new checkpoint line: the head did not move.
        count = len(_logged_checkpoints(server))
        time.sleep(0.6)
        assert len(_logged_checkpoints(server)) == count

        # The attacker deletes the tail and rewrites the head, consistently.
        database = sqlite3.connect(data / "keyserver.db")
        with database:
            database.execute("DROP TRIGGER audit_log_no_delete")
            database.execute("DROP TRIGGER audit_log_no_update")
            (hash_,) = database.execute(
                "SELECT hash FROM audit_log WHERE seq = ?", (head.seq - 2,)
            ).fetchone()
            database.execute("DELETE FROM audit_log WHERE seq > ?", (head.seq - 2,))
            database.execute("UPDATE audit_head SET seq = ?, hash = ?", (head.seq - 2, hash_))
        database.close()
        result = _verify(server, token_file, "--checkpoint", str(log_file))
        assert result.exit_code != 0
        assert "audit_rolled_back" in result.output
    finally:
        server.stop()


def test_a_log_without_checkpoints_is_not_silently_accepted(tmp_path: Path) -> None:
    log_file = tmp_path / "keyserver.jsonl"
    log_file.write_text(
        '{"time":"2026-12-07T05:00:00.000Z","level":"info","logger":"x","message":"hello"}\n'
    )
    result = CliRunner().invoke(
        cli,
        ["admin", "--server", "https://127.0.0.1:1", "audit", "verify", "--checkpoint",
         str(log_file), "--keyserver-pubkey",
         "sealtorch-release-key-v1:T-j8ppceebrXRcwo7v1LW9-srh_ICYpNk04WOuZCsbk"],
        env={"SEALTORCH_ADMIN_TOKEN": "sta_x"},
    )  # fmt: skip
    assert result.exit_code != 0
    assert "holds no audit checkpoint" in result.output
