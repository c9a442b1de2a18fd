"""`sealtorch deploy`: enclave deployment material (Gramine-SGX manifest templates)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from sealtorch.deploy.gramine import GramineLayout

_FLOW = """\b
Then, on the build machine (docs/deployment.md):
  gramine-manifest serve.manifest.template serve.manifest
  gramine-sgx-sign --manifest serve.manifest --output serve.manifest.sgx
  gramine-sgx-sigstruct-view serve.sig      # MRENCLAVE for the release policy
  gramine-sgx serve                         # run (on the SGX host)
"""


def _write(text: str, output: Path | None) -> None:
    if output is None:
        click.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    click.echo(f"wrote {output}", err=True)


_common = [
    click.option(
        "--enclave-size", metavar="SIZE", help="sgx.enclave_size, a power of two (e.g. 8G)."
    ),
    click.option("--max-threads", type=int, help="sgx.max_threads (threads inside the enclave)."),
    click.option(
        "--edmm/--no-edmm",
        default=False,
        show_default=True,
        help="SGX2 dynamic memory (faster start).",
    ),
    click.option("--isvprodid", type=int, default=1, show_default=True, help="sgx.isvprodid."),
    click.option(
        "--isvsvn",
        type=int,
        default=1,
        show_default=True,
        help="sgx.isvsvn; raise it with each security fix.",
    ),
    click.option(
        "--gramine-libos",
        metavar="PATH",
        help="libsysdb.so (default: the gramine-manifest placeholder).",
    ),
    click.option(
        "--gramine-runtime-dir",
        metavar="DIR",
        help="Gramine's runtime/glibc directory (default: placeholder).",
    ),
    click.option(
        "--arch-libdir",
        default="/lib/x86_64-linux-gnu",
        show_default=True,
        help="System library directory.",
    ),
    click.option(
        "-o",
        "--output",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Write here instead of stdout.",
    ),
]


def _with_common(function: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(_common):
        function = option(function)
    return function


def _layout(libos: str | None, runtime_dir: str | None, arch_libdir: str) -> GramineLayout:
    from sealtorch.deploy.gramine import GramineLayout

    defaults = GramineLayout()
    return GramineLayout(
        libos=libos or defaults.libos,
        runtime_dir=runtime_dir or defaults.runtime_dir,
        arch_libdir=arch_libdir,
    )


def _sizes(enclave_size: str | None, max_threads: int | None) -> dict[str, Any]:
    """Only the sizes given on the command line (the dataclass defaults are per role)."""
    sizes: dict[str, Any] = {}
    if enclave_size is not None:
        sizes["enclave_size"] = enclave_size
    if max_threads is not None:
        sizes["max_threads"] = max_threads
    return sizes


@click.group()
def deploy() -> None:
    """Deployment material for enclaves (Gramine-SGX manifests; TDX: see docs/deployment.md)."""


@deploy.group()
def gramine() -> None:
    """Gramine-SGX manifest templates, measured with this machine's Python and packages.

    Run with the Python environment the enclave will run (the interpreter, standard library
    and site-packages of this process become trusted files).
    """


@gramine.command(
    "serve",
    epilog="""\b
Example:
  sealtorch deploy gramine serve /srv/models/resnet50.sealed \\
      --keys https://127.0.0.1:7443 --trust /srv/sealtorch/keycache-ca.pem \\
      --keyserver-pubkey "$(cat release-signing.pub)" \\
      --port 8080 --threads 8 -o serve.manifest.template
"""
    + _FLOW,
)
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--keys",
    "keys_url",
    required=True,
    metavar="URL",
    help="Key cache URL (https://127.0.0.1:PORT on the same host).",
)
@click.option(
    "--keyserver-pubkey",
    "keyserver_pubkeys",
    multiple=True,
    required=True,
    metavar="KEY",
    help="The key server's release-signing public key the enclave pins (repeatable: old and "
    "new during a rollover); measured with the manifest.",
)
@click.option("--name", "names", multiple=True, help="Model names, one per model, in order.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the server listens on.")  # noqa: S104
@click.option(
    "--port", default=8080, show_default=True, type=int, help="Port the server listens on."
)
@click.option(
    "--grpc-port",
    type=click.IntRange(1, 65535),
    help="Also serve the Open Inference Protocol over gRPC on this port (measured; off if "
    "not given).",
)
@click.option(
    "--threads",
    default=4,
    show_default=True,
    type=int,
    help="PyTorch threads (OMP_NUM_THREADS too).",
)
@click.option("--workers", default=1, show_default=True, type=int, help="Concurrent requests.")
@click.option(
    "--trust",
    "trusted",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Extra trusted file (e.g. the key cache CA certificate).",
)
@click.option(
    "--arg", "extra_args", multiple=True, help="Extra `sealtorch serve` argument (repeat per word)."
)
@click.option(
    "--allow-arch",
    "allowed_archs",
    multiple=True,
    metavar="MODULE:FACTORY",
    help="A package.module:factory architecture the sealed models may name (repeatable; "
    "`sealtorch serve --allow-arch`, measured). torchvision: and timm: need none.",
)
@_with_common
def serve_manifest(
    models: tuple[Path, ...],
    keys_url: str,
    keyserver_pubkeys: tuple[str, ...],
    names: tuple[str, ...],
    host: str,
    port: int,
    grpc_port: int | None,
    threads: int,
    workers: int,
    trusted: tuple[Path, ...],
    extra_args: tuple[str, ...],
    allowed_archs: tuple[str, ...],
    enclave_size: str | None,
    max_threads: int | None,
    edmm: bool,
    isvprodid: int,
    isvsvn: int,
    gramine_libos: str | None,
    gramine_runtime_dir: str | None,
    arch_libdir: str,
    output: Path | None,
) -> None:
    """Manifest template of a `sealtorch serve` enclave."""
    from sealtorch.deploy.gramine import ServeEnclave, render_serve_manifest

    layout = _layout(gramine_libos, gramine_runtime_dir, arch_libdir)
    config = ServeEnclave(
        models=models,
        keys_url=keys_url,
        keyserver_pubkeys=keyserver_pubkeys,
        names=names,
        host=host,
        port=port,
        grpc_port=grpc_port,
        threads=threads,
        workers=workers,
        trusted=trusted,
        extra_args=extra_args,
        allowed_archs=allowed_archs,
        **_sizes(enclave_size, max_threads),
        edmm=edmm,
        isvprodid=isvprodid,
        isvsvn=isvsvn,
        layout=layout,
    )
    _write(render_serve_manifest(config), output)


@gramine.command(
    "keycache",
    epilog="""\b
Example (everything after -- is the `sealtorch keycache` command line, fixed in the manifest):
  sealtorch deploy gramine keycache --keyserver-host keys.example.com \\
      --trust /srv/sealtorch/keyserver-ca.pem --trust /srv/sealtorch/cache.crt \\
      --trust /srv/sealtorch/cache.key --state-dir /srv/sealtorch/keycache \\
      -o keycache.manifest.template -- \\
      serve --keyserver https://keys.example.com:8443 --ca /srv/sealtorch/keyserver-ca.pem \\
      --keyserver-pubkey sealtorch-release-key-v1:... \\
      --tee gramine --tcp 127.0.0.1:7443 --tls-cert /srv/sealtorch/cache.crt \\
      --tls-key /srv/sealtorch/cache.key --persist /srv/sealtorch/keycache/state.sealed \\
      --pccs-url https://pccs.internal:8081/sgx/certification/v4
"""
    + _FLOW.replace("serve", "keycache"),
)
@click.argument("args", nargs=-1, required=True, metavar="-- KEYCACHE_ARGS...")
@click.option("--keyserver-host", help="The key server's host name (enables DNS if it is a name).")
@click.option(
    "--keyserver-pubkey",
    "keyserver_pubkeys",
    multiple=True,
    metavar="KEY",
    help="The key server's release-signing public key the cache pins (repeatable), added to "
    "its command line (or give --keyserver-pubkey after --, or a --trust'ed --config).",
)
@click.option(
    "--trust",
    "trusted",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Extra trusted file (key server CA, the cache's TLS certificate, a config file...).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the sealed restart state (--persist).",
)
@_with_common
def keycache_manifest(
    args: tuple[str, ...],
    keyserver_host: str | None,
    keyserver_pubkeys: tuple[str, ...],
    trusted: tuple[Path, ...],
    state_dir: Path | None,
    enclave_size: str | None,
    max_threads: int | None,
    edmm: bool,
    isvprodid: int,
    isvsvn: int,
    gramine_libos: str | None,
    gramine_runtime_dir: str | None,
    arch_libdir: str,
    output: Path | None,
) -> None:
    """Manifest template of a `sealtorch keycache` enclave."""
    from sealtorch.deploy.gramine import KeycacheEnclave, render_keycache_manifest

    layout = _layout(gramine_libos, gramine_runtime_dir, arch_libdir)
    config = KeycacheEnclave(
        args=args,
        keyserver_pubkeys=keyserver_pubkeys,
        trusted=trusted,
        state_dir=state_dir,
        keyserver_host=keyserver_host,
        **_sizes(enclave_size, max_threads),
        edmm=edmm,
        isvprodid=isvprodid,
        isvsvn=isvsvn,
        layout=layout,
    )
    _write(render_keycache_manifest(config), output)
