"""Release policies: a declarative YAML/JSON document evaluated against verified claims.

The schema, every field and every reason code are documented in ``docs/policy.md``. In short::

    version: 1
    name: resnet50-prod
    allowed_tees: [sgx]
    sgx:
      mrenclave: ["33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"]
      mrsigner: ["815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"]
      isv_prod_id: 0
      min_isv_svn: 0
    tcb:
      accepted_statuses: [UpToDate]
      allowed_advisories: []

Defaults are strict: only ``UpToDate`` TCB, no advisories, no debug enclaves, no simulated TEE.
Every TEE type a policy allows must pin that TEE's code identity, unless the policy says
``allow_any_measurement_insecure: true``; so "anything goes" cannot ship by accident.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from sealtorch.attestation._policy_fields import U16, Hex32, Hex48, StrictBool, _Schema
from sealtorch.attestation.binding import binding_reasons
from sealtorch.attestation.claims import Claims, TcbStatus, TeeType
from sealtorch.attestation.snp_policy import SNP_REASON_CODES, SnpRules, check_snp
from sealtorch.errors import PolicyDenied, PolicyError

__all__ = [
    "INSECURE_FLAGS",
    "REASON_CODES",
    "Decision",
    "Policy",
    "SgxRules",
    "SnpRules",
    "TcbRules",
    "TdxRules",
]

#: Every stable reason code, with what it means. Codes are never renamed or reused.
REASON_CODES: Final[dict[str, str]] = {
    "tee_not_allowed": "the evidence comes from a TEE type the policy does not allow "
    "(or that no verifier is configured for)",
    "simulated_not_allowed": "the evidence is from the simulated TEE and the policy does not "
    "list sim",
    "measurement_mismatch": "the code measurement (MRENCLAVE for SGX/sim, MRTD for TDX, "
    "MEASUREMENT for SNP) is not one the policy allows",
    "mrsigner_mismatch": "MRSIGNER (the enclave signer) is not one the policy allows",
    "isv_prod_id_mismatch": "ISVPRODID is not the product id the policy requires",
    "isv_svn_too_low": "ISVSVN is below the policy's minimum",
    "rtmr_mismatch": "a TDX runtime measurement register (RTMR0-3) is not one the policy allows",
    "debug_enclave": "the enclave or TD runs in debug mode (its memory is readable by the host)",
    "tcb_out_of_date": "the platform TCB is OutOfDate / OutOfDateConfigurationNeeded and the "
    "policy does not accept that status",
    "tcb_revoked": "the platform TCB is Revoked",
    "tcb_status_not_allowed": "the platform TCB status (e.g. SWHardeningNeeded) is not one the "
    "policy accepts",
    "advisory_not_allowed": "the platform is affected by a security advisory the policy does "
    "not allow",
    "collateral_stale": "the verification collateral (CRLs, TCB info, QE identity) has expired",
    "binding_mismatch": "the evidence's report_data does not bind the request's nonce and key",
    "nonce_expired": "the challenge nonce expired before the release request (key server)",
    "evidence_invalid": "the evidence is malformed or its signatures do not verify",
    "collateral_unavailable": "no usable collateral for the platform (missing, malformed, or "
    "the PCCS unreachable)",
    "attestation_key_untrusted": "sim evidence signed by an attestation key the verifier does "
    "not trust",
    **SNP_REASON_CODES,
}

_OUT_OF_DATE: Final = frozenset({"OutOfDate", "OutOfDateConfigurationNeeded"})
_ADVISORY_ID: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class SgxRules(_Schema):
    """Code identity pins for SGX enclaves (also used for ``sim``)."""

    #: Allowed MRENCLAVE values (exact code measurement); empty = not pinned.
    mrenclave: tuple[Hex32, ...] = ()
    #: Allowed MRSIGNER values (enclave signing key); empty = not pinned.
    mrsigner: tuple[Hex32, ...] = ()
    #: Required ISVPRODID; ``None`` = not pinned.
    isv_prod_id: U16 | None = None
    #: Minimum ISVSVN (security version).
    min_isv_svn: U16 = 0

    def identity_pinned(self) -> bool:
        return bool(self.mrenclave) or (bool(self.mrsigner) and self.isv_prod_id is not None)


class TdxRules(_Schema):
    """Code identity pins for TDX trust domains."""

    #: Allowed MRTD values (initial TD memory: the virtual firmware).
    mrtd: tuple[Hex48, ...] = ()
    #: Allowed values of each runtime measurement register (kernel, command line, app...).
    rtmr0: tuple[Hex48, ...] = ()
    rtmr1: tuple[Hex48, ...] = ()
    rtmr2: tuple[Hex48, ...] = ()
    rtmr3: tuple[Hex48, ...] = ()

    def identity_pinned(self) -> bool:
        return bool(self.mrtd) and any((self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3))


class TcbRules(_Schema):
    """Which platform TCB states are acceptable."""

    accepted_statuses: Annotated[tuple[TcbStatus, ...], Field(min_length=1)] = ("UpToDate",)
    allowed_advisories: tuple[Annotated[str, Field(pattern=_ADVISORY_ID)], ...] = ()


class Policy(_Schema):
    """A release policy. Build it with :meth:`from_file`, :meth:`from_yaml`, :meth:`from_json`
    or :meth:`from_dict`; all raise :class:`~sealtorch.errors.PolicyError` naming the bad field.
    """

    version: Literal[1] = 1
    name: Annotated[str, Field(max_length=200)] | None = None
    description: Annotated[str, Field(max_length=2000)] | None = None
    allowed_tees: Annotated[tuple[TeeType, ...], Field(min_length=1)]
    sgx: SgxRules | None = None
    tdx: TdxRules | None = None
    snp: SnpRules | None = None
    sim: SgxRules | None = None
    tcb: TcbRules = TcbRules()
    allow_debug_enclave_insecure: StrictBool = False
    allow_any_measurement_insecure: StrictBool = False

    @model_validator(mode="after")
    def _coherent(self) -> Policy:
        if len(set(self.allowed_tees)) != len(self.allowed_tees):
            raise ValueError("allowed_tees: each TEE may be listed once")
        for tee in ("sgx", "tdx", "snp", "sim"):
            if getattr(self, tee) is not None and tee not in self.allowed_tees:
                raise ValueError(
                    f"{tee}: rules are given but {tee!r} is not in allowed_tees; add it there "
                    "or remove the section"
                )
        if not self.allow_any_measurement_insecure:
            for tee in self.allowed_tees:
                rules: SgxRules | TdxRules | SnpRules | None = getattr(self, tee)
                if rules is None or not rules.identity_pinned():
                    need = {
                        "tdx": "mrtd and at least one of rtmr0-rtmr3",
                        "snp": "measurement",
                    }.get(tee, "mrenclave, or mrsigner together with isv_prod_id")
                    raise ValueError(
                        f"{tee}: the policy allows {tee} but does not pin its code identity "
                        f"(needs {need}); without pins any code on that TEE would get the "
                        "key. Set allow_any_measurement_insecure: true only for tests"
                    )
        return self

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: object, *, source: str = "policy") -> Policy:
        if not isinstance(data, dict):
            raise PolicyError(
                f"{source}: a policy must be a mapping of fields (see docs/policy.md)"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PolicyError(_format_errors(exc, source)) from exc

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "policy") -> Policy:
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_pairs)
        except ValueError as exc:
            raise PolicyError(f"{source}: not valid JSON: {exc}") from exc
        return cls.from_dict(data, source=source)

    @classmethod
    def from_yaml(cls, text: str | bytes, *, source: str = "policy") -> Policy:
        try:
            data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise PolicyError(f"{source}: not valid YAML: {exc}") from exc
        if data is None:
            raise PolicyError(f"{source}: the policy document is empty")
        return cls.from_dict(data, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Policy:
        """Load a ``.json``, ``.yaml`` or ``.yml`` policy file (other names are read as YAML,
        which includes JSON)."""
        target = Path(path)
        try:
            text = target.read_bytes()
        except FileNotFoundError as exc:
            raise PolicyError(f"policy file {target} does not exist") from exc
        except OSError as exc:
            raise PolicyError(f"cannot read policy file {target}: {exc.strerror}") from exc
        if target.suffix.lower() == ".json":
            return cls.from_json(text, source=str(target))
        return cls.from_yaml(text, source=str(target))

    def to_dict(self) -> dict[str, Any]:
        """The normalised document (JSON-able): what the key server stores and returns."""
        return self.model_dump(mode="json")

    @property
    def insecure_flags(self) -> tuple[str, ...]:
        """The ``*_insecure`` switches this policy turns on (names, sorted): a policy that a
        key server operator should never see in production (it logs and counts them)."""
        return tuple(flag for flag in INSECURE_FLAGS if getattr(self, flag))

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`to_dict` (identifies a policy version)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(
        self,
        claims: Claims,
        *,
        now: datetime,
        expected_report_data: bytes | None = None,
    ) -> Decision:
        """Allow, or deny with *every* failing rule's reason code.

        ``now`` is the verifier's clock (collateral freshness is re-checked, since claims may be
        evaluated after they were verified). With ``expected_report_data`` (from
        :func:`~sealtorch.attestation.report_data_for`) the binding is checked too.
        """
        if now.tzinfo is None:
            raise PolicyError("evaluate(now=...) needs a timezone-aware time")
        denials: list[tuple[str, str]] = []

        def deny(code: str, detail: str) -> None:
            denials.append((code, detail))

        simulated = claims.simulated or claims.tee == "sim"
        if simulated and "sim" not in self.allowed_tees:
            deny(
                "simulated_not_allowed",
                "simulated TEE evidence is not accepted by this policy (it does not list sim)",
            )
        elif not simulated and claims.tee not in self.allowed_tees:
            deny(
                "tee_not_allowed",
                f"TEE type {claims.tee} is not allowed (allowed: {', '.join(self.allowed_tees)})",
            )

        rules = self.sim if simulated else getattr(self, claims.tee)
        if isinstance(rules, SgxRules):
            _check_sgx(rules, claims, deny)
        elif isinstance(rules, TdxRules):
            _check_tdx(rules, claims, deny)
        elif isinstance(rules, SnpRules):
            check_snp(rules, claims, deny)
        elif claims.tee == "snp" and not simulated:
            # allow_any_measurement_insecure without an snp section: the platform rules still hold
            check_snp(SnpRules(), claims, deny)

        if claims.debug and not self.allow_debug_enclave_insecure:
            deny(
                "debug_enclave",
                "the enclave runs in debug mode (its memory is readable by the host); debug "
                "enclaves are refused unless allow_debug_enclave_insecure: true",
            )

        status = claims.tcb_status
        # SNP has no TCB status: its platform rule is snp.min_tcb (checked above).
        if claims.tee != "snp" and status not in self.tcb.accepted_statuses:
            code = (
                "tcb_out_of_date"
                if status in _OUT_OF_DATE
                else "tcb_revoked"
                if status == "Revoked"
                else "tcb_status_not_allowed"
            )
            deny(
                code,
                f"TCB status {status} is not accepted (accepted: "
                f"{', '.join(self.tcb.accepted_statuses)})",
            )
        extra = [a for a in claims.advisory_ids if a not in self.tcb.allowed_advisories]
        if extra:
            deny(
                "advisory_not_allowed",
                "the platform is affected by advisories the policy does not allow: "
                + ", ".join(extra),
            )

        if claims.collateral_next_update is not None and now >= claims.collateral_next_update:
            deny(
                "collateral_stale",
                "the collateral that verified this evidence expired at "
                f"{claims.collateral_next_update.astimezone(UTC).isoformat()}",
            )
        if expected_report_data is not None and binding_reasons(claims, expected_report_data):
            deny(
                "binding_mismatch",
                "the evidence's report_data does not bind this request's nonce and public key",
            )
        return Decision.from_denials(denials, policy_name=self.name, policy_digest=self.digest)


#: Every ``*_insecure`` switch of a policy (field names, sorted).
INSECURE_FLAGS: Final[tuple[str, ...]] = tuple(
    sorted(name for name in Policy.model_fields if name.endswith("_insecure"))
)


def _check_sgx(rules: SgxRules, claims: Claims, deny: Callable[[str, str], None]) -> None:
    if rules.mrenclave and claims.mrenclave not in rules.mrenclave:
        deny("measurement_mismatch", f"MRENCLAVE {claims.mrenclave} is not in the allowed list")
    if rules.mrsigner and claims.mrsigner not in rules.mrsigner:
        deny("mrsigner_mismatch", f"MRSIGNER {claims.mrsigner} is not in the allowed list")
    if rules.isv_prod_id is not None and claims.isv_prod_id != rules.isv_prod_id:
        deny(
            "isv_prod_id_mismatch",
            f"ISVPRODID {claims.isv_prod_id} is not the required {rules.isv_prod_id}",
        )
    if claims.isv_svn is None or claims.isv_svn < rules.min_isv_svn:
        deny("isv_svn_too_low", f"ISVSVN {claims.isv_svn} is below the minimum {rules.min_isv_svn}")


def _check_tdx(rules: TdxRules, claims: Claims, deny: Callable[[str, str], None]) -> None:
    if rules.mrtd and claims.mrtd not in rules.mrtd:
        deny("measurement_mismatch", f"MRTD {claims.mrtd} is not in the allowed list")
    wrong = [
        f"RTMR{index}"
        for index, (allowed, value) in enumerate(
            zip((rules.rtmr0, rules.rtmr1, rules.rtmr2, rules.rtmr3), claims.rtmrs, strict=True)
        )
        if allowed and value not in allowed
    ]
    if wrong:
        deny("rtmr_mismatch", f"{', '.join(wrong)} not in the allowed list(s)")


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of evaluating a policy: allowed, or every reason it was denied."""

    allowed: bool
    #: Stable reason codes (see :data:`REASON_CODES`), in rule order, without repeats.
    reasons: tuple[str, ...] = ()
    #: One human sentence per failing rule.
    details: tuple[str, ...] = ()
    policy_name: str | None = None
    policy_digest: str | None = None
    message: str = field(init=False)

    def __post_init__(self) -> None:
        if self.allowed == bool(self.reasons):
            raise ValueError("a decision is allowed exactly when it has no reasons")
        name = f" {self.policy_name!r}" if self.policy_name else ""
        message = (
            f"allowed by policy{name}"
            if self.allowed
            else f"denied by policy{name}: " + "; ".join(self.details or self.reasons)
        )
        object.__setattr__(self, "message", message)

    @classmethod
    def from_denials(
        cls,
        denials: list[tuple[str, str]],
        *,
        policy_name: str | None = None,
        policy_digest: str | None = None,
    ) -> Decision:
        reasons = tuple(dict.fromkeys(code for code, _ in denials))
        return cls(
            allowed=not reasons,
            reasons=reasons,
            details=tuple(detail for _, detail in denials),
            policy_name=policy_name,
            policy_digest=policy_digest,
        )

    def with_reason(self, code: str, detail: str) -> Decision:
        """This decision plus one more failing rule (e.g. the key server's ``nonce_expired``)."""
        return Decision(
            allowed=False,
            reasons=tuple(dict.fromkeys((*self.reasons, code))),
            details=(*self.details, detail),
            policy_name=self.policy_name,
            policy_digest=self.policy_digest,
        )

    def raise_for_denial(self) -> Decision:
        """Return self if allowed; else raise :class:`~sealtorch.errors.PolicyDenied`."""
        if not self.allowed:
            raise PolicyDenied(self.reasons, self.message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "reasons": list(self.reasons),
            "details": list(self.details),
            "message": self.message,
            "policy_name": self.policy_name,
            "policy_digest": self.policy_digest,
        }


# -- loading helpers ------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Hashable, Any]:
    loader.flatten_mapping(node)
    result: dict[Hashable, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
    return result


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _no_duplicate_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        location = ""
        for part in error["loc"]:
            location += (
                f"[{part}]" if isinstance(part, int) else (f".{part}" if location else str(part))
            )
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see docs/policy.md)"
        elif error["type"] == "missing":
            message = "required field is missing"
        elif error["type"] == "literal_error" and location.startswith("version"):
            message = "only policy version 1 exists"
        lines.append(f"{location}: {message}" if location else message)
    return f"{source} is not a valid release policy:\n  " + "\n  ".join(lines)
