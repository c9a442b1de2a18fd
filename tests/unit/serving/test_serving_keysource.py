"""Key sources of `sealtorch serve`: --keys URLs and the unattested --key-file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from _fixtures.keyserver import new_signing_key
from sealtorch.errors import ConfigError
from sealtorch.keys import KeyFile, write_key_file
from sealtorch.serving.keysource import (
    KeyEndpoint,
    dev_key_file,
    parse_keys_url,
    resolve_key_source,
)


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        (
            "unix:///run/sealtorch/keycache.sock",
            KeyEndpoint("unix", path=Path("/run/sealtorch/keycache.sock")),
        ),
        ("https://keys.example.com:7443", KeyEndpoint("https", host="keys.example.com", port=7443)),
        ("https://127.0.0.1:7443/", KeyEndpoint("https", host="127.0.0.1", port=7443)),
        ("https://keys.example.com", KeyEndpoint("https", host="keys.example.com", port=443)),
        ("https://[::1]:8443", KeyEndpoint("https", host="::1", port=8443)),
    ],
)
def test_valid_urls(url: str, endpoint: KeyEndpoint) -> None:
    assert parse_keys_url(url) == endpoint
    assert parse_keys_url(str(endpoint)) == endpoint


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:7443", "plain http is refused"),
        ("unix://run/keycache.sock", "three slashes"),
        ("unix:relative.sock", "three slashes"),
        ("https://", "names no host"),
        ("https://user:pw@host:1", "credentials"),
        ("https://host:99999", "port is not a number"),
        ("https://host:1/release", "no path"),
        ("https://host:1?x=1", "no query"),
        ("ftp://host", "use unix:///PATH"),
        ("keycache.sock", "use unix:///PATH"),
    ],
)
def test_invalid_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_keys_url(url)


def test_resolving_needs_a_tee_and_says_what_is_missing() -> None:
    with pytest.raises(ConfigError, match="--keys needs --tee"):
        resolve_key_source("https://127.0.0.1:7443", tee=None)
    with pytest.raises(ConfigError, match="unknown TEE"):
        resolve_key_source("https://127.0.0.1:7443", tee="sev")
    with pytest.raises(ConfigError, match="--keys-ca applies to an https://") as info:
        resolve_key_source("unix:///run/keycache.sock", tee="gramine", ca="/etc/ca.pem")
    assert info.value.exit_code == 2
    with pytest.raises(ConfigError, match="--sim-key applies to --tee sim"):
        resolve_key_source("unix:///run/keycache.sock", tee="tdx", sim_key="/k")
    with pytest.raises(ConfigError, match="--tee-root applies"):
        resolve_key_source("unix:///run/keycache.sock", tee="sim", tee_root="/d")
    # No pinned key server key: nothing could prove where a key comes from.
    with pytest.raises(ConfigError, match="--keys needs --keyserver-pubkey") as info:
        resolve_key_source("unix:///run/keycache.sock", tee="tdx")
    assert info.value.exit_code == 2
    with pytest.raises(ConfigError, match="must start with"):
        resolve_key_source("unix:///run/keycache.sock", tee="tdx", keyserver_pubkeys=["x"])


def test_resolving_builds_an_attested_client_for_the_serve_role(tmp_path: Path) -> None:
    from sealtorch.attestation import measure
    from sealtorch.attestation.sim import SimAttester
    from sealtorch.client import KeyReleaseClient

    pins = [new_signing_key().public_key, new_signing_key().public_key]
    client = resolve_key_source(
        "unix:///run/keycache.sock",
        tee="sim",
        sim_key=tmp_path / "sim.key",
        keyserver_pubkeys=[pin.text for pin in pins],
    )
    try:
        assert isinstance(client, KeyReleaseClient)
        assert client.url == "unix:///run/keycache.sock"
        assert client.trusted_release_keys.keys == tuple(sorted(pins, key=lambda k: k.key_id))
        attester = client.attester
        assert isinstance(attester, SimAttester)
        assert attester.role == "serve"
        assert attester.mrenclave == measure("serve")
        assert attester.evidence(bytes(64)).type == "sim"
    finally:
        client.close()


def test_the_development_key_file_warns_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "model.key"
    key = write_key_file(path)
    with caplog.at_level(logging.WARNING, logger="sealtorch"):
        provider = dev_key_file(path)
    assert isinstance(provider, KeyFile)
    assert provider.data_key("m", 1) == key
    assert "NO ATTESTATION" in caplog.text
    assert key.material.hex() not in caplog.text
