"""Release policies: schema validation and evaluation against real and sim claims."""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from attest_facts import (
    SGX_ADVISORIES,
    SGX_COLLATERAL_EXPIRY,
    SGX_MRENCLAVE,
    SGX_MRSIGNER,
    SGX_REPORT_DATA,
    SGX_TIME,
    TDX_MRTD,
    TDX_RTMR0,
    TDX_RTMR3,
    TDX_TIME,
)

from sealtorch.attestation import (
    REASON_CODES,
    Claims,
    DcapVerifier,
    Decision,
    Evidence,
    Policy,
    SimAttester,
    SimVerifier,
)
from sealtorch.errors import PolicyDenied, PolicyError

REPO = Path(__file__).resolve().parents[3]
OTHER32 = "ab" * 32
OTHER48 = "cd" * 48


@pytest.fixture(scope="module")
def sgx_claims(sgx_verifier: DcapVerifier, sgx_evidence: Evidence) -> Claims:
    return sgx_verifier.verify(sgx_evidence, now=SGX_TIME)


@pytest.fixture(scope="module")
def tdx_claims(tdx_verifier: DcapVerifier, tdx_evidence: Evidence) -> Claims:
    return tdx_verifier.verify(tdx_evidence, now=TDX_TIME)


def sgx_policy(**overrides: Any) -> Policy:
    doc: dict[str, Any] = {
        "name": "test",
        "allowed_tees": ["sgx"],
        "sgx": {"mrenclave": [SGX_MRENCLAVE], "mrsigner": [SGX_MRSIGNER], "isv_prod_id": 0},
    }
    doc.update(overrides)
    return Policy.from_dict(doc)


def tdx_policy(**tdx: Any) -> Policy:
    rules: dict[str, Any] = {"mrtd": [TDX_MRTD], "rtmr0": [TDX_RTMR0], "rtmr3": [TDX_RTMR3]}
    rules.update(tdx)
    return Policy.from_dict({"allowed_tees": ["tdx"], "tdx": rules})


# -- evaluation -----------------------------------------------------------------------------------


def test_sgx_sample_status_is_refused_by_the_default_tcb_rules(sgx_claims: Claims) -> None:
    decision = sgx_policy().evaluate(sgx_claims, now=SGX_TIME)
    assert not decision.allowed
    assert decision.reasons == ("tcb_status_not_allowed", "advisory_not_allowed")
    assert "ConfigurationAndSWHardeningNeeded" in decision.message
    assert "INTEL-SA-00289, INTEL-SA-00615" in decision.message


def test_sgx_sample_status_needs_both_status_and_advisories(sgx_claims: Claims) -> None:
    status_only = sgx_policy(
        tcb={"accepted_statuses": ["UpToDate", "ConfigurationAndSWHardeningNeeded"]}
    )
    assert status_only.evaluate(sgx_claims, now=SGX_TIME).reasons == ("advisory_not_allowed",)
    one_advisory = sgx_policy(
        tcb={
            "accepted_statuses": ["ConfigurationAndSWHardeningNeeded"],
            "allowed_advisories": ["INTEL-SA-00289"],
        }
    )
    decision = one_advisory.evaluate(sgx_claims, now=SGX_TIME)
    assert decision.reasons == ("advisory_not_allowed",)
    assert "INTEL-SA-00615" in decision.message
    assert "INTEL-SA-00289," not in decision.message
    advisories_only = sgx_policy(tcb={"allowed_advisories": list(SGX_ADVISORIES)})
    assert advisories_only.evaluate(sgx_claims, now=SGX_TIME).reasons == ("tcb_status_not_allowed",)
    both = sgx_policy(
        tcb={
            "accepted_statuses": ["ConfigurationAndSWHardeningNeeded"],
            "allowed_advisories": list(SGX_ADVISORIES),
        }
    )
    decision = both.evaluate(sgx_claims, now=SGX_TIME)
    assert decision.allowed, decision.message
    assert decision.reasons == ()
    assert decision.raise_for_denial() is decision


@pytest.fixture
def lenient_tcb() -> dict[str, Any]:
    return {
        "accepted_statuses": ["ConfigurationAndSWHardeningNeeded"],
        "allowed_advisories": list(SGX_ADVISORIES),
    }


@pytest.mark.parametrize(
    ("sgx_rules", "reason"),
    [
        ({"mrenclave": [OTHER32]}, "measurement_mismatch"),
        ({"mrenclave": [SGX_MRENCLAVE], "mrsigner": [OTHER32]}, "mrsigner_mismatch"),
        ({"mrenclave": [SGX_MRENCLAVE], "min_isv_svn": 1}, "isv_svn_too_low"),
        ({"mrenclave": [SGX_MRENCLAVE], "isv_prod_id": 7}, "isv_prod_id_mismatch"),
        ({"mrsigner": [OTHER32], "isv_prod_id": 0}, "mrsigner_mismatch"),
    ],
)
def test_wrong_pins_give_their_reason_code(
    sgx_claims: Claims, lenient_tcb: dict[str, Any], sgx_rules: dict[str, Any], reason: str
) -> None:
    policy = Policy.from_dict({"allowed_tees": ["sgx"], "sgx": sgx_rules, "tcb": lenient_tcb})
    decision = policy.evaluate(sgx_claims, now=SGX_TIME)
    assert decision.reasons == (reason,)
    with pytest.raises(PolicyDenied) as caught:
        decision.raise_for_denial()
    assert caught.value.reasons == (reason,)


def test_every_failing_rule_is_reported(sgx_claims: Claims) -> None:
    policy = Policy.from_dict(
        {
            "allowed_tees": ["sgx"],
            "sgx": {
                "mrenclave": [OTHER32],
                "mrsigner": [OTHER32],
                "isv_prod_id": 9,
                "min_isv_svn": 3,
            },
        }
    )
    decision = policy.evaluate(
        sgx_claims,
        now=SGX_COLLATERAL_EXPIRY + timedelta(days=1),
        expected_report_data=b"\1" * 64,
    )
    assert decision.reasons == (
        "measurement_mismatch",
        "mrsigner_mismatch",
        "isv_prod_id_mismatch",
        "isv_svn_too_low",
        "tcb_status_not_allowed",
        "advisory_not_allowed",
        "collateral_stale",
        "binding_mismatch",
    )
    assert len(decision.details) == len(decision.reasons)


def test_sgx_evidence_under_a_tdx_only_policy(sgx_claims: Claims) -> None:
    decision = tdx_policy().evaluate(sgx_claims, now=SGX_TIME)
    assert decision.reasons[0] == "tee_not_allowed"


def test_tdx_sample_pins(tdx_claims: Claims) -> None:
    assert tdx_policy().evaluate(tdx_claims, now=TDX_TIME).allowed
    assert tdx_policy(mrtd=[OTHER48]).evaluate(tdx_claims, now=TDX_TIME).reasons == (
        "measurement_mismatch",
    )
    wrong_rtmr = tdx_policy(rtmr0=[OTHER48]).evaluate(tdx_claims, now=TDX_TIME)
    assert wrong_rtmr.reasons == ("rtmr_mismatch",)
    assert "RTMR0" in wrong_rtmr.message
    # several allowed values: any one matches
    assert tdx_policy(mrtd=[OTHER48, TDX_MRTD.upper()]).evaluate(tdx_claims, now=TDX_TIME).allowed


def test_binding_checked_when_expected_report_data_is_given(sgx_claims: Claims) -> None:
    policy = sgx_policy(
        tcb={
            "accepted_statuses": ["ConfigurationAndSWHardeningNeeded"],
            "allowed_advisories": list(SGX_ADVISORIES),
        }
    )
    assert policy.evaluate(sgx_claims, now=SGX_TIME, expected_report_data=SGX_REPORT_DATA).allowed
    wrong = bytearray(SGX_REPORT_DATA)
    wrong[63] ^= 1
    decision = policy.evaluate(sgx_claims, now=SGX_TIME, expected_report_data=bytes(wrong))
    assert decision.reasons == ("binding_mismatch",)


def test_stale_collateral_is_denied_when_claims_are_evaluated_late(sgx_claims: Claims) -> None:
    policy = sgx_policy(
        tcb={
            "accepted_statuses": ["ConfigurationAndSWHardeningNeeded"],
            "allowed_advisories": list(SGX_ADVISORIES),
        }
    )
    assert policy.evaluate(sgx_claims, now=SGX_COLLATERAL_EXPIRY).reasons == ("collateral_stale",)


# -- sim ------------------------------------------------------------------------------------------


def _sim_claims(attester: SimAttester) -> Claims:
    verifier = SimVerifier(trusted_keys=[attester.public_key])
    return verifier.verify(attester.evidence(b"\0" * 64), now=datetime.now(UTC))


def test_sim_needs_sim_in_allowed_tees(sim_attester: SimAttester) -> None:
    claims = _sim_claims(sim_attester)
    refused = Policy.from_dict(
        {"allowed_tees": ["sgx"], "sgx": {"mrenclave": [sim_attester.mrenclave]}}
    ).evaluate(claims, now=datetime.now(UTC))
    assert refused.reasons == ("simulated_not_allowed",)
    allowed = Policy.from_dict(
        {"allowed_tees": ["sim"], "sim": {"mrenclave": [sim_attester.mrenclave]}}
    ).evaluate(claims, now=datetime.now(UTC))
    assert allowed.allowed


def test_debug_sim_enclave_is_refused_unless_insecurely_allowed(tmp_path: Path) -> None:
    attester = SimAttester("serve", key_path=tmp_path / "k", debug=True)
    claims = _sim_claims(attester)
    assert claims.debug
    doc = {"allowed_tees": ["sim"], "sim": {"mrenclave": [attester.mrenclave]}}
    assert Policy.from_dict(doc).evaluate(claims, now=datetime.now(UTC)).reasons == (
        "debug_enclave",
    )
    lax = Policy.from_dict({**doc, "allow_debug_enclave_insecure": True})
    assert lax.evaluate(claims, now=datetime.now(UTC)).allowed


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ("OutOfDate", "tcb_out_of_date"),
        ("OutOfDateConfigurationNeeded", "tcb_out_of_date"),
        ("Revoked", "tcb_revoked"),
        ("SWHardeningNeeded", "tcb_status_not_allowed"),
        ("ConfigurationNeeded", "tcb_status_not_allowed"),
    ],
)
def test_tcb_status_codes(tmp_path: Path, status: str, reason: str) -> None:
    attester = SimAttester("serve", key_path=tmp_path / "k", tcb_status=status)
    claims = _sim_claims(attester)
    doc = {"allowed_tees": ["sim"], "sim": {"mrenclave": [attester.mrenclave]}}
    assert Policy.from_dict(doc).evaluate(claims, now=datetime.now(UTC)).reasons == (reason,)
    accepting = Policy.from_dict({**doc, "tcb": {"accepted_statuses": [status]}})
    assert accepting.evaluate(claims, now=datetime.now(UTC)).allowed


def test_unknown_tcb_status_is_never_accepted(sgx_claims: Claims) -> None:
    odd = dataclasses.replace(sgx_claims, tcb_status="TDRelaunchAdvised", advisory_ids=())
    decision = sgx_policy(tcb={"accepted_statuses": ["UpToDate", "SWHardeningNeeded"]}).evaluate(
        odd, now=SGX_TIME
    )
    assert decision.reasons == ("tcb_status_not_allowed",)


# -- decisions ------------------------------------------------------------------------------------


def test_decision_with_reason_and_to_dict(sgx_claims: Claims) -> None:
    decision = sgx_policy().evaluate(sgx_claims, now=SGX_TIME)
    more = decision.with_reason("nonce_expired", "the challenge expired")
    assert more.reasons == ("tcb_status_not_allowed", "advisory_not_allowed", "nonce_expired")
    assert more.message.endswith("the challenge expired")
    allowed = Decision(allowed=True)
    assert allowed.with_reason("nonce_expired", "late").reasons == ("nonce_expired",)
    data = more.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["policy_name"] == "test"
    assert data["policy_digest"] == sgx_policy().digest
    with pytest.raises(ValueError, match="exactly when"):
        Decision(allowed=False)


# -- validation -----------------------------------------------------------------------------------


def _error(doc: object) -> str:
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict(doc)
    return str(caught.value)


def test_unknown_fields_are_refused_by_name() -> None:
    message = _error(
        {"allowed_tees": ["sgx"], "sgx": {"mrenclave": [SGX_MRENCLAVE], "mrsignr": []}, "x": 1}
    )
    assert "sgx.mrsignr: unknown field" in message
    assert "x: unknown field" in message


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({}, "allowed_tees: required field is missing"),
        ({"allowed_tees": []}, "allowed_tees"),
        ({"allowed_tees": ["sev"]}, "allowed_tees[0]"),
        ({"allowed_tees": ["sgx", "sgx"], "sgx": {"mrenclave": [SGX_MRENCLAVE]}}, "once"),
        ({"allowed_tees": ["sgx"], "sgx": {"mrenclave": ["abc"]}}, "sgx.mrenclave[0]: must be 64"),
        ({"allowed_tees": ["sgx"], "sgx": {"mrenclave": [12]}}, "quoted string"),
        ({"allowed_tees": ["sgx"], "sgx": {"mrenclave": SGX_MRENCLAVE}}, "sgx.mrenclave"),
        ({"allowed_tees": ["tdx"], "tdx": {"mrtd": [SGX_MRENCLAVE]}}, "tdx.mrtd[0]: must be 96"),
        (
            {"allowed_tees": ["sgx"], "sgx": {"mrenclave": [SGX_MRENCLAVE], "min_isv_svn": -1}},
            "sgx.min_isv_svn",
        ),
        (
            {"allowed_tees": ["sgx"], "sgx": {"mrenclave": [SGX_MRENCLAVE], "isv_prod_id": "0"}},
            "sgx.isv_prod_id",
        ),
        (
            {
                "allowed_tees": ["sgx"],
                "sgx": {"mrenclave": [SGX_MRENCLAVE]},
                "allow_debug_enclave_insecure": "true",
            },
            "allow_debug_enclave_insecure",
        ),
        (
            {
                "allowed_tees": ["sgx"],
                "sgx": {"mrenclave": [SGX_MRENCLAVE]},
                "tcb": {"accepted_statuses": ["Fine"]},
            },
            "tcb.accepted_statuses[0]",
        ),
        (
            {"allowed_tees": ["sgx"], "sgx": {"mrenclave": [SGX_MRENCLAVE]}, "version": 2},
            "only policy version 1",
        ),
        ({"allowed_tees": ["sgx"], "sgx": {"mrenclave": [SGX_MRENCLAVE]}, "tdx": {}}, "tdx: rules"),
        ([], "mapping"),
    ],
)
def test_schema_errors_name_the_field(doc: object, expected: str) -> None:
    assert expected in _error(doc)


@pytest.mark.parametrize(
    ("doc", "tee"),
    [
        ({"allowed_tees": ["sgx"]}, "sgx"),
        ({"allowed_tees": ["sgx"], "sgx": {"mrsigner": [SGX_MRSIGNER]}}, "sgx"),
        ({"allowed_tees": ["sgx"], "sgx": {"min_isv_svn": 3}}, "sgx"),
        ({"allowed_tees": ["sim"], "sim": {}}, "sim"),
        ({"allowed_tees": ["tdx"], "tdx": {"mrtd": [TDX_MRTD]}}, "tdx"),
        ({"allowed_tees": ["tdx"], "tdx": {"rtmr0": [TDX_RTMR0]}}, "tdx"),
        (
            {"allowed_tees": ["sgx", "tdx"], "sgx": {"mrenclave": [SGX_MRENCLAVE]}},
            "tdx",
        ),
    ],
)
def test_a_policy_without_identity_pins_is_refused(doc: dict[str, Any], tee: str) -> None:
    message = _error(doc)
    assert f"{tee}: the policy allows {tee} but does not pin its code identity" in message
    assert Policy.from_dict({**doc, "allow_any_measurement_insecure": True})


def test_mrsigner_with_product_id_is_a_sufficient_pin(sgx_claims: Claims) -> None:
    policy = Policy.from_dict(
        {
            "allowed_tees": ["sgx"],
            "sgx": {"mrsigner": [SGX_MRSIGNER], "isv_prod_id": 0, "min_isv_svn": 0},
            "tcb": {
                "accepted_statuses": ["ConfigurationAndSWHardeningNeeded"],
                "allowed_advisories": list(SGX_ADVISORIES),
            },
        }
    )
    assert policy.evaluate(sgx_claims, now=SGX_TIME).allowed


def test_yaml_json_and_files(tmp_path: Path) -> None:
    yaml_text = f"""
version: 1
name: demo
allowed_tees: [sgx]
sgx:
  mrenclave:
    - "{SGX_MRENCLAVE.upper()}"
"""
    policy = Policy.from_yaml(yaml_text)
    assert policy.sgx is not None
    assert policy.sgx.mrenclave == (SGX_MRENCLAVE,)  # normalised to lowercase
    (tmp_path / "p.yaml").write_text(yaml_text)
    (tmp_path / "p.json").write_text(json.dumps(policy.to_dict()))
    (tmp_path / "p.policy").write_text(json.dumps(policy.to_dict()))
    for name in ("p.yaml", "p.json", "p.policy"):
        assert Policy.from_file(tmp_path / name).digest == policy.digest
    assert re.fullmatch("[0-9a-f]{64}", policy.digest)
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.from_file(tmp_path / "missing.yaml")
    with pytest.raises(PolicyError, match="empty"):
        Policy.from_yaml("")
    with pytest.raises(PolicyError, match="not valid YAML"):
        Policy.from_yaml("allowed_tees: [sgx\n")
    with pytest.raises(PolicyError, match="not valid JSON"):
        Policy.from_json("{")


def test_duplicate_keys_are_refused() -> None:
    """PyYAML and json silently keep the last duplicate; a policy must not."""
    doc = f'allowed_tees: [sgx]\nsgx: {{mrenclave: ["{SGX_MRENCLAVE}"]}}\n'
    with pytest.raises(PolicyError, match="duplicate key 'allow_debug_enclave_insecure'"):
        Policy.from_yaml(
            doc + "allow_debug_enclave_insecure: false\nallow_debug_enclave_insecure: true\n"
        )
    with pytest.raises(PolicyError, match="duplicate key"):
        Policy.from_json('{"allowed_tees": ["sgx"], "allowed_tees": ["sim"]}')


def test_policies_are_immutable() -> None:
    policy = sgx_policy()
    with pytest.raises(ValueError, match="frozen"):
        policy.allow_debug_enclave_insecure = True  # type: ignore[misc]


def test_every_reason_code_is_documented() -> None:
    doc = (REPO / "docs" / "policy.md").read_text()
    for code in REASON_CODES:
        assert f"`{code}`" in doc, code


def test_documented_examples_are_valid_policies() -> None:
    doc = (REPO / "docs" / "policy.md").read_text()
    blocks = re.findall(r"```(yaml|json)\n(.*?)```", doc, flags=re.DOTALL)
    checked = 0
    for kind, text in blocks:
        if "<output of" in text:
            text = text.replace("<output of sealtorch attest measure --role serve>", "ab" * 32)
        policy = Policy.from_yaml(text) if kind == "yaml" else Policy.from_json(text)
        assert policy.name
        checked += 1
    assert checked == 6
