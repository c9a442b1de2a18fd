"""Gramine-SGX manifest templates for the ``serve`` and ``keycache`` enclaves.

:func:`render_serve_manifest` and :func:`render_keycache_manifest` fill the templates in
``sealtorch/deploy/templates`` with this machine's Python runtime (interpreter, standard
library, site-packages: all trusted files) and the deployment's values. The result is a
Gramine manifest *template*: ``gramine-manifest`` resolves its ``{{ gramine.libos }}`` and
``{{ gramine.runtimedir() }}`` placeholders (or pass concrete paths in
:class:`GramineLayout`), and ``gramine-sgx-sign`` measures it.

Every value reaches the TOML through one encoder (:func:`toml_value`), so no value can break
out of its string or add a manifest entry. Things a manifest must never hold are refused:
a ``--key-file`` argument or a key file among the trusted files (secrets would be measured,
readable and shipped with the image), a debug enclave, host environment or command line
passthrough (not even representable here), and an enclave that pins no key server
release-signing key (``--keyserver-pubkey``: measured here, it is what lets the enclave tell the
key server's keys from the host's).
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sealtorch import __version__
from sealtorch.errors import ConfigError
from sealtorch.keys import KEY_FILE_PREFIX
from sealtorch.payloads.arch import check_allowed_archs

__all__ = [
    "GramineLayout",
    "KeycacheEnclave",
    "PythonRuntime",
    "ServeEnclave",
    "render_keycache_manifest",
    "render_serve_manifest",
    "toml_value",
]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SIZE = re.compile(r"([1-9][0-9]*)([KMG])")
_UNITS: Final = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _toml_string(text: str) -> str:
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ConfigError("a manifest value holds an unpaired surrogate character")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def toml_value(value: Any) -> str:
    """A TOML literal for a string, integer, boolean, path, list or (inline) table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str | Path):
        return _toml_string(str(value))
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            name = key if _BARE_KEY.fullmatch(key) else _toml_string(key)
            items.append(f"{name} = {toml_value(item)}")
        return "{ " + ", ".join(items) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _check_size(size: str) -> str:
    match = _SIZE.fullmatch(size)
    if match is None:
        raise ConfigError(f"enclave size {size!r} must look like 512M or 16G")
    total = int(match.group(1)) * _UNITS[match.group(2)]
    if total & (total - 1):
        raise ConfigError(f"enclave size {size} must be a power of two (SGX requires it)")
    return size


def _check_threads(count: int) -> int:
    if not 4 <= count <= 4096:
        raise ConfigError("sgx.max_threads must be between 4 and 4096")
    return count


def _check_u16(value: int, what: str) -> int:
    if not 0 <= value <= 0xFFFF:
        raise ConfigError(f"{what} must be in 0..65535")
    return value


# -- the Python runtime ------------------------------------------------------------------------


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


@dataclass(frozen=True)
class PythonRuntime:
    """The interpreter and library directories the enclave runs and trusts."""

    interpreter: Path
    #: Directories mounted at the same path and trusted recursively (stdlib, site-packages...).
    directories: tuple[Path, ...]
    #: Import path of the enclave's Python (site-packages and source checkouts; not stdlib).
    pythonpath: tuple[Path, ...]
    #: libpython, when the interpreter links it dynamically.
    libpython: Path | None = None

    @classmethod
    def current(cls) -> PythonRuntime:
        """This process's runtime (run it with the Python that will run in the enclave)."""
        paths = sysconfig.get_paths()
        libpython: Path | None = None
        if sysconfig.get_config_var("Py_ENABLE_SHARED"):
            libpython = Path(str(sysconfig.get_config_var("LIBDIR"))) / str(
                sysconfig.get_config_var("LDLIBRARY")
            )
        return cls.from_paths(
            interpreter=Path(sys.executable),
            stdlib=Path(paths["stdlib"]),
            site_packages=(Path(paths["purelib"]), Path(paths["platlib"])),
            import_path=sys.path,
            libpython=libpython,
        )

    @classmethod
    def from_paths(
        cls,
        *,
        interpreter: Path,
        stdlib: Path,
        site_packages: Iterable[Path],
        import_path: Iterable[str] = (),
        libpython: Path | None = None,
    ) -> PythonRuntime:
        """The runtime whose parts are at these paths (:meth:`current` passes this process's).

        Symbolic links are followed (a virtual environment's interpreter is the base one).
        Entries of ``import_path`` outside the standard library and site-packages are trusted
        too, if they are directories (not zip files, not the working directory). ``libpython``
        is left out if it is not a file.
        """
        stdlib = stdlib.resolve()
        site = [path.resolve() for path in site_packages]
        extra = []
        for entry in import_path:
            if not entry or entry.endswith(".zip"):
                continue
            path = Path(entry).resolve()
            if path.is_dir() and not _inside(path, [stdlib, *site]) and path != Path.cwd():
                extra.append(path)
        return cls(
            interpreter=Path(os.path.realpath(interpreter)),
            directories=_unique_roots([stdlib, *site, *extra]),
            pythonpath=tuple(dict.fromkeys([*site, *extra])),
            libpython=(
                libpython.resolve() if libpython is not None and libpython.is_file() else None
            ),
        )


def _unique_roots(paths: Iterable[Path]) -> tuple[Path, ...]:
    """Paths without duplicates or paths nested in another one."""
    ordered = sorted(dict.fromkeys(paths), key=lambda p: len(p.parts))
    roots: list[Path] = []
    for path in ordered:
        if not _inside(path, roots):
            roots.append(path)
    return tuple(roots)


@dataclass(frozen=True)
class GramineLayout:
    """Where Gramine's own files are; the defaults are placeholders for ``gramine-manifest``."""

    libos: str = "{{ gramine.libos }}"
    runtime_dir: str = "{{ gramine.runtimedir() }}"
    arch_libdir: str = "/lib/x86_64-linux-gnu"


# -- common parts ------------------------------------------------------------------------------


def _mounts(paths: Iterable[Path], layout: GramineLayout) -> list[dict[str, str]]:
    """Identity mounts, parents before children (Gramine mounts in order), /tmp a tmpfs."""
    roots = _unique_roots(paths)
    for path in roots:
        if _inside(path, [Path("/tmp")]):  # noqa: S108 - refusing, not using, /tmp
            raise ConfigError(
                f"{path} is under /tmp, which is an in-enclave tmpfs; keep models, "
                "certificates and state elsewhere (e.g. /srv/sealtorch)"
            )
    mounts = [
        {"path": "/lib", "uri": f"file:{layout.runtime_dir}"},
        {"path": layout.arch_libdir, "uri": f"file:{layout.arch_libdir}"},
        {"path": f"/usr{layout.arch_libdir}", "uri": f"file:/usr{layout.arch_libdir}"},
        {"type": "tmpfs", "path": "/tmp"},  # noqa: S108 - in-enclave memory, not the host's
        *({"path": str(path), "uri": f"file:{path}"} for path in roots),
    ]
    return sorted(mounts, key=lambda mount: len(Path(mount["path"]).parts))


def _trusted(entries: Iterable[Path], layout: GramineLayout) -> list[str]:
    trusted = [
        f"file:{layout.libos}",
        f"file:{layout.runtime_dir}/",
        f"file:{layout.arch_libdir}/",
        f"file:/usr{layout.arch_libdir}/",
    ]
    trusted.extend(f"file:{path}/" if path.is_dir() else f"file:{path}" for path in entries)
    return list(dict.fromkeys(trusted))


def _check_tee(args: Sequence[str]) -> None:
    """In a Gramine manifest the TEE can only be gramine (sim evidence is for development)."""
    for index, arg in enumerate(args):
        value = None
        if arg == "--tee" and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith("--tee="):
            value = arg.partition("=")[2]
        if value is not None and value != "gramine":
            raise ConfigError(f"--tee {value} in a Gramine-SGX manifest; it must be gramine")


def _refuse_secrets(args: Sequence[str], files: Iterable[Path]) -> None:
    for arg in args:
        if arg == "--key-file" or arg.startswith("--key-file="):
            raise ConfigError(
                "a manifest must never name a key file: it would ship the model key with the "
                "image, readable by the host. Enclaves get keys by attestation (--keys)."
            )
    for path in files:
        try:
            with open(path, "rb") as handle:
                head = handle.read(len(KEY_FILE_PREFIX))
        except (IsADirectoryError, FileNotFoundError):
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        if head == KEY_FILE_PREFIX.encode():
            raise ConfigError(
                f"{path} is a sealtorch key file; a manifest must never carry key material"
            )


def _option_values(args: Sequence[str], option: str) -> list[str]:
    """The values of ``option`` in a command line (``--opt VALUE`` or ``--opt=VALUE``)."""
    values = []
    for index, arg in enumerate(args):
        if arg == option and index + 1 < len(args):
            values.append(args[index + 1])
        elif arg.startswith(option + "="):
            values.append(arg.partition("=")[2])
    return values


def _pins(keys: Sequence[str], args: Sequence[str]) -> list[str]:
    """The release-signing keys to add to the command line (each checked), refusing an enclave
    that would pin none: without a pin it could not tell the key server's keys from the host's."""
    from sealtorch.protocol import ReleasePublicKey

    present = _option_values(args, "--keyserver-pubkey")
    for key in [*keys, *present]:
        ReleasePublicKey.parse(key)  # ConfigError naming what is wrong
    if not keys and not present:
        raise ConfigError(
            "the enclave must pin the key server's release-signing public key: give "
            "--keyserver-pubkey KEY (`sealtorch keyserver signing-key show DATA_DIR` prints it); "
            "it is measured with the manifest, so the host cannot swap it"
        )
    return [key for key in dict.fromkeys(keys) if key not in present]


def _environment(
    runtime: PythonRuntime, layout: GramineLayout, gramine_extra: Sequence[Path]
) -> dict[str, Any]:
    library_path = ["/lib", layout.arch_libdir, f"/usr{layout.arch_libdir}"]
    if runtime.libpython is not None:
        library_path.append(str(runtime.libpython.parent))
    return {
        "interpreter": runtime.interpreter,
        "libos_uri": f"file:{layout.libos}",
        "ld_library_path": ":".join(dict.fromkeys(library_path)),
        "pythonpath": ":".join(str(p) for p in runtime.pythonpath),
        "sealtorch_version": __version__,
        "mounts": _mounts(
            [
                runtime.interpreter,
                *runtime.directories,
                *([runtime.libpython] if runtime.libpython else []),
                *gramine_extra,
            ],
            layout,
        ),
    }


def _needs_dns(host: str | None) -> bool:
    if host is None:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def _render(template: str, values: Mapping[str, Any]) -> str:
    try:
        import jinja2
    except ImportError as exc:  # pragma: no cover - jinja2 comes with the server extra
        raise ConfigError("rendering manifests needs jinja2: pip install jinja2") from exc
    environment = jinja2.Environment(  # noqa: S701 - TOML, not HTML: values pass toml_value
        loader=jinja2.PackageLoader("sealtorch.deploy", "templates"),
        undefined=jinja2.StrictUndefined,
        finalize=toml_value,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return environment.get_template(template).render(values)


def _python_argv(runtime: PythonRuntime, *args: str) -> list[str]:
    return [str(runtime.interpreter), "-B", "-s", "-m", "sealtorch", "--log-format", "json", *args]


# -- serve -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeEnclave:
    """What a ``sealtorch serve`` enclave runs: fixed at signing, measured into MRENCLAVE."""

    models: tuple[Path, ...]
    #: ``https://127.0.0.1:PORT`` (a key cache on this host) or ``https://HOST:PORT``.
    keys_url: str
    #: The key server's release-signing public keys the enclave pins (at least one).
    keyserver_pubkeys: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    host: str = "0.0.0.0"  # noqa: S104 - the enclave serves other machines
    port: int = 8080
    #: Port of the Open Inference Protocol gRPC service (``serve --grpc-port``); None: REST only.
    grpc_port: int | None = None
    threads: int = 4
    workers: int = 1
    #: Extra trusted files mounted at their own path (e.g. the key cache's CA certificate).
    trusted: tuple[Path, ...] = ()
    #: Extra ``sealtorch serve`` arguments (e.g. the key source's TLS options).
    extra_args: tuple[str, ...] = ()
    #: ``package.module:factory`` architectures the sealed models may name (``--allow-arch``,
    #: measured with the command line); torchvision and timm models are always allowed.
    allowed_archs: tuple[str, ...] = ()
    enclave_size: str = "8G"
    max_threads: int = 64
    edmm: bool = False
    isvprodid: int = 1
    isvsvn: int = 1
    layout: GramineLayout = field(default_factory=GramineLayout)


def _grpc_port(config: ServeEnclave) -> int | None:
    """The gRPC port, from ``grpc_port`` or an extra ``--grpc-port`` argument (not both)."""
    args = list(config.extra_args)
    given = [
        arg.partition("=")[2] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
        for i, arg in enumerate(args)
        if arg == "--grpc-port" or arg.startswith("--grpc-port=")
    ]
    if given and config.grpc_port is not None:
        raise ConfigError("give the gRPC port once (grpc_port or --grpc-port in the extra args)")
    if not given:
        return config.grpc_port
    if len(given) > 1 or not given[0].isdigit():
        raise ConfigError("--grpc-port in the extra args must be given once, as a port number")
    return int(given[0])


def render_serve_manifest(config: ServeEnclave, *, runtime: PythonRuntime | None = None) -> str:
    """The Gramine manifest template of a ``sealtorch serve`` enclave."""
    from sealtorch.serving.keysource import parse_keys_url

    runtime = runtime or PythonRuntime.current()
    if not config.models:
        raise ConfigError("name at least one sealed model to serve")
    endpoint = parse_keys_url(config.keys_url)
    if endpoint.scheme == "unix":
        raise ConfigError(
            "Gramine cannot share a Unix socket between two enclaves; let the key cache "
            "listen on loopback TCP and use --keys https://127.0.0.1:PORT"
        )
    if config.names and len(config.names) != len(config.models):
        raise ConfigError("give one name per model, or none")
    if not 1 <= config.port <= 65535:
        raise ConfigError("the port must be in 1..65535 (port 0 cannot be published)")
    grpc_port = _grpc_port(config)
    if grpc_port is not None and (not 1 <= grpc_port <= 65535 or grpc_port == config.port):
        raise ConfigError(
            "the gRPC port must be in 1..65535 and differ from the HTTP port (port 0 cannot be "
            "published)"
        )
    if config.threads < 1 or config.workers < 1:
        raise ConfigError("threads and workers must be at least 1")
    models = [Path(path).absolute() for path in config.models]
    trusted = [Path(path).absolute() for path in config.trusted]
    _refuse_secrets(config.extra_args, [*models, *trusted])
    if any(arg == "--tee" or arg.startswith("--tee=") for arg in config.extra_args):
        raise ConfigError("the manifest sets --tee gramine itself; drop --tee from the extra args")
    argv = _python_argv(runtime, "serve", *(str(m) for m in models))
    argv += ["--keys", config.keys_url, "--tee", "gramine"]
    for key in _pins(config.keyserver_pubkeys, config.extra_args):
        argv += ["--keyserver-pubkey", key]
    argv += ["--host", config.host, "--port", str(config.port)]
    if config.grpc_port is not None:
        argv += ["--grpc-port", str(config.grpc_port)]
    argv += ["--threads", str(config.threads), "--workers", str(config.workers)]
    for name in config.names:
        argv += ["--name", name]
    check_allowed_archs(config.allowed_archs)
    for ref in dict.fromkeys(config.allowed_archs):
        argv += ["--allow-arch", ref]
    argv += list(config.extra_args)
    model_dirs = _unique_roots(path.parent for path in models)
    values = {
        **_environment(runtime, config.layout, [*model_dirs, *trusted]),
        "argv": argv,
        "port": config.port,
        "grpc_port": grpc_port,
        "omp_threads": str(config.threads),
        "domain_names": _needs_dns(endpoint.host),
        "edmm": config.edmm,
        "enclave_size": _check_size(config.enclave_size),
        "max_threads": _check_threads(config.max_threads),
        "isvprodid": _check_u16(config.isvprodid, "sgx.isvprodid"),
        "isvsvn": _check_u16(config.isvsvn, "sgx.isvsvn"),
        "trusted_files": _trusted(
            [
                runtime.interpreter,
                *runtime.directories,
                *([runtime.libpython] if runtime.libpython else []),
                *trusted,
            ],
            config.layout,
        ),
        "allowed_files": [f"file:{path}" for path in models],
    }
    return _render("serve.manifest.toml.j2", values)


# -- keycache ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeycacheEnclave:
    """What a ``sealtorch keycache`` enclave runs: fixed at signing, measured into MRENCLAVE."""

    #: The ``sealtorch keycache`` arguments, e.g. ``("serve", "--keyserver", URL, ...)``.
    args: tuple[str, ...]
    #: The key server's release-signing public keys the cache pins, appended to ``args`` as
    #: ``--keyserver-pubkey`` (or give them in ``args``, or in a trusted ``--config`` file).
    keyserver_pubkeys: tuple[str, ...] = ()
    #: Trusted files mounted at their own path (the key server's CA certificate...).
    trusted: tuple[Path, ...] = ()
    #: Directory of the sealed restart state (an allowed file, sealed by the cache).
    state_dir: Path | None = None
    #: Host name of the key server, to decide whether DNS resolution is needed.
    keyserver_host: str | None = None
    enclave_size: str = "2G"
    max_threads: int = 32
    edmm: bool = False
    isvprodid: int = 1
    isvsvn: int = 1
    layout: GramineLayout = field(default_factory=GramineLayout)


def render_keycache_manifest(
    config: KeycacheEnclave, *, runtime: PythonRuntime | None = None
) -> str:
    """The Gramine manifest template of a ``sealtorch keycache`` enclave."""
    runtime = runtime or PythonRuntime.current()
    if not config.args:
        raise ConfigError("give the keycache command line (e.g. serve --keyserver URL ...)")
    trusted = [Path(path).absolute() for path in config.trusted]
    _refuse_secrets(config.args, trusted)
    _check_tee(config.args)
    extra_mounts: list[Path] = list(trusted)
    allowed: list[str] = []
    if config.state_dir is not None:
        state_dir = Path(config.state_dir).absolute()
        extra_mounts.append(state_dir)
        allowed.append(f"file:{state_dir}/")
    args = list(config.args)
    config_files = [Path(path).absolute() for path in _option_values(config.args, "--config")]
    if config.keyserver_pubkeys or _option_values(config.args, "--keyserver-pubkey"):
        for key in _pins(config.keyserver_pubkeys, config.args):
            args += ["--keyserver-pubkey", key]
    elif not config_files or any(path not in trusted for path in config_files):
        # Pins in a config file count only if that file is measured (a trusted file).
        raise ConfigError(
            "the key cache must pin the key server's release-signing public key in measured "
            "configuration: give --keyserver-pubkey KEY, or a --config file listed with --trust "
            "that sets [keyserver] pubkeys (`sealtorch keyserver signing-key show DATA_DIR` "
            "prints the key)"
        )
    values = {
        **_environment(runtime, config.layout, extra_mounts),
        "argv": _python_argv(runtime, "keycache", *args),
        "domain_names": _needs_dns(config.keyserver_host),
        "edmm": config.edmm,
        "enclave_size": _check_size(config.enclave_size),
        "max_threads": _check_threads(config.max_threads),
        "isvprodid": _check_u16(config.isvprodid, "sgx.isvprodid"),
        "isvsvn": _check_u16(config.isvsvn, "sgx.isvsvn"),
        "trusted_files": _trusted(
            [
                runtime.interpreter,
                *runtime.directories,
                *([runtime.libpython] if runtime.libpython else []),
                *trusted,
            ],
            config.layout,
        ),
        "allowed_files": allowed,
    }
    return _render("keycache.manifest.toml.j2", values)
