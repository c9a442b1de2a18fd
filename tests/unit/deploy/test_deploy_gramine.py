"""Gramine manifest templates: valid TOML with what the attesters and the enclave need, and
nothing a production enclave must not have (debug, host argv/env, secrets)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import sysconfig
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest
from click.testing import CliRunner

from _fixtures.keyserver import new_signing_key
from sealtorch.deploy.cli import deploy
from sealtorch.deploy.gramine import (
    GramineLayout,
    KeycacheEnclave,
    PythonRuntime,
    ServeEnclave,
    render_keycache_manifest,
    render_serve_manifest,
    toml_value,
)
from sealtorch.errors import ConfigError
from sealtorch.keys import write_key_file

RUNTIME = PythonRuntime(
    interpreter=Path("/opt/python/bin/python3.11"),
    directories=(
        Path("/opt/python/lib/python3.11"),
        Path("/opt/venv/lib/python3.11/site-packages"),
    ),
    pythonpath=(Path("/opt/venv/lib/python3.11/site-packages"),),
    libpython=Path("/opt/python/lib/libpython3.11.so.1.0"),
)
MODELS = (Path("/srv/models/resnet50.sealed"), Path("/srv/models/lite0.sealed"))
#: The key server's release-signing public key the enclaves pin.
PIN = new_signing_key().public_key.text
PINNED_CACHE = KeycacheEnclave(args=("serve",), keyserver_pubkeys=(PIN,))
GRAMINE = {
    "libos": "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so",
    "runtimedir": lambda: "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc",
}


def _serve(**changes: Any) -> dict[str, Any]:
    config = ServeEnclave(
        **{
            "models": MODELS,
            "keys_url": "https://127.0.0.1:7443",
            "keyserver_pubkeys": (PIN,),
            "names": ("r50", "lite0"),
            **changes,
        }
    )
    return tomllib.loads(render_serve_manifest(config, runtime=RUNTIME))


def _walk(document: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(document, dict):
        for key, value in document.items():
            keys.append(prefix + key)
            keys.extend(_walk(value, prefix + key + "."))
    return keys


def _assert_production(manifest: dict[str, Any]) -> None:
    keys = _walk(manifest)
    assert manifest["sgx"]["debug"] is False
    assert manifest["sgx"]["remote_attestation"] == "dcap"  # /dev/attestation with DCAP quotes
    assert manifest["sgx"]["file_check_policy"] == "strict"
    assert manifest["loader"]["log_level"] == "error"
    assert not [k for k in keys if "insecure" in k], keys
    assert "sgx.thread_num" not in keys  # removed in Gramine 1.5
    assert isinstance(manifest["loader"]["entrypoint"], dict)  # loader.entrypoint.uri (1.8+)
    assert manifest["loader"]["entrypoint"]["uri"].startswith("file:")
    for name, value in manifest["loader"]["env"].items():
        assert isinstance(value, str), f"{name} must be a fixed value, never a passthrough"
    size = manifest["sgx"]["enclave_size"]
    total = int(size[:-1]) << {"K": 10, "M": 20, "G": 30}[size[-1]]
    assert total & (total - 1) == 0
    mounts = manifest["fs"]["mounts"]
    assert {"type": "tmpfs", "path": "/tmp"} in mounts
    depths = [len(Path(m["path"]).parts) for m in mounts]
    assert depths == sorted(depths)  # parents are mounted before children


def test_serve_manifest_has_what_the_enclave_and_attester_need() -> None:
    manifest = _serve()
    _assert_production(manifest)
    assert manifest["libos"]["entrypoint"] == "/opt/python/bin/python3.11"
    argv = manifest["loader"]["argv"]
    assert argv[:8] == [
        "/opt/python/bin/python3.11",
        "-B",
        "-s",
        "-m",
        "sealtorch",
        "--log-format",
        "json",
        "serve",
    ]
    assert argv[8:10] == [str(m) for m in MODELS]
    assert argv[argv.index("--keys") + 1] == "https://127.0.0.1:7443"
    assert argv[argv.index("--tee") + 1] == "gramine"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--keyserver-pubkey"] == [PIN]
    assert argv[argv.index("--port") + 1] == "8080"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--name"] == ["r50", "lite0"]
    assert "--key-file" not in argv
    env = manifest["loader"]["env"]
    assert env["PYTHONPATH"] == "/opt/venv/lib/python3.11/site-packages"
    assert env["OMP_NUM_THREADS"] == "4"
    assert "/opt/python/lib" in env["LD_LIBRARY_PATH"].split(":")
    assert manifest["sys"]["enable_sigterm_injection"] is True  # graceful drain
    assert "enable_extra_runtime_domain_names_conf" not in manifest["sys"]  # an IP: no DNS
    assert manifest["sgx"]["max_threads"] >= 32
    trusted = manifest["sgx"]["trusted_files"]
    for expected in (
        "file:{{ gramine.libos }}",
        "file:{{ gramine.runtimedir() }}/",
        "file:/opt/python/bin/python3.11",
        "file:/opt/python/lib/libpython3.11.so.1.0",
    ):
        assert expected in trusted
    assert manifest["sgx"]["allowed_files"] == [f"file:{m}" for m in MODELS]
    mounted = {m["path"] for m in manifest["fs"]["mounts"]}
    assert {"/srv/models", "/opt/python/bin/python3.11", "/lib"} <= mounted


def test_gramine_manifest_can_resolve_the_placeholders() -> None:
    text = render_serve_manifest(
        ServeEnclave(models=MODELS, keys_url="https://127.0.0.1:7443", keyserver_pubkeys=(PIN,)),
        runtime=RUNTIME,
    )
    # What `gramine-manifest` does: render the output as a Jinja template with its `gramine`.
    resolved = tomllib.loads(jinja2.Template(text).render(gramine=GRAMINE))
    assert resolved["loader"]["entrypoint"]["uri"] == f"file:{GRAMINE['libos']}"
    assert (
        "file:/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc/" in resolved["sgx"]["trusted_files"]
    )


def test_concrete_gramine_paths_need_no_second_pass() -> None:
    layout = GramineLayout(libos="/g/libsysdb.so", runtime_dir="/g/runtime", arch_libdir="/lib64")
    manifest = _serve(layout=layout)
    assert manifest["loader"]["entrypoint"]["uri"] == "file:/g/libsysdb.so"
    assert {"path": "/lib", "uri": "file:/g/runtime"} in manifest["fs"]["mounts"]
    assert "file:/usr/lib64/" in manifest["sgx"]["trusted_files"]


def test_sizes_threads_and_identity_are_configurable() -> None:
    manifest = _serve(
        enclave_size="32G", max_threads=128, edmm=True, isvprodid=7, isvsvn=3, threads=16
    )
    assert manifest["sgx"]["enclave_size"] == "32G"
    assert manifest["sgx"]["max_threads"] == 128
    assert manifest["sgx"]["edmm_enable"] is True
    assert (manifest["sgx"]["isvprodid"], manifest["sgx"]["isvsvn"]) == (7, 3)
    assert manifest["loader"]["env"]["OMP_NUM_THREADS"] == "16"


def test_a_key_server_named_by_dns_enables_name_resolution() -> None:
    manifest = _serve(keys_url="https://keycache.internal:7443")
    assert manifest["sys"]["enable_extra_runtime_domain_names_conf"] is True


def test_keycache_manifest() -> None:
    text = render_keycache_manifest(
        KeycacheEnclave(
            args=("serve", "--keyserver", "https://keys.example.com:8443", "--tee", "gramine"),
            keyserver_pubkeys=(PIN,),
            trusted=(Path("/srv/sealtorch/keyserver-ca.pem"),),
            state_dir=Path("/srv/sealtorch/keycache"),
            keyserver_host="keys.example.com",
        ),
        runtime=RUNTIME,
    )
    manifest = tomllib.loads(text)
    _assert_production(manifest)
    assert manifest["loader"]["argv"][7:10] == ["keycache", "serve", "--keyserver"]
    assert manifest["loader"]["argv"][-2:] == ["--keyserver-pubkey", PIN]
    assert "file:/srv/sealtorch/keyserver-ca.pem" in manifest["sgx"]["trusted_files"]
    assert manifest["sgx"]["allowed_files"] == ["file:/srv/sealtorch/keycache/"]
    assert manifest["sys"]["enable_extra_runtime_domain_names_conf"] is True
    assert manifest["sgx"]["enclave_size"] == "2G"
    resolved = tomllib.loads(jinja2.Template(text).render(gramine=GRAMINE))
    assert resolved["loader"]["entrypoint"]["uri"] == f"file:{GRAMINE['libos']}"
    without_state = tomllib.loads(render_keycache_manifest(PINNED_CACHE, runtime=RUNTIME))
    assert "allowed_files" not in without_state["sgx"]


def test_this_machine_s_runtime() -> None:
    runtime = PythonRuntime.current()
    assert runtime.interpreter == Path(os.path.realpath(sys.executable))
    assert runtime.interpreter.is_file()
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"]).resolve()
    assert any(stdlib.is_relative_to(root) for root in runtime.directories)
    assert Path(paths["purelib"]).resolve() in runtime.pythonpath
    for entry in sys.path:  # everything this process imports from is trusted
        path = Path(entry).resolve() if entry and not entry.endswith(".zip") else None
        if path is not None and path.is_dir() and path != Path.cwd():
            assert any(path.is_relative_to(root) for root in runtime.directories), path
    # Rendered, it is refused exactly when part of it is under /tmp (say, a checkout there).
    config = ServeEnclave(models=MODELS, keys_url="https://127.0.0.1:1", keyserver_pubkeys=(PIN,))
    if any(part.is_relative_to("/tmp") for part in (runtime.interpreter, *runtime.directories)):
        with pytest.raises(ConfigError, match="in-enclave tmpfs"):
            render_serve_manifest(config, runtime=runtime)
    else:
        manifest = tomllib.loads(render_serve_manifest(config, runtime=runtime))
        assert f"file:{runtime.interpreter}" in manifest["sgx"]["trusted_files"]


@pytest.fixture
def outside_tmp(tmp_path: Path) -> Iterator[Path]:
    """A new directory that is not under /tmp, whose name has a space.

    A manifest refuses paths under /tmp (the enclave's /tmp is a tmpfs), and pytest's tmp_path
    usually is there: then the directory is made in /var/tmp or the home directory instead.
    """
    candidates = [tmp_path, Path("/var/tmp"), Path.home()]
    for parent in (candidate.resolve() for candidate in candidates):
        if parent.is_relative_to("/tmp"):
            continue
        try:
            path = Path(tempfile.mkdtemp(prefix="sealtorch test ", dir=parent))
        except OSError:  # not writable (a read-only home, say)
            continue
        try:
            yield path
        finally:
            shutil.rmtree(path)
        return
    pytest.skip(f"no writable directory outside /tmp among {candidates}")


def _lay_out_python(root: Path) -> dict[str, Any]:
    """A Python installation on disk: a base interpreter with its standard library and
    libpython, a virtual environment whose interpreter links to it, and a source checkout on
    the import path. Returns :meth:`PythonRuntime.from_paths`'s arguments."""
    base = root / "python"
    stdlib = base / "lib" / "python3.11"
    stdlib.mkdir(parents=True)
    (base / "bin").mkdir()
    (base / "bin" / "python3.11").write_bytes(b"\x7fELF")
    (base / "lib" / "libpython3.11.so.1.0").write_bytes(b"\x7fELF")
    venv = root / "venv"
    site = venv / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "bin" / "python").symlink_to(base / "bin" / "python3.11")
    checkout = root / "checkout" / "src"
    checkout.mkdir(parents=True)
    return {
        "interpreter": venv / "bin" / "python",
        "stdlib": stdlib,
        "site_packages": (site, site),
        "import_path": [
            "",
            str(base / "lib" / "python311.zip"),
            str(stdlib),
            str(site),
            str(checkout),
            str(root / "not-there"),
        ],
        "libpython": base / "lib" / "libpython3.11.so.1.0",
    }


def test_a_python_runtime_on_disk_renders(outside_tmp: Path) -> None:
    root = outside_tmp
    site = root / "venv" / "lib" / "python3.11" / "site-packages"
    stdlib = root / "python" / "lib" / "python3.11"
    checkout = root / "checkout" / "src"
    libpython = root / "python" / "lib" / "libpython3.11.so.1.0"
    runtime = PythonRuntime.from_paths(**_lay_out_python(root))
    assert runtime.interpreter == root / "python" / "bin" / "python3.11"  # the link followed
    assert set(runtime.directories) == {stdlib, site, checkout}
    assert runtime.pythonpath == (site, checkout)
    assert runtime.libpython == libpython

    manifest = tomllib.loads(
        render_serve_manifest(
            ServeEnclave(models=MODELS, keys_url="https://127.0.0.1:1", keyserver_pubkeys=(PIN,)),
            runtime=runtime,
        )
    )
    _assert_production(manifest)
    assert manifest["libos"]["entrypoint"] == str(runtime.interpreter)
    trusted = manifest["sgx"]["trusted_files"]
    assert f"file:{runtime.interpreter}" in trusted
    assert f"file:{libpython}" in trusted
    for directory in (stdlib, site, checkout):  # trusted recursively, mounted at its own path
        assert f"file:{directory}/" in trusted
        assert {"path": str(directory), "uri": f"file:{directory}"} in manifest["fs"]["mounts"]
    env = manifest["loader"]["env"]
    assert env["PYTHONPATH"] == f"{site}:{checkout}"
    assert str(libpython.parent) in env["LD_LIBRARY_PATH"].split(":")
    keycache = tomllib.loads(render_keycache_manifest(PINNED_CACHE, runtime=runtime))
    assert f"file:{checkout}/" in keycache["sgx"]["trusted_files"]


def test_a_python_runtime_under_tmp_is_refused() -> None:
    """A checkout under /tmp on the import path: the enclave's /tmp is an empty tmpfs."""
    checkout = Path("/tmp/checkout/src")  # refused, never created
    runtime = dataclasses.replace(
        RUNTIME,
        directories=(*RUNTIME.directories, checkout),
        pythonpath=(*RUNTIME.pythonpath, checkout),
    )
    with pytest.raises(ConfigError, match="/tmp/checkout/src is under /tmp"):
        render_serve_manifest(
            ServeEnclave(models=MODELS, keys_url="https://127.0.0.1:1", keyserver_pubkeys=(PIN,)),
            runtime=runtime,
        )
    with pytest.raises(ConfigError, match="in-enclave tmpfs"):
        render_keycache_manifest(PINNED_CACHE, runtime=runtime)


# -- the attacker's side -----------------------------------------------------------------------


def test_values_cannot_inject_manifest_entries() -> None:
    hostile = Path(
        '/srv/models/x"\nsgx.debug = true\nloader.insecure__use_host_env = true\n#.sealed'
    )
    manifest = _serve(models=(hostile,), names=())
    _assert_production(manifest)
    assert manifest["loader"]["argv"][8] == str(hostile)
    assert manifest["sgx"]["allowed_files"] == [f"file:{hostile}"]


def test_a_manifest_never_carries_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="never name a key file"):
        _serve(extra_args=("--key-file", "/srv/m.key"))
    with pytest.raises(ConfigError, match="never name a key file"):
        render_keycache_manifest(KeycacheEnclave(args=("serve", "--key-file=/k")), runtime=RUNTIME)
    key_file = tmp_path / "innocent-looking.pem"
    write_key_file(key_file)
    with pytest.raises(ConfigError, match="is a sealtorch key file"):
        _serve(trusted=(key_file,))
    with pytest.raises(ConfigError, match="is a sealtorch key file"):
        _serve(models=(key_file,), names=())


def test_an_enclave_that_pins_no_key_server_key_is_refused() -> None:
    """Without a measured pin the enclave could not tell the key server's keys from a key source
    the host runs: the manifest is refused, and a pin must be a well-formed key."""
    with pytest.raises(ConfigError, match="must pin the key server's release-signing"):
        _serve(keyserver_pubkeys=())
    with pytest.raises(ConfigError, match="must pin the key server's release-signing"):
        render_keycache_manifest(KeycacheEnclave(args=("serve",)), runtime=RUNTIME)
    hostile = PIN + '"\nsgx.debug = true'
    with pytest.raises(ConfigError, match="damaged"):
        _serve(keyserver_pubkeys=(hostile,))
    with pytest.raises(ConfigError, match="must start with"):
        render_keycache_manifest(
            KeycacheEnclave(args=("serve", "--keyserver-pubkey", "ed25519:11")), runtime=RUNTIME
        )
    # pins given on the cache's own command line, or in a *trusted* (measured) config file
    in_args = render_keycache_manifest(
        KeycacheEnclave(args=("serve", "--keyserver-pubkey", PIN)), runtime=RUNTIME
    )
    assert tomllib.loads(in_args)["loader"]["argv"].count(PIN) == 1
    config = Path("/srv/sealtorch/keycache.toml")  # never read: only named
    with pytest.raises(ConfigError, match="--config file listed with --trust"):
        render_keycache_manifest(
            KeycacheEnclave(args=("serve", "--config", str(config))), runtime=RUNTIME
        )
    trusted_config = render_keycache_manifest(
        KeycacheEnclave(args=("serve", f"--config={config}"), trusted=(config,)), runtime=RUNTIME
    )
    assert "--keyserver-pubkey" not in tomllib.loads(trusted_config)["loader"]["argv"]


def test_only_gramine_evidence_in_a_gramine_manifest() -> None:
    with pytest.raises(ConfigError, match="--tee sim in a Gramine-SGX manifest"):
        render_keycache_manifest(KeycacheEnclave(args=("serve", "--tee", "sim")), runtime=RUNTIME)
    with pytest.raises(ConfigError, match="--tee tdx in a Gramine-SGX manifest"):
        render_keycache_manifest(KeycacheEnclave(args=("serve", "--tee=tdx")), runtime=RUNTIME)
    with pytest.raises(ConfigError, match="sets --tee gramine itself"):
        _serve(extra_args=("--tee", "sim"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"keys_url": "unix:///run/keycache.sock"}, "cannot share a Unix socket"),
        ({"keys_url": "http://127.0.0.1:7443"}, "plain http"),
        ({"enclave_size": "12G"}, "power of two"),
        ({"enclave_size": "lots"}, "like 512M"),
        ({"max_threads": 2}, "between 4 and 4096"),
        ({"isvsvn": 70000}, "0..65535"),
        ({"port": 0}, "cannot be published"),
        ({"names": ("one",)}, "one name per model"),
        ({"models": ()}, "at least one sealed model"),
        ({"models": (Path("/tmp/m.sealed"),), "names": ()}, "in-enclave tmpfs"),
    ],
)
def test_invalid_deployments_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _serve(**changes)


def test_toml_encoder() -> None:
    assert toml_value('a"b\\c\n\x7f') == '"a\\"b\\\\c\\u000a\\u007f"'
    assert toml_value(["x", 1, True]) == '["x", 1, true]'
    assert toml_value({"path": "/p", "odd key": 2}) == '{ path = "/p", "odd key" = 2 }'
    assert tomllib.loads("v = " + toml_value("é \t\x00"))["v"] == "é \t\x00"
    with pytest.raises(TypeError):
        toml_value(1.5)


def test_cli_writes_templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI measures the Python that runs it; a fixed one keeps this test independent of
    # where the checkout is (its src/ and tests/ are on the import path, and /tmp is refused).
    monkeypatch.setattr(PythonRuntime, "current", staticmethod(lambda: RUNTIME))
    output = tmp_path / "serve.manifest.template"
    result = CliRunner().invoke(
        deploy,
        [
            "gramine",
            "serve",
            *map(str, MODELS),
            "--keys",
            "https://127.0.0.1:7443",
            "--keyserver-pubkey",
            PIN,
            "--name",
            "a",
            "--name",
            "b",
            "--enclave-size",
            "16G",
            "--grpc-port",
            "8081",
            "-o",
            str(output),
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = tomllib.loads(output.read_text())
    argv = manifest["loader"]["argv"]
    assert argv[argv.index("--grpc-port") + 1] == "8081"  # measured with the rest
    assert manifest["libos"]["entrypoint"] == str(RUNTIME.interpreter)
    assert manifest["sgx"]["enclave_size"] == "16G"
    assert manifest["sgx"]["max_threads"] == 64
    result = CliRunner().invoke(
        deploy,
        [
            "gramine",
            "keycache",
            "--keyserver-pubkey",
            PIN,
            "--",
            "serve",
            "--tee",
            "gramine",
            "--tcp",
            "127.0.0.1:7443",
        ],
    )
    assert result.exit_code == 0, result.output
    keycache = tomllib.loads(result.output)
    assert keycache["sgx"]["enclave_size"] == "2G"
    assert keycache["loader"]["argv"][-7:] == [
        "serve",
        "--tee",
        "gramine",
        "--tcp",
        "127.0.0.1:7443",
        "--keyserver-pubkey",
        PIN,
    ]
    unpinned = CliRunner().invoke(deploy, ["gramine", "serve", str(MODELS[0]), "--keys", "x"])
    assert unpinned.exit_code == 2
    assert "--keyserver-pubkey" in unpinned.output
    help_text = CliRunner().invoke(deploy, ["gramine", "serve", "--help"]).output
    assert "gramine-sgx-sign" in help_text
