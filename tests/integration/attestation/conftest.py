"""A real local PCCS: an HTTP server on 127.0.0.1 serving the sample collateral in PCS v4 format."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pccs_fake import FakePccs

from _fixtures.httpfake import serve_http


@pytest.fixture
def pccs(attestation_samples: Path) -> Iterator[FakePccs]:
    fake = FakePccs(
        collateral={
            tee: json.loads((attestation_samples / f"{tee}_quote_collateral.json").read_text())
            for tee in ("sgx", "tdx")
        }
    )

    with serve_http(fake.respond) as url:
        fake.url = url
        yield fake


@pytest.fixture(autouse=True)
def _private_sim_key(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEALTORCH_SIM_KEY", str(tmp_path_factory.mktemp("simkey") / "k"))
