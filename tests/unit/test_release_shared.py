"""The protocol rules the key server and the key cache share (sealtorch._release,
sealtorch._release_http, sealtorch._settings): each is tested here once, and through both
services in their own tests."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.responses import JSONResponse

from sealtorch._release import (
    NONCE_SIZE,
    ErrorKind,
    OutcomeReporter,
    Refusal,
    RequestError,
    collateral_cap,
    decision_name,
    new_challenge,
    release_response,
    session_models,
)
from sealtorch._release_http import (
    HTTP_STATUS,
    error_body,
    error_document,
    read_body,
    validation_message,
)
from sealtorch._settings import Section, file_sources, format_errors, read_toml, resolve_path
from sealtorch.attestation import Claims
from sealtorch.errors import ConfigError, Error
from sealtorch.protocol import HPKE_SUITES, DeniedModel, ReleaseRequest

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def _claims(next_update: datetime | None) -> Claims:
    return Claims(
        tee="sim",
        evidence_type="sim",
        simulated=True,
        debug=False,
        report_data=bytes(64),
        evidence_digest="00" * 32,
        tcb_status="UpToDate",
        verified_at=NOW,
        collateral_next_update=next_update,
    )


# -- renewals stay within their session -----------------------------------------------------------


def test_a_renewal_cannot_reach_models_outside_its_session() -> None:
    models, outside = session_models(("a", "secret", "b"), ("a", "b"))
    assert models == ("a", "b")
    assert [(d.model_id, d.reasons) for d in outside] == [("secret", ("not_in_session",))]


def test_a_renewal_of_every_model_means_every_model_of_the_session() -> None:
    assert session_models(None, ("a", "b")) == (("a", "b"), [])


def test_a_session_for_every_model_restricts_nothing() -> None:
    assert session_models(("a",), None) == (("a",), [])
    assert session_models(None, None) == (None, [])


# -- leases and sessions never outlive the collateral ---------------------------------------------


def test_collateral_freshness_caps_leases() -> None:
    end = NOW + timedelta(hours=1)
    soon = datetime(2030, 1, 2, 5, 0, tzinfo=timezone(timedelta(hours=2)))  # 03:00 UTC
    capped = collateral_cap(end, _claims(soon))
    assert capped == NOW.replace(hour=3, minute=0, second=0)
    assert capped.tzinfo is UTC
    assert collateral_cap(end, _claims(NOW + timedelta(days=1))) == end
    assert collateral_cap(end, _claims(None)) == end


# -- responses ------------------------------------------------------------------------------------


def test_asking_for_every_model_does_not_reveal_denied_ids() -> None:
    denial = DeniedModel(model_id="hidden", reasons=("measurement_mismatch",), message="no")
    everything = release_response(
        request_id="r", server_time=NOW, granted=(), denials=[denial], requested=None
    )
    assert everything.denied == ()
    named = release_response(
        request_id="r", server_time=NOW, granted=(), denials=[denial], requested=("hidden",)
    )
    assert named.denied == (denial,)


def test_a_challenge_offers_the_protocol_suites() -> None:
    challenge = new_challenge(
        b"\x07" * NONCE_SIZE, expires_at=NOW + timedelta(seconds=30), evidence_types=("sim",)
    )
    assert challenge.nonce == b"\x07" * NONCE_SIZE
    assert challenge.expires_at == NOW + timedelta(seconds=30)
    assert challenge.hpke_suites == HPKE_SUITES
    assert challenge.evidence_types == ("sim",)


# -- outcomes -------------------------------------------------------------------------------------


class _SideError(RequestError):
    pass


def test_refusals_are_raised_as_the_sides_error_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[tuple[str, str, list[str], int]] = []
    reporter = OutcomeReporter(
        logging.getLogger("sealtorch.test.release"),
        lambda *args: seen.append(args),
        error=_SideError,
        label="local ",
    )
    caplog.set_level(logging.INFO, logger="sealtorch.test.release")
    refusal = Refusal(ErrorKind.FORBIDDEN, "nonce_invalid", "ask again")
    with pytest.raises(_SideError) as info:
        reporter.refuse("release", "req-1", refusal)
    assert isinstance(info.value, Error)
    assert (info.value.kind, info.value.code, info.value.reasons) == (
        ErrorKind.FORBIDDEN,
        "nonce_invalid",
        ("nonce_invalid",),
    )
    assert str(info.value) == "ask again"
    assert seen == [("release", "refuse", ["nonce_invalid"], 0)]
    assert caplog.messages == ["local release refused"]


def test_decisions() -> None:
    seen: list[tuple[str, str, list[str], int]] = []
    reporter = OutcomeReporter(
        logging.getLogger("sealtorch.test.release"),
        lambda *args: seen.append(args),
        error=_SideError,
    )
    denial = DeniedModel(model_id="m", reasons=("debug_enclave",), message="debug")
    assert reporter.decided("renew", granted=True, denials=[denial], released=2) == "partial"
    assert seen == [("renew", "partial", ["debug_enclave"], 2)]
    assert decision_name(granted=True, denied=False) == "allow"
    assert decision_name(granted=False, denied=True) == "deny"
    assert decision_name(granted=False, denied=False) == "deny"


# -- HTTP -----------------------------------------------------------------------------------------


def test_every_error_kind_has_a_status() -> None:
    assert set(HTTP_STATUS) == set(ErrorKind)


@pytest.mark.parametrize("message", ["plain", "modèle «x» — 模型", 'quote " and \\ backslash'])
def test_error_bodies_are_the_bytes_fastapi_sends(message: str) -> None:
    """The key server's short path, its FastAPI routes and the key cache answer alike."""
    reasons = ("a", "b")
    framework = JSONResponse(error_document("some_code", message, reasons)).body
    assert error_body("some_code", message, reasons) == framework


def test_validation_messages_never_echo_the_input() -> None:
    secret = "sts_" + "s" * 40
    with pytest.raises(ValidationError) as info:
        ReleaseRequest.model_validate({"nonce": secret, "evidence": {"type": 5}, "hpke": secret})
    message = validation_message(info.value.errors(include_url=False))
    assert message.startswith("the request is not valid: ")
    assert secret not in message
    assert "Value error" not in message
    prefixed = [{"loc": ("body", "nonce"), "msg": "Value error, too short"}]
    assert validation_message(prefixed) == "the request is not valid: nonce: too short"


def _receiver(messages: list[dict[str, Any]]) -> Any:
    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return receive


@pytest.mark.parametrize(
    ("headers", "chunks", "expected"),
    [
        ([], [b"ab", b"cd"], b"abcd"),
        ([(b"content-length", b"4")], [b"abcd"], b"abcd"),
        ([(b"content-length", b"9")], [b"abcd"], None),  # announced too large
        ([(b"content-length", b"x")], [b"abcd"], None),  # not a number
        ([], [b"abc", b"de"], None),  # chunked past the cap
    ],
)
def test_bodies_are_read_up_to_the_cap(
    headers: list[tuple[bytes, bytes]], chunks: list[bytes], expected: bytes | None
) -> None:
    messages = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    body = asyncio.run(read_body({"headers": headers}, _receiver(messages), 4))
    assert body == expected


# -- settings -------------------------------------------------------------------------------------


class _Table(Section):
    port: int = 1


class _File(Section):
    server: _Table = _Table()


def test_settings_errors_list_every_problem_and_point_to_the_docs() -> None:
    with pytest.raises(ValidationError) as info:
        _File.model_validate({"server": {"prot": 2, "port": "x"}})
    text = format_errors(info.value, "conf.toml", docs="docs/x.md")
    assert text.startswith("conf.toml has invalid settings:")
    assert "server.prot: unknown setting (check the spelling; see docs/x.md)" in text
    assert "server.port:" in text


def test_config_files(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    with pytest.raises(ConfigError, match=r"^no such file, run init$"):
        read_toml(path, missing="no such file, run init")
    path.write_text("[server]\nport = 3\n[other]\n")
    raw = read_toml(path, missing="-")
    assert file_sources(raw) == {"server.port": "file"}
    path.write_text("[server\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        read_toml(path, missing="-")
    assert resolve_path(tmp_path, "a/b") == tmp_path / "a" / "b"
    assert resolve_path(None, "a") == Path("a")
    assert resolve_path(tmp_path, "/abs") == Path("/abs")
    assert resolve_path(tmp_path, "") is None
