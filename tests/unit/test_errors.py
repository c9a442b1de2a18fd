from __future__ import annotations

import pytest

from sealtorch import errors


def test_every_public_error_derives_from_error() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.Error), name


def test_integrity_error_is_uninformative_by_default() -> None:
    assert str(errors.IntegrityError()) == errors.INTEGRITY_MESSAGE
    assert "key" in errors.INTEGRITY_MESSAGE  # tells the user what else to check


def test_policy_denied_carries_reason_codes() -> None:
    exc = errors.PolicyDenied(["debug_enclave", "tcb_out_of_date"], "refused")
    assert exc.reasons == ("debug_enclave", "tcb_out_of_date")
    assert isinstance(exc, errors.AttestationError)


def test_config_errors_exit_with_usage_code() -> None:
    assert errors.ConfigError.exit_code == 2
    assert errors.PolicyError.exit_code == 2
    assert errors.IntegrityError.exit_code == 1


def test_collateral_error_knows_staleness() -> None:
    assert errors.CollateralError("old", stale=True).stale
    assert not errors.CollateralError("missing").stale


@pytest.mark.parametrize("cls", [errors.KeyReleaseError])
def test_key_release_error_reasons(cls: type[errors.KeyReleaseError]) -> None:
    exc = cls("denied", reasons=["measurement_mismatch"], status_code=403)
    assert exc.reasons == ("measurement_mismatch",)
    assert exc.status_code == 403


def test_a_request_error_has_the_http_status_of_its_kind() -> None:
    statuses = {kind: kind.status for kind in errors.ErrorKind}
    assert statuses[errors.ErrorKind.INVALID] == 400
    assert statuses[errors.ErrorKind.FORBIDDEN] == 403
    assert statuses[errors.ErrorKind.UNAVAILABLE] == 503
    assert all(400 <= status < 600 for status in statuses.values())
    refused = errors.RequestError(
        errors.ErrorKind.NOT_FOUND, "unknown_model", "no such model", reasons=["a"]
    )
    assert isinstance(refused, errors.Error)
    assert (refused.status, refused.code, refused.reasons, str(refused)) == (
        404,
        "unknown_model",
        ("a",),
        "no such model",
    )
