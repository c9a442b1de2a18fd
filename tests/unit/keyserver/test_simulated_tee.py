"""Trusted sim keys need the explicit opt-in ``allow_simulated_tee_insecure`` (issue 12, item
4): from the config file, the environment or an option; with it, the start is logged at WARNING
naming the keys. (Real processes: tests/e2e/test_keyserver_simulated_tee.py.)"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sealtorch.errors import ConfigError
from sealtorch.keyserver.app import open_verifiers
from sealtorch.keyserver.settings import CONFIG_FILE, load_settings, render_config

KEY = "ed25519:" + "ab" * 32
SIM_ENV = "SEALTORCH_KEYSERVER_ATTESTATION_SIM_TRUSTED_KEYS"
ALLOW_ENV = "SEALTORCH_KEYSERVER_ATTESTATION_ALLOW_SIMULATED_TEE_INSECURE"


def _data(tmp_path: Path, text: str) -> Path:
    data = tmp_path / "ks"
    data.mkdir()
    (data / CONFIG_FILE).write_text(text)
    return data


def test_a_sim_key_from_the_environment_is_refused_naming_the_variable(tmp_path: Path) -> None:
    data = _data(tmp_path, render_config())
    settings = load_settings(data, environ={SIM_ENV: KEY})
    assert not settings.allow_simulated_tee_insecure
    with pytest.raises(ConfigError) as refused:
        open_verifiers(settings)
    message = str(refused.value)
    assert "\n" not in message
    assert SIM_ENV in message
    assert "--allow-simulated-tee-insecure" in message


def test_a_sim_key_in_the_config_without_the_opt_in_is_refused(tmp_path: Path) -> None:
    text = render_config(sim_trusted_keys=(KEY,))
    data = _data(tmp_path, text.replace("insecure = true", "insecure = false"))
    with pytest.raises(ConfigError, match=r"keyserver\.toml"):
        open_verifiers(load_settings(data, environ={}))


@pytest.mark.parametrize(
    ("environ", "overrides"),
    [
        ({SIM_ENV: KEY, ALLOW_ENV: "true"}, None),
        ({SIM_ENV: KEY}, {"attestation": {"allow_simulated_tee_insecure": True}}),
    ],
    ids=["environment", "option"],
)
def test_the_opt_in_starts_with_a_warning_naming_the_keys(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    environ: dict[str, str],
    overrides: dict[str, dict[str, bool]] | None,
) -> None:
    data = _data(tmp_path, render_config())
    settings = load_settings(data, environ=environ, overrides=overrides)
    with caplog.at_level(logging.WARNING, logger="sealtorch.keyserver"):
        verifiers = open_verifiers(settings)
    assert "sim" in verifiers.evidence_types
    assert settings.describe()["evidence"]["allow_simulated_tee_insecure"] is True
    (record,) = [r for r in caplog.records if "simulated TEE is trusted" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert KEY in record.getMessage()


def test_init_writes_the_opt_in_only_with_sim_keys_and_comments_it() -> None:
    assert "allow_simulated_tee_insecure = false" in render_config()
    text = render_config(sim_trusted_keys=(KEY,))
    assert "allow_simulated_tee_insecure = true" in text
    assert "# INSECURE, development only" in text
