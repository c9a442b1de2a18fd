"""Key cache settings: the TOML file, options overriding it, and the refusals that keep a
misconfiguration from weakening the cache."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from _fixtures.keyserver import new_signing_key
from sealtorch._listen import ReadTimeouts
from sealtorch.errors import ConfigError
from sealtorch.keycache.settings import load_settings, parse_host_port

SIM_KEY = "ed25519:" + "11" * 32
RELEASE = new_signing_key().public_key

CONFIG = f"""
[keyserver]
url = "https://keys.example.com:8443"
ca = "ks-ca.crt"
pubkeys = ["{RELEASE.text}"]
models = ["resnet50", "efficientnet-lite0"]
timeout_seconds = 5

[tee]
type = "sim"
sim_key = "sim.key"

[listen]
socket = "run/keycache.sock"
socket_group = "sealtorch"
tcp = "127.0.0.1:7443"
tls_cert = "cache.crt"
tls_key = "cache.key"
metrics = "[::1]:9464"

[local]
sim_trusted_keys = ["{SIM_KEY}"]
nonce_ttl_seconds = 20
session_seconds = 0

[leases]
refresh_seconds = 60
renew_fraction = 0.25
backoff_initial_seconds = 0.5
backoff_max_seconds = 30

[persistence]
path = "state/keycache.sealed"
"""


def _minimal(**sections: dict[str, object]) -> dict[str, dict[str, object]]:
    base: dict[str, dict[str, object]] = {
        "keyserver": {"url": "https://keys.test:8443", "pubkeys": (RELEASE.text,)},
        "tee": {"type": "sim"},
        "listen": {"socket": "/tmp/kc.sock"},
        "local": {"sim_trusted_keys": (SIM_KEY,)},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base


def test_config_file_with_relative_paths(tmp_path: Path) -> None:
    config = tmp_path / "keycache.toml"
    config.write_text(CONFIG)
    settings = load_settings(config)
    assert settings.keyserver_url == "https://keys.example.com:8443"
    assert settings.keyserver_ca == tmp_path / "ks-ca.crt"
    assert settings.keyserver_pubkeys == (RELEASE.text,)
    assert settings.trusted_release_keys().key_ids == (RELEASE.key_id,)
    assert settings.models == ("resnet50", "efficientnet-lite0")
    assert settings.sim_key == tmp_path / "sim.key"
    assert settings.socket_path == tmp_path / "run" / "keycache.sock"
    assert settings.socket_mode == 0o660  # a group was named
    assert settings.tcp == ("127.0.0.1", 7443)
    assert settings.tcp_tls
    assert settings.metrics == ("::1", 9464)
    assert settings.nonce_ttl == timedelta(seconds=20)
    assert settings.session_duration == timedelta(0)
    assert settings.refresh_interval == timedelta(minutes=1)
    assert settings.renew_fraction == 0.25
    assert settings.persist_path == tmp_path / "state" / "keycache.sealed"
    assert settings.sources["leases.refresh_seconds"] == "file"
    described = settings.describe()
    assert described["socket_mode"] == "0660"
    assert described["models"] == ["resnet50", "efficientnet-lite0"]
    assert described["keyserver_pubkeys"] == [RELEASE.key_id]


def test_options_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "keycache.toml"
    config.write_text(CONFIG)
    monkeypatch.chdir(tmp_path.parent)
    settings = load_settings(
        config,
        overrides={
            "leases": {"refresh_seconds": 5, "renew_fraction": None},
            "listen": {"socket": "other.sock", "socket_mode": "0600", "socket_group": None},
            "keyserver": {"models": None},
        },
    )
    assert settings.refresh_interval == timedelta(seconds=5)
    assert settings.renew_fraction == 0.25  # None means "not given"
    assert settings.socket_path == tmp_path.parent / "other.sock"  # cwd-relative
    assert settings.socket_mode == 0o600
    assert settings.models == ("resnet50", "efficientnet-lite0")
    assert settings.sources["leases.refresh_seconds"] == "option"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"listen": {"socket_mode": "0666"}}, "every user on the host"),
        ({"listen": {"socket_mode": "0660"}}, "name it with --socket-group"),
        ({"listen": {"socket_mode": "rw"}}, "octal"),
        ({"listen": {"tcp": "0.0.0.0:7443"}}, "loopback"),
        ({"listen": {"tcp": "keys.example.com:7443"}}, "loopback"),
        ({"listen": {"metrics": "10.0.0.1:9464"}}, "loopback"),
        ({"listen": {"tcp": "127.0.0.1"}}, "HOST:PORT"),
        ({"listen": {"tcp": "127.0.0.1:99999"}}, "0..65535"),
        ({"listen": {"tls_cert": "/c.crt"}}, "go together"),
        ({"listen": {"tls_cert": "/c.crt", "tls_key": "/c.key"}}, "give --tcp too"),
        ({"tee": {"type": "tdx"}, "persistence": {"path": "/s"}}, "TDX has no platform sealing"),
        ({"tee": {"type": "enclave"}}, "tee.type"),
        ({"local": {"sim_trusted_keys": ()}}, "no verifier for local enclaves"),
        ({"keyserver": {"models": ("ok", "not ok")}}, "not valid model ids"),
        ({"keyserver": {"models": ("a", "a")}}, "must not repeat"),
        ({"keyserver": {"hpke_suite": "RSA"}}, "must be one of"),
        ({"keyserver": {"pubkeys": ()}}, "pins no key server release-signing public key"),
        ({"keyserver": {"pubkeys": ("nope",)}}, "is not a key server release-signing public key"),
        ({"leases": {"renew_fraction": 1.0}}, "renew_fraction"),
        ({"leases": {"backoff_initial_seconds": 10, "backoff_max_seconds": 5}}, "backoff_max"),
        ({"leases": {"refresh_everyday": True}}, "unknown setting"),
    ],
)
def test_refusals(change: dict[str, dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(overrides=_minimal(**change))


def test_required_settings_and_listeners() -> None:
    with pytest.raises(ConfigError, match="no key server"):
        load_settings(overrides={"tee": {"type": "sim"}})
    with pytest.raises(ConfigError, match="--tee"):
        load_settings(overrides={"keyserver": {"url": "https://k:1"}})
    without_listener = _minimal()
    without_listener["listen"] = {}
    with pytest.raises(ConfigError, match="somewhere to listen"):
        load_settings(overrides=without_listener)
    tcp_only = _minimal()
    tcp_only["listen"] = {"tcp": "localhost:0"}
    assert load_settings(overrides=tcp_only).tcp == ("localhost", 0)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[keyserver\nurl=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)


def test_host_port_forms() -> None:
    assert parse_host_port("[::1]:0", what="tcp") == ("::1", 0)
    assert parse_host_port("127.0.0.2:80", what="tcp") == ("127.0.0.2", 80)
    assert parse_host_port("192.0.2.1:80", what="tcp", loopback_only=False) == ("192.0.2.1", 80)


def test_read_timeouts_come_from_the_listen_section() -> None:
    default = load_settings(overrides=_minimal())
    assert default.read_timeouts == ReadTimeouts(header=10.0, body=30.0, keep_alive=30.0)
    timeouts = {
        "header_timeout_seconds": 2,
        "body_timeout_seconds": 3.5,
        "keep_alive_timeout_seconds": 60,
    }
    settings = load_settings(overrides=_minimal(listen=timeouts))
    assert settings.read_timeouts == ReadTimeouts(header=2.0, body=3.5, keep_alive=60.0)
    with pytest.raises(ConfigError, match="header_timeout_seconds"):
        load_settings(overrides=_minimal(listen={"header_timeout_seconds": 0}))


def test_several_key_servers_from_a_list_or_commas(tmp_path: Path) -> None:
    """Replicas (issue 14, item 3): ``[keyserver] url`` may be a list; the option may repeat
    (joined with commas); the upstream client fails over between them in order."""
    from sealtorch.keycache.upstream import Upstream

    listed = load_settings(
        overrides=_minimal(keyserver={"url": ("https://ks-a:8443", "https://ks-b:8443")})
    )
    assert listed.keyserver_url == "https://ks-a:8443,https://ks-b:8443"
    upstream = Upstream(
        listed.keyserver_url,
        attester=object(),  # type: ignore[arg-type] - never used: nothing is fetched here
        models=None,
        clock=lambda: None,  # type: ignore[arg-type, return-value]
        trusted_release_keys=listed.trusted_release_keys(),
    )
    try:
        assert upstream.urls == ("https://ks-a:8443", "https://ks-b:8443")
        assert upstream.url == "https://ks-a:8443"
    finally:
        upstream.close()
