"""A model key released end to end to an AMD SEV-SNP guest (`--tee snp`), against fake devices.

The guest side is the real ``SnpAttester`` over a fake configfs-tsm tree whose "kernel" answers
with reports signed by a test VCEK; the VCEK chains to a test ARK that the key server's SNP
verifier trusts through ``TrustedArks.test_roots_insecure`` (the test-only seam: the production
pins are AMD's, and a test below shows they refuse this hierarchy). The key server is the real
app on a real TLS socket with a real SQLite store; the release client is the one `serve --keys
... --tee snp` builds; the model is decrypted with the released key.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from _fixtures.keyserver import (
    ServerThread,
    TlsFiles,
    create_admin_token,
    make_tls,
    new_signing_key,
    sealtorch_command,
)
from _fixtures.snp import HOST_DATA, MEASUREMENT, FakeAmd, FakeSnpTsm
from sealtorch.attestation import (
    SnpAttester,
    SnpCollateralDirectory,
    SnpVerifier,
    VerifierSet,
)
from sealtorch.client import AdminClient, KeyReleaseClient
from sealtorch.errors import KeyReleaseError
from sealtorch.keys import generate_key
from sealtorch.keyserver.app import create_app
from sealtorch.keyserver.masterkey import FileMasterKey, FileMasterKeyConfig
from sealtorch.keyserver.settings import KeyServerSettings
from sealtorch.keyserver.store import open_store
from sealtorch.serving.keysource import resolve_key_source

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.e2e]

MODEL = "tiny-snp"


@dataclass
class Stack:
    url: str
    tls: TlsFiles
    token: str
    release_key: str
    amd: FakeAmd
    tsm_root: Path


def _policy(**snp: object) -> dict[str, object]:
    rules = {"measurement": [MEASUREMENT.hex()], "host_data": [HOST_DATA.hex()], **snp}
    return {"version": 1, "name": "snp-e2e", "allowed_tees": ["snp"], "snp": rules}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    amd = FakeAmd()
    cache = tmp_path / "collateral" / "snp"
    amd.write_cache(cache, crl=amd.crl(this_update=datetime.now(UTC) - timedelta(days=1)))
    verifiers = VerifierSet(SnpVerifier(collateral=SnpCollateralDirectory(cache), roots=amd.roots))
    store = open_store(f"sqlite:///{tmp_path / 'ks.db'}")
    store.migrate()
    signer = new_signing_key()
    settings = KeyServerSettings(
        database_url="sqlite:///unused", master_key=FileMasterKeyConfig(path=tmp_path / "unused")
    )
    app = create_app(
        settings,
        store=store,
        master_key=FileMasterKey.create(tmp_path / "master.key"),
        signing_key=signer,
        verifiers=verifiers,
    )
    tls = make_tls(tmp_path / "tls")
    tsm_root = tmp_path / "sys" / "kernel" / "config" / "tsm" / "report"
    tsm_root.mkdir(parents=True)
    try:
        with ServerThread(app, tls=tls) as server:
            yield Stack(
                url=server.url,
                tls=tls,
                token=create_admin_token(store),
                release_key=signer.public_key.text,
                amd=amd,
                tsm_root=tsm_root,
            )
    finally:
        store.close()


def _client(stack: Stack) -> KeyReleaseClient:
    """What `serve --keys URL --tee snp --tee-root ROOT` builds, with the fake kernel."""
    built = resolve_key_source(
        stack.url,
        tee="snp",
        tee_root=stack.tsm_root,
        ca=stack.tls.ca,
        keyserver_pubkeys=[stack.release_key],
    )
    assert isinstance(built.attester, SnpAttester)
    return KeyReleaseClient(
        stack.url,
        attester=FakeSnpTsm(stack.tsm_root, stack.amd),
        ca=stack.tls.ca,
        trusted_release_keys=[stack.release_key],
    )


def test_a_sealed_model_is_released_to_an_snp_guest_and_decrypted(
    stack: Stack, tmp_path: Path
) -> None:
    import sealtorch

    dek = generate_key()
    with AdminClient(stack.url, token=stack.token, ca=stack.tls.ca) as admin:
        admin.create_model(MODEL, key=dek)
        admin.set_policy(MODEL, _policy())
    torch.manual_seed(0)
    reference = torch.nn.Linear(4, 3)
    sealed = tmp_path / "tiny.sealed"
    sealtorch.encrypt_model(
        reference.state_dict(),
        sealed,
        model_id=MODEL,
        key=dek,
        arch="torch.nn:Linear",
        arch_kwargs={"in_features": 4, "out_features": 3},
    )
    with _client(stack) as client:
        model = sealtorch.load_model(sealed, key=client, allowed_archs=["torch.nn:Linear"])
    x = torch.randn(2, 4)
    assert torch.equal(model(x), reference(x))
    assert list(stack.tsm_root.iterdir()) == []  # the report entry was removed


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        (_policy(measurement=["00" * 48]), "measurement_mismatch"),
        (_policy(min_tcb={"microcode": 200}), "tcb_below_minimum"),
        (_policy(min_guest_svn=5), "guest_svn_too_low"),
        (_policy(vmpl=1), "vmpl_mismatch"),
    ],
)
def test_the_key_server_refuses_with_the_snp_reason(
    stack: Stack, policy: dict[str, object], reason: str
) -> None:
    with AdminClient(stack.url, token=stack.token, ca=stack.tls.ca) as admin:
        admin.create_model(MODEL, key=generate_key())
        admin.set_policy(MODEL, policy)
    with _client(stack) as client, pytest.raises(KeyReleaseError, match=reason):
        client.release([MODEL]).raise_for_denials()


def test_production_pins_refuse_the_test_hierarchy(stack: Stack, tmp_path: Path) -> None:
    """The same guest evidence, verified the way a real key server does (AMD's pins)."""
    from sealtorch.attestation import make_verifiers

    collateral = tmp_path / "collateral"
    evidence = FakeSnpTsm(stack.tsm_root, stack.amd).evidence(b"\1" * 64)
    with pytest.raises(Exception, match="does not end at AMD's ARK for Milan"):
        make_verifiers(collateral_path=collateral).verify(evidence, now=datetime.now(UTC))


def test_serve_accepts_tee_snp_and_fails_clearly_outside_an_snp_guest(
    stack: Stack, tmp_path: Path
) -> None:
    """`serve --tee snp` reaches the SNP attester; without the guest device it says so."""
    import sealtorch

    sealed = tmp_path / "m.sealed"
    sealtorch.encrypt_model(
        torch.nn.Linear(4, 3).state_dict(),
        sealed,
        model_id=MODEL,
        key=generate_key(),
        arch="torch.nn:Linear",
        arch_kwargs={"in_features": 4, "out_features": 3},
    )
    result = subprocess.run(
        sealtorch_command(
            "serve",
            str(sealed),
            "--keys",
            stack.url,
            "--keys-ca",
            str(stack.tls.ca),
            "--tee",
            "snp",
            "--tee-root",
            str(tmp_path / "no-configfs"),
            "--keyserver-pubkey",
            stack.release_key,
            "--port",
            "0",
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "not an SEV-SNP guest" in result.stderr + result.stdout, result.stderr


def test_snp_evidence_for_another_key_is_refused_by_the_server(stack: Stack) -> None:
    """The host swaps the HPKE key of a genuine SNP guest's request: binding_mismatch."""
    import ssl

    import httpx

    from sealtorch._crypto import hpke
    from sealtorch.attestation import report_data_for
    from sealtorch.protocol import b64decode, b64encode

    with AdminClient(stack.url, token=stack.token, ca=stack.tls.ca) as admin:
        admin.create_model(MODEL, key=generate_key())
        admin.set_policy(MODEL, _policy())
    suite = hpke.DEFAULT_SUITE
    honest = hpke.generate_private_key(suite).public_key().encode()
    attacker = hpke.generate_private_key(suite).public_key().encode()
    context = ssl.create_default_context(cafile=str(stack.tls.ca))
    with httpx.Client(base_url=stack.url, verify=context) as http:
        nonce = b64decode(http.post("/v1/attestation/challenge", json={}).json()["nonce"])
        evidence = FakeSnpTsm(stack.tsm_root, stack.amd).evidence(
            report_data_for(nonce=nonce, hpke_suite=suite, public_key=honest)
        )
        response = http.post(
            "/v1/keys/release",
            json={
                "nonce": b64encode(nonce),
                "evidence": evidence.to_wire(),
                "hpke": {"suite": suite, "public_key": b64encode(attacker)},
                "models": [MODEL],
                "session": False,
            },
        )
    assert response.status_code == 403
    assert "binding_mismatch" in response.text
    assert "sealed_key" not in response.text
