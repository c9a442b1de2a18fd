"""`snp` wired through the services' settings: verifiers, the key cache's TEE, serve's source."""

from __future__ import annotations

from pathlib import Path

import pytest

from _fixtures.keyserver import new_signing_key
from sealtorch.attestation import SnpAttester, make_verifiers
from sealtorch.errors import ConfigError
from sealtorch.keycache.settings import load_settings
from sealtorch.serving.keysource import resolve_key_source

RELEASE = new_signing_key().public_key.text


def _cache(tee: dict[str, object], **extra: dict[str, object]) -> dict[str, dict[str, object]]:
    base: dict[str, dict[str, object]] = {
        "keyserver": {"url": "https://keys.test:8443", "pubkeys": (RELEASE,)},
        "tee": tee,
        "listen": {"socket": "/tmp/kc.sock"},
        "local": {"collateral_path": "/srv/collateral"},
    }
    base.update(extra)
    return base


def test_keycache_runs_in_an_snp_guest_but_cannot_persist() -> None:
    settings = load_settings(overrides=_cache({"type": "snp", "root": "/tsm"}))
    assert settings.tee == "snp"
    with pytest.raises(ConfigError, match="SNP has no platform sealing key"):
        load_settings(overrides=_cache({"type": "snp"}, persistence={"path": "/s"}))


def test_serve_key_source_uses_the_snp_attester(tmp_path: Path) -> None:
    client = resolve_key_source(
        "https://keys.test:8443", tee="snp", tee_root=tmp_path, keyserver_pubkeys=[RELEASE]
    )
    assert isinstance(client.attester, SnpAttester)
    assert client.attester.root == tmp_path


def test_collateral_settings_cover_snp(tmp_path: Path) -> None:
    """The key server's and key cache's collateral_path / pccs_url verify SNP from snp/."""
    directory = make_verifiers(collateral_path=tmp_path)
    assert "sev-snp" in directory.evidence_types
    explicit = make_verifiers(snp_collateral_dir=tmp_path / "elsewhere")
    assert explicit.evidence_types == {"sev-snp"}
