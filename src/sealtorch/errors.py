"""The exception tree for everything public in sealtorch.

Every error sealtorch raises on purpose derives from :class:`Error`, and its message says what
went wrong and what to do about it. Third-party exceptions are wrapped (``raise ... from exc``).

Two deliberate asymmetries:

* Authentication failures are uninformative. Every way a sealed file can fail to authenticate
  (a flipped bit, truncation, reordered or spliced chunks, an edited header field, a wrong key)
  raises the same :class:`IntegrityError` with the same message, so the error is no oracle.
* Policy denials are informative. :class:`PolicyDenied` carries stable reason codes (see
  ``docs/policy.md``) so that operators can see exactly which rule refused a release.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import StrEnum

__all__ = [
    "AttestationError",
    "AuditError",
    "CollateralError",
    "ConfigError",
    "Error",
    "EvidenceError",
    "FormatError",
    "IntegrityError",
    "KeyAccessError",
    "KeyReleaseError",
    "KeyReleaseRefusedError",
    "KeySourceUnreachableError",
    "PayloadError",
    "PolicyDenied",
    "PolicyError",
    "ProtocolError",
    "ReleaseStatementError",
    "RequestError",
    "SelfAttestationError",
    "StorageCorruptError",
    "StorageError",
    "StorageFullError",
    "UnsafePickleError",
]


class Error(Exception):
    """Base class of every error sealtorch raises on purpose."""

    #: Process exit code the CLI uses for this kind of error.
    exit_code: int = 1


class ConfigError(Error):
    """A setting, option, file path or configuration document is missing or invalid."""

    exit_code = 2


class FormatError(Error):
    """The input is not a sealed file this version understands (bad magic, unknown version).

    Raised before any cryptography runs, so its message may be specific. Anything that fails
    *after* the preamble is an :class:`IntegrityError`.
    """


INTEGRITY_MESSAGE = (
    "sealed file failed authentication: it is damaged, truncated or was modified, "
    "or the key is not the one it was sealed with"
)


class IntegrityError(Error):
    """A sealed file failed authentication.

    Deliberately uninformative: every cause (tampering, truncation, reordering, splicing, an
    edited header, a wrong key) gives this same error and message, and nothing is returned or
    written.
    """

    def __init__(self, message: str = INTEGRITY_MESSAGE) -> None:
        super().__init__(message)


class PayloadError(Error):
    """A model payload cannot be read, built or written (unknown architecture, bad tensors...)."""


class UnsafePickleError(PayloadError):
    """A ``.pt``/``.pth`` file needs full unpickling, which could run arbitrary code.

    sealtorch only reads pickles with ``torch.load(weights_only=True)``. Convert the model to a
    plain ``state_dict`` of tensors (or to safetensors) on a trusted machine first.
    """


class KeyAccessError(Error):
    """A model key could not be obtained (missing or unreadable key file, unknown key version)."""


class AttestationError(Error):
    """Attestation evidence could not be produced or verified."""


class EvidenceError(AttestationError):
    """Evidence is malformed, its signature chain does not verify, or the device refused."""


class CollateralError(AttestationError):
    """Verification collateral (CRLs, TCB info, QE identity) is missing, invalid or stale."""

    def __init__(self, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


class PolicyError(ConfigError):
    """A release policy document is invalid (schema violation, unknown field, bad value)."""


class PolicyDenied(AttestationError):  # noqa: N818 - a decision, not a malfunction
    """Verified evidence does not satisfy a release policy.

    ``reasons`` holds every failing rule as a stable reason code (e.g. ``measurement_mismatch``,
    ``debug_enclave``, ``tcb_out_of_date``); see ``docs/policy.md`` for the full list.
    """

    def __init__(self, reasons: Iterable[str], message: str) -> None:
        self.reasons: tuple[str, ...] = tuple(reasons)
        super().__init__(message)


class KeyReleaseError(Error):
    """A key server or key cache refused to release keys, or could not be reached."""

    def __init__(
        self, message: str, *, reasons: Sequence[str] = (), status_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.reasons: tuple[str, ...] = tuple(reasons)
        self.status_code = status_code


class KeySourceUnreachableError(KeyReleaseError):
    """The key server or key cache could not be reached (connection refused, timeout, TLS), or
    answered 5xx, or refused for a transient reason (an expired nonce, collateral down).

    Unlike a refusal, this says nothing about the enclave's evidence: retrying later may work.
    """


class KeyReleaseRefusedError(KeyReleaseError):
    """The key server refused a key cache's own release request because of its evidence
    (untrusted attestation key, invalid evidence, stale collateral...). ``code`` is the first
    reason code; serving keys the server refuses would make the cache more permissive."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        reasons: Sequence[str] = (),
        status_code: int | None = None,
    ) -> None:
        super().__init__(message, reasons=reasons or (code,), status_code=status_code)
        self.code = code


class SelfAttestationError(AttestationError):
    """This process could not produce its own evidence (TEE device missing or refusing)."""


class ProtocolError(Error):
    """A peer sent a message that does not follow the sealtorch key release protocol."""


class ReleaseStatementError(ProtocolError):
    """A released key whose origin is not proven: its release statement is missing, is not
    signed by a pinned key server release-signing key, does not verify, or does not match the
    key it came with.

    ``reason`` is a stable code (``docs/protocol.md``): ``statement_missing``,
    ``statement_unpinned_key``, ``statement_invalid``, ``statement_mismatch`` or
    ``key_commitment_mismatch``. The key is never used.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.reasons: tuple[str, ...] = (reason,)


class StorageError(Error):
    """The key store (SQLite or PostgreSQL) or the master key provider failed."""


class AuditError(StorageError):
    """The audit log could not be written, or its hash chain does not verify."""


class StorageCorruptError(StorageError):
    """The key store's database is damaged (SQLite ``quick_check`` failed, a malformed page,
    not a database file; PostgreSQL reported data corruption). Retrying does not help: restore
    the database from a backup (docs/keyserver.md, "Backups and restore")."""


class StorageFullError(StorageError):
    """The key store cannot write because its disk (or file size limit) is full. Nothing was
    committed; free space and it recovers by itself."""


class ErrorKind(StrEnum):
    """What kind of refusal a :class:`RequestError` is; :attr:`status` is its HTTP status.

    Not in ``__all__``, which lists only the error classes; import it by name."""

    INVALID = "invalid"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA = "unsupported_media"
    UNAVAILABLE = "unavailable"

    @property
    def status(self) -> int:
        """The HTTP status of this kind of refusal (400, 401, 403, 404, 409, 413, 415, 503)."""
        return _HTTP_STATUS[self]


_HTTP_STATUS = {
    ErrorKind.INVALID: 400,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.UNSUPPORTED_MEDIA: 415,
    ErrorKind.UNAVAILABLE: 503,
}


class RequestError(Error):
    """A request a server refuses or cannot serve (never a server malfunction): ``kind`` says
    which (and so the HTTP status, :attr:`status`), ``code`` is stable (``docs/protocol.md``),
    ``reasons`` are reason codes.

    The key server raises :class:`~sealtorch.keyserver.service.ServiceError` and the key cache
    :class:`~sealtorch.keycache.service.LocalError`, both of this kind.
    """

    def __init__(
        self, kind: ErrorKind, code: str, message: str, *, reasons: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.reasons = tuple(reasons)

    @property
    def status(self) -> int:
        """The HTTP status of this refusal (from :attr:`kind`)."""
        return self.kind.status
