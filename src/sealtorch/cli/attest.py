"""`sealtorch attest`: verify quotes, produce evidence, measure the sim TEE, manage the sim key."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from sealtorch.cli._options import (
    SIM_KEY_DEFAULT,
    sim_key_option,
    tee_option,
    tee_root_option,
    trust_sim_key_option,
)
from sealtorch.errors import AttestationError, ConfigError

_EXIT_REFUSED = 1
_MAX_EVIDENCE_FILE = 1024 * 1024


def _parse_report_data(text: str) -> bytes:
    value = text.strip().removeprefix("0x").removeprefix("0X")
    if not re.fullmatch(r"[0-9a-fA-F]{128}", value):
        raise click.BadParameter(
            f"must be exactly 128 hex digits (64 bytes), got {len(value)} characters",
            param_hint="--report-data",
        )
    return bytes.fromhex(value)


def _read_evidence_file(path: Path) -> bytes:
    """At most 1 MiB: evidence is at most 48 KiB, or about twice that as hex or JSON."""
    from sealtorch.errors import EvidenceError

    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_EVIDENCE_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > _MAX_EVIDENCE_FILE:
        raise EvidenceError(f"{path} is larger than 1 MiB: it is not attestation evidence")
    return data


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


_ATTEST_EPILOG = """\b
Examples:
  sealtorch attest verify quote.bin --pccs-url https://pccs:8081 --policy model.yaml
  sealtorch attest evidence --tee gramine --report-data HEX -o quote.bin
  sealtorch attest measure --role serve       # the sim MRENCLAVE, for a dev policy
  sealtorch attest sim-key --show-public      # the sim key a key server must trust
  sealtorch attest check-policy model.yaml
"""


@click.group("attest", epilog=_ATTEST_EPILOG)
def attest() -> None:
    """Verify quotes against a release policy; produce evidence; sim TEE tools.

    Verify DCAP quotes (SGX, TDX) and simulated-TEE evidence against a release policy, produce
    evidence inside a TEE, print the sim TEE's measurement, and manage this host's simulated
    attestation key. See docs/attestation.md (evidence, collateral, the sim TEE) and
    docs/policy.md (policies and reason codes).
    """


_VERIFY_EPILOG = """\b
Examples:
  # a real SGX quote, at the time its collateral was valid
  sealtorch attest verify sgx_quote --collateral sgx_quote_collateral.json --at 1750334171
  # the same quote today: refused, reason collateral_stale (exit 1)
  sealtorch attest verify sgx_quote --collateral sgx_quote_collateral.json
  # against a release policy, checking the report_data binding, with a PCCS
  sealtorch attest verify quote.bin --pccs-url https://pccs.example:8081 \\
      --policy resnet50.yaml --report-data 9a9d...20 --json
  # sim evidence from this host
  sealtorch attest verify ev.sim --trust-local-sim-key --policy dev-policy.yaml
  # an AMD SEV-SNP report, with the snp/ collateral the operator fetched into collateral/
  sealtorch attest verify report.bin --collateral-dir collateral/ --policy snp.yaml

\b
Exit status: 0 verified and allowed; 1 refused (the reason codes are printed);
2 usage error (bad option, unreadable or invalid policy).
"""


@attest.command("verify", epilog=_VERIFY_EPILOG)
@click.argument("quote", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--collateral",
    "collateral_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="dcap-qvl collateral JSON for the quote's platform (fully offline).",
)
@click.option(
    "--collateral-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Directory of collateral JSON files, indexed by their content (fully offline).",
)
@click.option(
    "--pccs-url",
    metavar="URL",
    help="PCCS or Intel PCS base URL; collateral is cached in --cache-dir.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Collateral cache for --pccs-url  [default: ~/.cache/sealtorch/collateral]",
)
@click.option(
    "--at",
    "at",
    type=int,
    metavar="UNIX_TIME",
    help="Verify as of this time (seconds since 1970, UTC) instead of now.",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Release policy (YAML/JSON). Without it only platform rules are checked: TCB "
    "status UpToDate, no advisories, no debug, fresh collateral.",
)
@click.option(
    "--report-data",
    metavar="HEX",
    help="Expected report_data (128 hex digits); a difference is binding_mismatch.",
)
@click.option(
    "--allow-missing-crl-insecure",
    is_flag=True,
    help="SEV-SNP: accept a collateral directory without AMD's CRL for the product (revoked "
    "ASKs then go unnoticed). For checking evidence by hand only.",
)
@trust_sim_key_option("Trust this simulated attestation public key (repeatable).")
@click.option(
    "--trust-local-sim-key",
    is_flag=True,
    help="Trust this host's simulated attestation key (see `attest sim-key`).",
)
@sim_key_option(
    f"This host's sim key file, for --trust-local-sim-key  [default: {SIM_KEY_DEFAULT}]"
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def verify_cmd(
    ctx: click.Context,
    quote: Path,
    collateral_file: Path | None,
    collateral_dir: Path | None,
    pccs_url: str | None,
    cache_dir: Path | None,
    at: int | None,
    policy_file: Path | None,
    report_data: str | None,
    allow_missing_crl_insecure: bool,
    sim_keys: tuple[str, ...],
    trust_local_sim_key: bool,
    sim_key: Path | None,
    as_json: bool,
) -> None:
    """Verify a quote or sim evidence and evaluate it against a release policy.

    QUOTE is a binary DCAP quote (SGX v3, TDX v4/v5), an AMD SEV-SNP report (with or without
    its certificate table), the same as hex text (with or without 0x), simulated-TEE
    evidence, or the JSON form {"type": ..., "data": ...}. SNP collateral is read from the
    snp/ folder of --collateral-dir (or of the --pccs-url cache).
    """
    from sealtorch import attestation as att

    sources = [x for x in (collateral_file, collateral_dir, pccs_url) if x is not None]
    if len(sources) > 1:
        raise click.UsageError("use only one of --collateral, --collateral-dir, --pccs-url")
    if cache_dir is not None and pccs_url is None:
        raise click.UsageError("--cache-dir only applies with --pccs-url")
    expected = _parse_report_data(report_data) if report_data is not None else None
    now = datetime.fromtimestamp(at, UTC) if at is not None else datetime.now(UTC)
    policy = att.Policy.from_file(policy_file) if policy_file is not None else None

    trusted = list(sim_keys)
    if trust_local_sim_key:
        trusted.append(att.format_sim_public_key(att.load_or_create_sim_key(sim_key).public_key))
    if not sources and not trusted:
        verifier_set = att.VerifierSet()  # the check below says what to pass
    else:
        verifier_set = att.make_verifiers(
            pccs_url=pccs_url,
            cache_dir=cache_dir,
            collateral_path=collateral_file or collateral_dir,
            sim_trusted_keys=trusted,
            snp_allow_missing_crl_insecure=allow_missing_crl_insecure,
            clock=lambda: now,
        )

    report: dict[str, Any] = {"evidence": None, "verified": False, "claims": None}
    try:
        evidence = att.detect_evidence(_read_evidence_file(quote))
        report["evidence"] = {
            "type": evidence.type,
            "size": len(evidence.data),
            "sha256": evidence.digest,
        }
        if evidence.type not in verifier_set.evidence_types:
            hint = {
                "sim": "pass --trust-sim-key or --trust-local-sim-key",
                "sev-snp": "pass --collateral-dir (its snp/ folder holds the SNP collateral)",
            }.get(evidence.type, "pass --collateral, --collateral-dir or --pccs-url")
            raise click.UsageError(f"{quote} is {evidence.type} evidence: {hint}")
        claims = verifier_set.verify(evidence, now=now)
    except AttestationError as exc:
        reason = att.reason_for_error(exc)
        report["decision"] = {"allowed": False, "reasons": [reason], "message": str(exc)}
        _print_verify(report, as_json=as_json, note=None)
        ctx.exit(_EXIT_REFUSED)
    report["verified"] = True
    report["claims"] = claims.to_dict()
    note = None
    if policy is None:
        baseline_tees = ["sgx", "tdx", "snp"] + (["sim"] if claims.simulated else [])
        policy = att.Policy.from_dict(
            {
                "name": "platform rules only (no --policy)",
                "allowed_tees": baseline_tees,
                "allow_any_measurement_insecure": True,
            }
        )
        note = "no --policy: measurements are not pinned; only platform rules were checked"
    decision = policy.evaluate(claims, now=now, expected_report_data=expected)
    report["decision"] = decision.to_dict()
    _print_verify(report, as_json=as_json, note=note)
    if not decision.allowed:
        ctx.exit(_EXIT_REFUSED)


_CLAIM_ORDER = (
    "tee",
    "simulated",
    "debug",
    "tcb_status",
    "advisory_ids",
    "mrenclave",
    "mrsigner",
    "isv_prod_id",
    "isv_svn",
    "attributes",
    "mrtd",
    "rtmr0",
    "rtmr1",
    "rtmr2",
    "rtmr3",
    "td_attributes",
    "snp_product",
    "snp_signing_key",
    "launch_measurement",
    "host_data",
    "family_id",
    "image_id",
    "id_key_digest",
    "author_key_digest",
    "guest_svn",
    "vmpl",
    "guest_policy",
    "platform_info",
    "reported_tcb",
    "tcb_bootloader",
    "tcb_tee",
    "tcb_snp",
    "tcb_microcode",
    "tcb_fmc",
    "chip_id",
    "sim_role",
    "attestation_key",
    "fmspc",
    "report_data",
    "collateral_issued_at",
    "collateral_next_update",
    "verified_at",
    "evidence_digest",
)


def _print_verify(report: dict[str, Any], *, as_json: bool, note: str | None) -> None:
    if as_json:
        _echo_json({**report, "note": note})
        return
    evidence = report.get("evidence")
    if evidence:
        click.echo(
            f"evidence: {evidence['type']}, {evidence['size']} bytes, sha256 {evidence['sha256']}"
        )
    claims = report.get("claims")
    if claims:
        click.echo("claims:")
        for name in _CLAIM_ORDER:
            value = claims.get(name)
            if value is None or value == []:
                continue
            if isinstance(value, list):
                value = ", ".join(str(v) for v in value)
            click.echo(f"  {name:<23} {value}")
    if note:
        click.echo(f"note: {note}")
    decision = report["decision"]
    if decision["allowed"]:
        click.secho(f"ALLOWED: {decision['message']}", fg="green")
    else:
        click.secho("REFUSED: " + ", ".join(decision["reasons"]), fg="red", bold=True)
        click.echo(f"  {decision['message']}")


_EVIDENCE_EPILOG = """\b
Examples:
  sealtorch attest evidence --tee sim --role serve --report-data $(python -c \\
      'print("00"*64)') -o ev.sim
  sealtorch attest evidence --tee gramine --report-data HEX -o quote.bin   # inside Gramine-SGX
  sealtorch attest evidence --tee tdx --report-data HEX -o quote.bin --format hex
  sealtorch attest evidence --tee snp --report-data HEX -o report.bin   # in an SNP guest
"""


@attest.command("evidence", epilog=_EVIDENCE_EPILOG)
@tee_option(
    "Which TEE to ask: sim (software, development), gramine (SGX), tdx, snp (SEV-SNP).",
    required=True,
)
@click.option("--report-data", metavar="HEX", required=True, help="64 bytes as 128 hex digits.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the evidence.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["raw", "hex", "json"]),
    default="raw",
    show_default=True,
    help="raw bytes, hex text, or the JSON wire form {type, data}.",
)
@tee_root_option()
@click.option("--role", help="sim only: the measured role (keycache, serve, app).")
@sim_key_option(
    f"--tee sim: the simulated attestation key file, created if missing (default: "
    f"{SIM_KEY_DEFAULT})."
)
def evidence_cmd(
    tee: str,
    report_data: str,
    output: Path,
    fmt: str,
    tee_root: Path | None,
    role: str | None,
    sim_key: Path | None,
) -> None:
    """Ask this machine's TEE for evidence binding REPORT_DATA and write it to a file."""
    from sealtorch.attestation import attester_for

    data = _parse_report_data(report_data)
    if tee == "sim":
        if tee_root is not None:
            raise click.UsageError("--tee-root applies to gramine, tdx and snp, not sim")
        provider = attester_for("sim", role=role, key_path=sim_key)
    else:
        if role is not None or sim_key is not None:
            raise click.UsageError("--role and --sim-key apply to --tee sim only")
        provider = attester_for(tee, root=tee_root)
    evidence = provider.evidence(data)
    if fmt == "raw":
        payload = evidence.data
    elif fmt == "hex":
        payload = evidence.data.hex().encode("ascii") + b"\n"
    else:
        payload = json.dumps(evidence.to_wire()).encode("ascii") + b"\n"
    try:
        output.write_bytes(payload)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror}") from exc
    click.echo(
        f"wrote {evidence.type} evidence ({len(evidence.data)} bytes, sha256 "
        f"{evidence.digest[:16]}...) to {output}",
        err=True,
    )


_MEASURE_EPILOG = """\b
Examples:
  sealtorch attest measure                 # every role
  sealtorch attest measure --role serve    # paste into a policy's sim.mrenclave list
  # the snp: policy section matching a known-good SEV-SNP guest's report
  sealtorch attest measure --snp-report report.bin --product Milan
"""


@attest.command("measure", epilog=_MEASURE_EPILOG)
@click.option("--role", help="Only this role (keycache, serve, app).")
@click.option(
    "--snp-report",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Print the snp: policy section that pins this SEV-SNP report's guest (its "
    "measurement, HOST_DATA, ID block, GUEST_SVN, reported TCB, VMPL) instead.",
)
@click.option(
    "--product",
    type=click.Choice(["Milan", "Genoa", "Turin"]),
    help="--snp-report: the processor generation, to read the TCB (Turin's layout differs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print {role: mrenclave} as JSON.")
def measure_cmd(
    role: str | None, snp_report: Path | None, product: str | None, as_json: bool
) -> None:
    """Print the sim TEE measurement (MRENCLAVE) of this installation's sealtorch code.

    It is SHA-256 over the package's files and the role, so any code change changes it, as on
    real hardware. Put it in a policy's `sim: {mrenclave: [...]}` list. With --snp-report,
    print the `snp:` policy section for a known-good SEV-SNP report instead (the report is
    read, not verified: check it with `attest verify` too; compute the expected measurement of
    an image with sev-snp-measure, see docs/deployment.md).
    """
    if snp_report is not None:
        if role is not None:
            raise click.UsageError("--role applies to the sim measurement, not --snp-report")
        section = _snp_section(_read_evidence_file(snp_report), product)
        if as_json:
            _echo_json({"snp": section})
        else:
            import yaml

            click.echo(yaml.safe_dump({"snp": section}, sort_keys=False).rstrip())
        return
    if product is not None:
        raise click.UsageError("--product applies to --snp-report")
    from sealtorch.attestation import KNOWN_ROLES, SIM_MRSIGNER, measure

    roles = (role,) if role else KNOWN_ROLES
    values = {name: measure(name) for name in roles}
    if as_json:
        _echo_json({"mrsigner": SIM_MRSIGNER, "mrenclave": values})
    elif role:
        click.echo(values[role])
    else:
        for name, value in values.items():
            click.echo(f"{name:<9} {value}")
        click.echo(f"(MRSIGNER of every sim enclave: {SIM_MRSIGNER})", err=True)


def _snp_section(raw: bytes, product: str | None) -> dict[str, Any]:
    from sealtorch.attestation import detect_evidence
    from sealtorch.attestation.snp_report import TcbVersion, parse_report, split_evidence
    from sealtorch.errors import EvidenceError

    evidence = detect_evidence(raw)
    if evidence.type != "sev-snp":
        raise EvidenceError(f"--snp-report needs an SEV-SNP report, not {evidence.type} evidence")
    report = parse_report(split_evidence(evidence.data)[0])
    turin = product == "Turin" or (report.cpuid is not None and report.cpuid[0] == 0x1A)
    if product is None and report.cpuid is None:
        raise click.UsageError("a version 2 report does not tell its processor: pass --product")
    section: dict[str, Any] = {"measurement": [report.measurement.hex()]}
    for name in ("host_data", "family_id", "image_id", "id_key_digest", "author_key_digest"):
        value: bytes = getattr(report, name)
        if any(value) or name == "host_data":
            section[name] = [value.hex()]
    section["min_guest_svn"] = report.guest_svn
    section["min_tcb"] = TcbVersion.decode(report.reported_tcb, turin=turin).components()
    section["vmpl"] = report.vmpl
    if report.migration_agent:
        section["allow_migration_agent"] = True
    if report.smt_enabled:
        section["allow_smt"] = True
    return section


@attest.command("sim-key")
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Key file  [default: $SEALTORCH_SIM_KEY or ~/.local/share/sealtorch/sim-attestation.key]",
)
@click.option(
    "--show-public",
    is_flag=True,
    help="Print only the public key (for a key server's trusted sim keys).",
)
def sim_key_cmd(key_file: Path | None, show_public: bool) -> None:
    """Create (if needed) this host's simulated attestation key and print its public key.

    The private key stays in a 0600 file. A key server accepts sim evidence only from public
    keys it is configured to trust.
    """
    from sealtorch.attestation import (
        default_sim_key_path,
        format_sim_public_key,
        load_or_create_sim_key,
    )

    path = key_file or default_sim_key_path()
    public = format_sim_public_key(load_or_create_sim_key(path).public_key)
    if show_public:
        click.echo(public)
    else:
        click.echo(f"key file:   {path}")
        click.echo(f"public key: {public}")


@attest.command("check-policy")
@click.argument("policy_file", type=click.Path(dir_okay=False, path_type=Path))
def check_policy_cmd(policy_file: Path) -> None:
    """Validate a release policy; print it normalised, with its digest (exit 2 if invalid)."""
    from sealtorch.attestation import Policy

    policy = Policy.from_file(policy_file)
    _echo_json({"digest": policy.digest, "policy": policy.to_dict()})


_FETCH_EPILOG = """\b
Examples:
  sealtorch attest fetch-collateral quote.bin --pccs-url https://pccs.example:8081
  # SEV-SNP: AMD's chain and CRL for the product, and the VCEK of the report's chip and TCB
  sealtorch attest fetch-collateral report.bin --cache-dir collateral/
  sealtorch attest fetch-collateral report.bin --product Genoa --cache-dir collateral/
"""


@attest.command("fetch-collateral", epilog=_FETCH_EPILOG)
@click.argument("quote", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--pccs-url", metavar="URL", help="PCCS or Intel PCS base URL (SGX, TDX).")
@click.option(
    "--amd-kds-url",
    metavar="URL",
    default="https://kdsintf.amd.com",
    show_default=True,
    help="AMD Key Distribution Service (SEV-SNP).",
)
@click.option(
    "--product",
    type=click.Choice(["Milan", "Genoa", "Turin"]),
    help="SEV-SNP: the processor generation, when the report does not tell (version 2 "
    "reports without a VCEK).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to store it  [default: ~/.cache/sealtorch/collateral]",
)
def fetch_collateral_cmd(
    quote: Path,
    pccs_url: str | None,
    amd_kds_url: str,
    product: str | None,
    cache_dir: Path | None,
) -> None:
    """Fetch the collateral QUOTE's platform needs into a cache directory.

    DCAP quotes need --pccs-url; SEV-SNP reports are fetched from AMD KDS into the snp/ folder.
    The directory can then be used offline with `verify --collateral-dir`.
    """
    import dcap_qvl

    from sealtorch.attestation import (
        CollateralKey,
        PccsCollateral,
        default_collateral_cache_dir,
        detect_evidence,
    )

    evidence = detect_evidence(_read_evidence_file(quote))
    if evidence.type == "sim":
        raise click.UsageError("sim evidence needs no collateral")
    if evidence.type == "sev-snp":
        _fetch_snp(evidence.data, amd_kds_url, product, cache_dir or default_collateral_cache_dir())
        return
    if pccs_url is None:
        raise click.UsageError(f"{quote} is a DCAP quote: pass --pccs-url")
    try:
        parsed = dcap_qvl.parse_quote(evidence.data)
        key = CollateralKey(
            tee="tdx" if parsed.is_tdx() else "sgx",
            fmspc=parsed.fmspc().upper(),
            ca="platform" if parsed.ca() == "platform" else "processor",
        )
    except ValueError as exc:
        raise click.UsageError(
            f"{quote} is not a DCAP quote with a PCK certificate: {exc}"
        ) from exc
    source = PccsCollateral(pccs_url, cache_dir=cache_dir or default_collateral_cache_dir())
    collateral = source.refresh(key)
    click.echo(
        f"{key}: valid until {collateral.next_update.isoformat()}, stored in "
        f"{source.cache_dir / key.filename}"
    )


def _fetch_snp(data: bytes, kds_url: str, product_name: str | None, cache_dir: Path) -> None:
    from sealtorch.attestation import fetch_from_kds
    from sealtorch.attestation.snp_collateral import parse_product
    from sealtorch.attestation.snp_report import (
        GUID_VCEK,
        GUID_VLEK,
        parse_cert_table,
        parse_report,
        split_evidence,
    )
    from sealtorch.errors import EvidenceError

    raw, table = split_evidence(data)
    report = parse_report(raw)
    sent = parse_cert_table(table)
    product = parse_product(product_name) if product_name else None
    if product is None:
        cert = sent.get(GUID_VCEK) or sent.get(GUID_VLEK)
        if cert is not None:
            from sealtorch._crypto.amdsev import cn_of, load_certificate

            issuer = cn_of(load_certificate(cert).issuer)
            product = parse_product(issuer.rsplit("-", 1)[-1])
        elif report.cpuid is not None and report.cpuid[0] == 0x1A:
            product = "Turin"
        elif report.cpuid is not None and report.cpuid[0] == 0x19:
            product = "Milan" if report.cpuid[1] < 0x10 else "Genoa"
        else:
            raise EvidenceError("the report does not tell its processor generation: pass --product")
    kind = report.signing_key
    needs_vcek = kind == "vcek" and GUID_VCEK not in sent
    written = fetch_from_kds(
        cache_dir / "snp",
        product=product,
        report=report if needs_vcek else None,
        kind=kind,
        base_url=kds_url,
    )
    click.echo(f"SEV-SNP {product}: stored {', '.join(str(path) for path in written)}")
