"""Attestation hot path: verify evidence + evaluate the release policy, per request.

DCAP: the real SGX and TDX sample quotes, verified at their collateral's own time with
collateral served from the PCCS cache on disk/in memory (the PCCS URL points at a closed port,
so any network use would fail), then policy evaluation with the report_data binding. Sim: the
same with a simulated-TEE evidence. Targets from the issue: DCAP p50 <= 2 ms and p99 <= 5 ms;
sim p50 <= 0.5 ms. The bare ``dcap_qvl.verify`` call is measured in the same run as the
baseline, to show sealtorch's own overhead.

SEV-SNP: AMD's real Milan report, its VCEK and AMD's real Milan chain (pinned ARK) from the
offline SNP collateral cache, then the SNP policy with the binding; target p50 <= 1 ms. The
sample comes without AMD's CRL, so the verifier runs with ``allow_missing_crl_insecure`` (the
CRL check is done once per chain and cached, like the chain itself, so the per-request path is
the same). Baseline: the bare ECDSA P-384 signature check of the report.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import dcap_qvl

from benchmarks._harness import Context, Result, percentile, result
from sealtorch._crypto.amdsev import check_p384_signature, load_certificate
from sealtorch.attestation import (
    CollateralFile,
    DcapVerifier,
    Evidence,
    PccsCollateral,
    Policy,
    SimAttester,
    SimVerifier,
    SnpCollateralDirectory,
    SnpVerifier,
)
from sealtorch.attestation.snp_report import parse_report

_REPO = Path(__file__).resolve().parents[1]
_SAMPLES = {
    # tee: (quote, collateral, unix time when the collateral was valid)
    "sgx": ("sgx_quote", "sgx_quote_collateral.json", 1750334171),
    "tdx": ("tdx_quote", "tdx_quote_collateral.json", 1750331763),
}


def _samples_dir() -> Path:
    """The real quotes and collateral the tests use (provenance in their README.md)."""
    return _REPO / "tests" / "data" / "attestation"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _timings(
    fn: Callable[[], object], *, runs: int, warmup: int = 50
) -> tuple[list[float], list[float]]:
    """Per-call wall-clock and CPU (this thread) times in ms. On a busy machine the wall-clock
    tail includes time the process spent descheduled; the CPU time shows the code's own cost."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        cpu.append((time.thread_time() - start_cpu) * 1000.0)
        wall.append((time.perf_counter() - start) * 1000.0)
    return wall, cpu


def _policy_for(tee: str, claims_values: dict[str, object]) -> Policy:
    if tee == "sgx":
        rules = {"mrenclave": [claims_values["mrenclave"]], "mrsigner": [claims_values["mrsigner"]]}
        tcb = {
            "accepted_statuses": [claims_values["tcb_status"]],
            "allowed_advisories": list(claims_values["advisory_ids"]),  # type: ignore[call-overload]
        }
        return Policy.from_dict({"allowed_tees": ["sgx"], "sgx": rules, "tcb": tcb})
    if tee == "tdx":
        rules = {"mrtd": [claims_values["mrtd"]], "rtmr0": [claims_values["rtmr0"]]}
        return Policy.from_dict({"allowed_tees": ["tdx"], "tdx": rules})
    return Policy.from_dict(
        {"allowed_tees": ["sim"], "sim": {"mrenclave": [claims_values["mrenclave"]]}}
    )


def run(ctx: Context) -> list[Result]:
    runs = 300 if ctx.quick else 3000
    samples_dir = _samples_dir()
    cache = ctx.workdir / "collateral-cache"
    cache.mkdir()
    source = PccsCollateral(f"http://127.0.0.1:{_closed_port()}", cache_dir=cache, timeout=1.0)
    verifier = DcapVerifier(collateral=source)
    results: list[Result] = []

    for tee, (quote_name, collateral_name, at) in _SAMPLES.items():
        collateral = CollateralFile(samples_dir / collateral_name).collateral
        shutil.copyfile(samples_dir / collateral_name, cache / collateral.key.filename)
        evidence = Evidence(
            type="sgx-dcap" if tee == "sgx" else "tdx-dcap",
            data=(samples_dir / quote_name).read_bytes(),
        )
        now = datetime.fromtimestamp(at, UTC)
        claims = verifier.verify(evidence, now=now)
        policy = _policy_for(tee, claims.to_dict())
        expected = claims.report_data

        def hot_path(
            evidence: Evidence = evidence,
            now: datetime = now,
            policy: Policy = policy,
            expected: bytes = expected,
        ) -> None:
            decided = policy.evaluate(
                verifier.verify(evidence, now=now), now=now, expected_report_data=expected
            )
            if not decided.allowed:  # pragma: no cover - the benchmark would be meaningless
                raise RuntimeError(decided.message)

        baseline_collateral = collateral.qvl
        data = evidence.data

        def bare(
            at: int = at,
            data: bytes = data,
            qvl: dcap_qvl.QuoteCollateralV3 = baseline_collateral,
        ) -> None:
            dcap_qvl.verify(data, qvl, at)

        timed, cpu = _timings(hot_path, runs=runs)
        base, _ = _timings(bare, runs=runs)
        p50, p99 = percentile(timed, 50), percentile(timed, 99)
        name = f"attestation/dcap-{tee}-verify+policy"
        results += [
            result(name, "p50 latency", p50, "ms", "<= 2", runs=runs),
            result(
                name,
                "p99 latency",
                p99,
                "ms",
                "<= 5",
                runs=runs,
                bare_dcap_qvl_p99_ms=percentile(base, 99),
            ),
            result(name, "p99 CPU time", percentile(cpu, 99), "ms", runs=runs),
            result(
                name,
                "p50 vs bare dcap_qvl.verify",
                p50 / percentile(base, 50),
                "x",
                bare_p50_ms=percentile(base, 50),
            ),
        ]
    if source.fetch_count:  # pragma: no cover - would mean the hot path used the network
        raise RuntimeError("the DCAP hot path fetched collateral")

    results += _snp(ctx, runs)

    attester = SimAttester("serve", key_path=ctx.workdir / "sim.key")
    sim_verifier = SimVerifier(trusted_keys=[attester.public_key])
    sim_evidence = attester.evidence(b"\x11" * 64)
    now = datetime.now(UTC)
    sim_claims = sim_verifier.verify(sim_evidence, now=now)
    sim_policy = _policy_for("sim", sim_claims.to_dict())

    def sim_path() -> None:
        decided = sim_policy.evaluate(
            sim_verifier.verify(sim_evidence, now=now), now=now, expected_report_data=b"\x11" * 64
        )
        if not decided.allowed:  # pragma: no cover
            raise RuntimeError(decided.message)

    timed, _ = _timings(sim_path, runs=runs)
    results += [
        result(
            "attestation/sim-verify+policy", "p50 latency", percentile(timed, 50), "ms", "<= 0.5"
        ),
        result("attestation/sim-verify+policy", "p99 latency", percentile(timed, 99), "ms"),
    ]
    return results


def _snp(ctx: Context, runs: int) -> list[Result]:
    snp = _samples_dir() / "snp"
    raw = bytes.fromhex((snp / "report_milan.hex").read_text().strip())
    report = parse_report(raw)
    folder = ctx.workdir / "snp-collateral" / "Milan"
    (folder / "vcek").mkdir(parents=True)
    shutil.copyfile(snp / "cert_chain_milan", folder / "cert_chain.pem")
    vcek_der = (snp / "vcek_milan.der").read_bytes()
    (folder / "vcek" / f"{report.chip_id.hex()}-{report.reported_tcb.hex()}.der").write_bytes(
        vcek_der
    )
    verifier = SnpVerifier(
        collateral=SnpCollateralDirectory(folder.parent), allow_missing_crl_insecure=True
    )
    evidence = Evidence(type="sev-snp", data=raw)
    now = datetime(2024, 6, 1, tzinfo=UTC)
    claims = verifier.verify(evidence, now=now)
    policy = Policy.from_dict(
        {
            "allowed_tees": ["snp"],
            "snp": {
                "measurement": [claims.launch_measurement],
                "min_tcb": {"bootloader": 3, "snp": 8, "microcode": 115},
                "allow_smt": True,
            },
        }
    )

    def hot_path() -> None:
        decided = policy.evaluate(
            verifier.verify(evidence, now=now), now=now, expected_report_data=claims.report_data
        )
        if not decided.allowed:  # pragma: no cover
            raise RuntimeError(decided.message)

    vcek = load_certificate(vcek_der)
    r, s = report.signature

    def bare() -> None:
        check_p384_signature(vcek, report.signed_bytes, r, s)

    timed, cpu = _timings(hot_path, runs=runs)
    base, _ = _timings(bare, runs=runs)
    p50 = percentile(timed, 50)
    name = "attestation/snp-verify+policy"
    return [
        result(name, "p50 latency", p50, "ms", "<= 1", runs=runs),
        result(name, "p99 latency", percentile(timed, 99), "ms", runs=runs),
        result(name, "p99 CPU time", percentile(cpu, 99), "ms", runs=runs),
        result(
            name,
            "p50 vs bare ECDSA P-384 check",
            p50 / percentile(base, 50),
            "x",
            bare_p50_ms=percentile(base, 50),
        ),
    ]
