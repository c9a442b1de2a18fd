"""A real key server for tests: ``create_app`` under uvicorn in a background thread.

It listens on a random loopback port with TLS (a development CA made per test) or on a Unix
socket, and runs the real app, store, master key, release-signing key and verifiers. Its
:meth:`KeyServerUnderTest.client` pins that release-signing key (as every enclave must).
Subprocess tests use the real ``sealtorch keyserver serve`` instead (see :func:`start_serve`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from sealtorch._crypto.tls import (
    client_ssl_context,
    create_dev_ca,
    create_server_certificate,
    server_ssl_context,
)
from sealtorch.keyserver.signingkey import FileReleaseSigningKey, ReleaseSigningKey
from sealtorch.keyserver.store import Store
from sealtorch.keyserver.tokens import TokenKind, issue_token
from sealtorch.protocol.admin import ADMIN_SCOPES, AdminScope
from sealtorch.protocol.audit import AuditEntry, AuditKind

START_TIMEOUT = 30.0


def new_signing_key() -> FileReleaseSigningKey:
    """A fresh in-memory release-signing key (a file key's class, no file)."""
    from sealtorch._crypto.sign import Ed25519Signer

    _, seed = Ed25519Signer.generate()
    return FileReleaseSigningKey(seed)


def release_key_of(data_dir: Path) -> str:
    """The release-signing public key ``keyserver init`` wrote to a data directory."""
    return (data_dir / "release-signing.pub").read_text().strip()


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path) -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca = create_dev_ca(cert_path=directory / "ca.crt", key_path=directory / "ca.key")
    server = create_server_certificate(
        ca=ca, cert_path=directory / "server.crt", key_path=directory / "server.key"
    )
    return TlsFiles(ca=ca.cert, cert=server.cert, key=server.key)


def _ssl_factory(tls: TlsFiles, config: Any, default: Any) -> Any:
    del config, default
    return server_ssl_context(cert_path=tls.cert, key_path=tls.key)


class ServerThread:
    """uvicorn serving ``app`` in a thread until the context exits (graceful shutdown)."""

    def __init__(self, app: Any, *, tls: TlsFiles | None = None, uds: Path | None = None) -> None:
        options: dict[str, Any] = {
            "log_config": None,
            "access_log": False,
            "lifespan": "on",
            "timeout_graceful_shutdown": 5,
        }
        if tls is not None:
            options["ssl_context_factory"] = functools.partial(_ssl_factory, tls)
        self.uds = uds
        if uds is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(str(uds))
            self.url = f"unix://{uds}"
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("127.0.0.1", 0))
            port = self.sock.getsockname()[1]
            self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.sock.listen(512)
        self.server = uvicorn.Server(uvicorn.Config(app, **options))
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test key server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def create_admin_token(
    store: Store, name: str = "test admin", scopes: Iterable[AdminScope] = ADMIN_SCOPES
) -> str:
    """A usable admin token stored (hashed) the way ``keyserver init`` does (every scope)."""
    issued = issue_token(TokenKind.ADMIN)
    with store.transaction() as tx:
        tx.create_admin_token(
            token_id=issued.token_id, digest=issued.digest, name=name, scopes=scopes
        )
        tx.append_audit(
            AuditEntry(
                kind=AuditKind.ADMIN,
                action="token.create",
                decision="ok",
                details={"token_id": issued.token_id},
            )
        )
    return issued.token


@dataclass
class ServeProcess:
    """A running ``sealtorch keyserver serve`` subprocess."""

    process: subprocess.Popen[str]
    url: str
    stderr_path: Path
    lines: list[str] = field(default_factory=list)
    data_dir: Path | None = None

    @property
    def release_key(self) -> str:
        """The release-signing public key its data directory holds (clients pin it)."""
        assert self.data_dir is not None
        return release_key_of(self.data_dir)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the server and wait; returns its exit status. After a graceful SIGTERM
        shutdown uvicorn re-raises the signal, so the status is -SIGTERM (like systemd expects)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()

    def logs(self) -> str:
        return self.stderr_path.read_text(errors="replace")


_LISTENING = re.compile(r"^listening on (\S+)$")


def sealtorch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sealtorch", *args]


def start_serve(
    data_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    log_dir: Path,
    global_args: tuple[str, ...] = ("--log-format", "json", "-vv"),
) -> ServeProcess:
    """Start ``sealtorch keyserver serve DATA_DIR --port 0 ...`` and wait for its URL line."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = log_dir / f"serve-{time.monotonic_ns()}.log"
    stderr = open(stderr_path, "w")  # noqa: SIM115 - owned by the process
    process = subprocess.Popen(
        sealtorch_command(*global_args, "keyserver", "serve", str(data_dir), "--port", "0", *args),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**os.environ, **(env or {})},
    )
    stderr.close()
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = _LISTENING.match(line.strip())
        if match:
            served = ServeProcess(process, match.group(1), stderr_path, lines, data_dir)
            _wait_ready(served, data_dir / "tls" / "ca.crt")
            return served
    process.kill()
    process.wait()
    raise RuntimeError(
        f"keyserver serve did not start:\n{''.join(lines)}\n{stderr_path.read_text()}"
    )


def _wait_ready(served: ServeProcess, ca: Path) -> None:
    deadline = time.monotonic() + 30
    verify = client_ssl_context(ca_path=ca)
    unix = served.url.startswith("unix://")
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            raise RuntimeError(f"keyserver serve exited:\n{served.logs()}")
        try:
            if unix:  # --unix-socket: plain HTTP on the socket
                transport = httpx.HTTPTransport(uds=served.url[len("unix://") :])
                with httpx.Client(transport=transport, timeout=2) as client:
                    client.get("http://keyserver/readyz").raise_for_status()
            else:
                httpx.get(f"{served.url}/readyz", verify=verify, timeout=2).raise_for_status()
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("keyserver serve never answered /readyz")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


@dataclass
class KeyServerUnderTest:
    """A running in-process key server and everything a test needs to talk to it."""

    url: str
    ca: Path | None
    admin_token: str
    store: Store
    master: Any
    attester: Any
    clock: Any
    app: Any
    tmp: Path
    signing_key: ReleaseSigningKey

    @property
    def release_key(self) -> str:
        """The release-signing public key that clients pin."""
        return self.signing_key.public_key.text

    def admin(self) -> Any:
        from sealtorch.client import AdminClient

        return AdminClient(self.url, token=self.admin_token, ca=self.ca)

    def client(self, attester: Any = None, **options: Any) -> Any:
        """A release client pinning this server's release-signing key."""
        from sealtorch.client import KeyReleaseClient

        options.setdefault("trusted_release_keys", [self.release_key])
        return KeyReleaseClient(self.url, attester=attester or self.attester, ca=self.ca, **options)

    def http(self) -> httpx.Client:
        """A raw HTTP client (for requests the library client would never send)."""
        if self.url.startswith("unix://"):
            return httpx.Client(
                base_url="http://sealtorch.local",
                transport=httpx.HTTPTransport(uds=self.url[len("unix://") :]),
            )
        verify: Any = client_ssl_context(ca_path=self.ca) if self.ca else True
        return httpx.Client(base_url=self.url, verify=verify)

    def sim_policy(self, **extra: Any) -> dict[str, Any]:
        policy: dict[str, Any] = {
            "version": 1,
            "name": "test",
            "allowed_tees": ["sim"],
            "sim": {"mrenclave": [self.attester.mrenclave]},
        }
        policy.update(extra)
        return policy

    def add_model(
        self, model_id: str, *, key: Any = None, policy: dict[str, Any] | None = None
    ) -> None:
        with self.admin() as admin:
            admin.create_model(model_id, key=key)
            admin.set_policy(model_id, policy if policy is not None else self.sim_policy())


@contextlib.contextmanager
def running_keyserver(
    tmp: Path,
    *,
    store: Store,
    master: Any,
    attester: Any,
    clock: Any = None,
    tls: TlsFiles | None = None,
    uds: Path | None = None,
    signing_key: ReleaseSigningKey | None = None,
    **settings_changes: Any,
) -> Iterator[KeyServerUnderTest]:
    """Build the app around ``store`` and serve it (TLS on loopback, or a Unix socket), with
    ``signing_key`` (default: a new one) signing the release statements."""
    from sealtorch.attestation import make_verifiers
    from sealtorch.keyserver.app import create_app
    from sealtorch.keyserver.masterkey import FileMasterKeyConfig
    from sealtorch.keyserver.settings import KeyServerSettings

    settings = KeyServerSettings(
        database_url="sqlite:///unused", master_key=FileMasterKeyConfig(path=tmp / "unused")
    ).with_overrides(**settings_changes)
    verifiers = make_verifiers(sim_trusted_keys=[attester.public_key])
    signer = signing_key if signing_key is not None else new_signing_key()
    app = create_app(
        settings,
        store=store,
        master_key=master,
        signing_key=signer,
        verifiers=verifiers,
        clock=clock,
    )
    token = create_admin_token(store)
    with ServerThread(app, tls=tls, uds=uds) as server:
        yield KeyServerUnderTest(
            url=server.url,
            ca=tls.ca if tls else None,
            admin_token=token,
            store=store,
            master=master,
            attester=attester,
            clock=clock,
            app=app,
            tmp=tmp,
            signing_key=signer,
        )


def init_dir(tmp: Path, attester: Any, *extra: str) -> tuple[Path, Path]:
    data = tmp / "ks"
    token_file = tmp / "admin.token"
    result = subprocess.run(
        sealtorch_command(
            "keyserver",
            "init",
            str(data),
            "--trust-sim-key",
            attester.public_key,
            "--admin-token-file",
            str(token_file),
            *extra,
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "sta_" not in result.stdout  # written to the file, not printed
    return data, token_file
