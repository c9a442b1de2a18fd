"""What a storage failure becomes on the wire: corruption and a full disk are said as such (with
what the operator must do), not as "retry later" (issue 14, item 2)."""

from __future__ import annotations

import pytest

from sealtorch.errors import (
    AuditError,
    ErrorKind,
    StorageCorruptError,
    StorageError,
    StorageFullError,
)
from sealtorch.keyserver._service import unavailable


@pytest.mark.parametrize(
    ("failure", "code", "says"),
    [
        (StorageCorruptError("database disk image is malformed"), "store_corrupt", "backup"),
        (StorageFullError("database or disk is full"), "store_full", "freed space"),
        (AuditError("the audit record could not be committed"), "audit_unavailable", "retry"),
        (StorageError("connection refused"), "store_unavailable", "retry later"),
    ],
)
def test_storage_failures_are_named(failure: StorageError, code: str, says: str) -> None:
    refusal = unavailable(failure)
    assert refusal.kind is ErrorKind.UNAVAILABLE
    assert refusal.kind.status == 503
    assert refusal.code == code
    assert says in str(refusal)
    assert "malformed" not in str(refusal)  # the driver's text stays in the log
