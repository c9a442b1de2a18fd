"""Running the inference server: bind, load and warm up models, serve, drain on SIGTERM.

Lifecycle of :meth:`InferenceServer.run`:

1. bind the listening socket (port 0 picks a free port; :attr:`InferenceServer.url` has it)
   and start answering ``/v2/health/live`` and ``/metrics`` at once;
2. in a loader thread, for each model in turn: obtain its key, authenticate and decrypt it,
   build it, run the warm-up inference(s) — ``/v2/health/ready`` turns 200 only when every
   model is serving;
3. on SIGTERM/SIGINT (or :meth:`InferenceServer.stop`): stop accepting connections, report
   not-ready, let in-flight requests finish (at most ``drain_timeout`` seconds), shut the
   inference pool down, return. A second signal stops at once.

If a model cannot be loaded (missing or refused key, failed authentication, a model that fails
its warm-up...), the server stops and :meth:`run` raises that error, so ``sealtorch serve``
exits non-zero with its message (and, for refused keys, the reasons).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

import uvicorn

from sealtorch._listen import ReadTimeouts, listen_tcp, socket_url
from sealtorch._uvicorn import http_options, tls_options
from sealtorch.errors import ConfigError
from sealtorch.keys import DataKey, KeyProvider, as_key_provider
from sealtorch.serving.app import AppLimits, create_app
from sealtorch.serving.http_body import DEFAULT_MAX_NEW_TOKENS
from sealtorch.serving.jsondata import DEFAULT_MAX_JSON_ELEMENTS
from sealtorch.serving.metrics import ServingMetrics
from sealtorch.serving.model import DEFAULT_MAX_IMAGES, ServedModel, check_model_name
from sealtorch.serving.state import ServerState

if TYPE_CHECKING:
    import torch
    from fastapi import FastAPI

    from sealtorch.api import KeyLike, ProgressCallback
    from sealtorch.payloads.manifest import TensorSpec
    from sealtorch.serving.grpc_service import GrpcServer

__all__ = ["InferenceServer", "ModelSource", "SealedModelSource", "ServerSettings"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    """How the server listens, computes and protects itself."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: PyTorch intra-op threads (``torch.set_num_threads``); None keeps PyTorch's default.
    threads: int | None = None
    #: Requests computed at the same time (size of the inference thread pool).
    workers: int = 1
    max_body_bytes: int = 64 * 1024 * 1024
    #: Values a JSON request may hold (tensor elements and structure); beyond that 413.
    max_json_elements: int = DEFAULT_MAX_JSON_ELEMENTS
    #: How long a client may take to send a request (headers, body pauses, keep-alive idle).
    read_timeouts: ReadTimeouts = field(default_factory=lambda: ReadTimeouts(keep_alive=5.0))
    #: Requests accepted while all workers are busy; beyond that the server answers 503.
    max_pending: int = 64
    max_images: int = DEFAULT_MAX_IMAGES
    #: Seconds to let in-flight requests finish after SIGTERM.
    drain_timeout: int = 30
    #: Port of the Open Inference Protocol gRPC service (0: any free port; None: no gRPC).
    grpc_port: int | None = None
    #: The most tokens one generate request may ask for (``max_tokens``).
    max_tokens: int = DEFAULT_MAX_NEW_TOKENS
    #: TLS certificate (chain, PEM) and its key: HTTPS and gRPC over TLS (both or neither).
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not in 0..65535")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("--threads must be at least 1")
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.max_body_bytes < 1024:
            raise ConfigError("the maximum body size must be at least 1 KiB")
        if self.max_json_elements < 1:
            raise ConfigError("--max-json-elements must be at least 1")
        if self.max_pending < 1:
            raise ConfigError("max_pending must be at least 1")
        if self.max_images < 1:
            raise ConfigError("max_images must be at least 1")
        if self.max_tokens < 1:
            raise ConfigError("--max-tokens must be at least 1")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ConfigError(f"gRPC port {self.grpc_port} is not in 0..65535")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("give both --tls-cert and --tls-key, or neither")
        if self.drain_timeout < 0:
            raise ConfigError("the drain timeout cannot be negative")


class ModelSource(Protocol):
    """Something the server can load a :class:`ServedModel` from (a sealed file...)."""

    @property
    def name(self) -> str: ...

    def describe(self) -> str:
        """Where the model comes from, for logs and error messages."""
        ...

    def load(self, *, max_images: int) -> ServedModel: ...


class SealedModelSource:
    """A sealed model file and the key provider that opens it.

    The public header is read at once (no key needed), so a missing or foreign file fails
    before the server starts, and the model name defaults to the file's model id.
    ``allowed_archs`` lists the ``package.module:factory`` architectures the file may name
    (``--allow-arch``; torchvision and timm models are always allowed). ``inputs`` /
    ``outputs`` replace the interface declared at sealing (``--inputs/--outputs``).
    ``device`` is where the weights are decrypted to (``--device``; None: host memory);
    ``progress(name)`` makes the decryption progress reporter of the model named ``name``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key: KeyLike,
        name: str | None = None,
        allowed_archs: Iterable[str] = (),
        inputs: Iterable[TensorSpec] | None = None,
        outputs: Iterable[TensorSpec] | None = None,
        device: str | torch.device | None = None,
        progress: Callable[[str], ProgressCallback] | None = None,
    ):
        from sealtorch.api import inspect_sealed
        from sealtorch.payloads.arch import check_allowed_archs

        self.path = Path(path)
        self._key = key
        self._allowed_archs = check_allowed_archs(allowed_archs)
        self._inputs = tuple(inputs) if inputs is not None else None
        self._outputs = tuple(outputs) if outputs is not None else None
        self._device = device
        self._progress = progress
        try:
            info = inspect_sealed(self.path)
        except FileNotFoundError as exc:
            raise ConfigError(f"sealed model {self.path} does not exist") from exc
        except IsADirectoryError as exc:
            raise ConfigError(f"{self.path} is a directory, not a sealed model file") from exc
        except PermissionError as exc:
            raise ConfigError(f"cannot read sealed model {self.path}: permission denied") from exc
        self.model_id = info.model_id
        self.key_version = info.key_version
        self._name = check_model_name(name if name is not None else info.model_id)

    @property
    def name(self) -> str:
        return self._name

    def describe(self) -> str:
        return f"{self.path} (model id {self.model_id}, key version {self.key_version})"

    def load(self, *, max_images: int) -> ServedModel:
        from sealtorch.api import load_sealed_model

        timed = _TimedKeyProvider(as_key_provider(self._key))
        start = time.perf_counter()
        sealed = load_sealed_model(
            self.path,
            key=timed,
            allowed_archs=self._allowed_archs,
            device=self._device,
            progress=None if self._progress is None else self._progress(self._name),
        )
        decrypted = time.perf_counter()
        model = ServedModel.from_sealed(
            sealed,
            name=self._name,
            max_images=max_images,
            inputs=self._inputs,
            outputs=self._outputs,
        )
        model.load_seconds = time.perf_counter() - start
        model.load_phases = {
            "key_release": timed.seconds,
            "decrypt": sealed.timings.get("decrypt", 0.0) - timed.seconds,
            "build": sealed.timings.get("build", 0.0),
            "warmup": model.load_seconds - (decrypted - start),
        }
        _log.info(
            "model %s: key %.3f s, authentication and decryption %.3f s, build %.3f s, "
            "warm-up %.3f s",
            self._name,
            model.load_phases["key_release"],
            model.load_phases["decrypt"],
            model.load_phases["build"],
            model.load_phases["warmup"],
            extra={"model": self._name, "load_seconds": model.load_seconds},
        )
        return model


class _TimedKeyProvider:
    """Counts the time spent obtaining keys (attestation and key release, or a key file)."""

    def __init__(self, inner: KeyProvider) -> None:
        self._inner = inner
        self.seconds = 0.0

    def data_key(self, model_id: str, key_version: int) -> DataKey:
        start = time.perf_counter()
        try:
            return self._inner.data_key(model_id, key_version)
        finally:
            self.seconds += time.perf_counter() - start


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal re-raising: a drained SIGTERM is a clean exit (status 0)."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[int], None]) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {
            sig: signal.signal(sig, self._handle_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle_signal(self, sig: int, frame: FrameType | None) -> None:
        del frame
        if self.should_exit:
            if sig == signal.SIGINT:  # Ctrl-C twice: stop now, abandoning in-flight requests
                self.force_exit = True
            return
        self.should_exit = True
        self._on_signal(sig)


class InferenceServer:
    """The inference server of one process: models from ``sources``, served on one socket.

    ``on_listening(url)`` is called once the socket is bound, ``on_ready(server)`` once every
    model serves. Tests and embedders may run :meth:`run` in a thread and call :meth:`stop`.
    """

    def __init__(
        self,
        settings: ServerSettings,
        sources: Sequence[ModelSource],
        *,
        on_listening: Callable[[str], None] | None = None,
        on_ready: Callable[[InferenceServer], None] | None = None,
    ) -> None:
        if not sources:
            raise ConfigError("give at least one model to serve")
        self.settings = settings
        self._sources = tuple(sources)
        self.metrics = ServingMetrics()
        self.state = ServerState(
            [source.name for source in sources], workers=settings.workers, metrics=self.metrics
        )
        self.app: FastAPI = create_app(
            self.state,
            AppLimits(
                max_body_bytes=settings.max_body_bytes,
                max_pending=settings.max_pending,
                max_json_elements=settings.max_json_elements,
                max_tokens=settings.max_tokens,
            ),
        )
        self.url: str | None = None
        #: ``grpc://HOST:PORT`` once bound, with ``settings.grpc_port``.
        self.grpc_url: str | None = None
        self._grpc: GrpcServer | None = None
        self.listening = threading.Event()
        self.ready = threading.Event()
        self._on_listening = on_listening
        self._on_ready = on_ready
        self._server: _Uvicorn | None = None
        self._stop_requested = False
        self._load_error: BaseException | None = None

    def stop(self) -> None:
        """Drain and stop (thread-safe; what SIGTERM does)."""
        self._stop_requested = True
        self.state.stopping = True
        if self._grpc is not None:
            self._grpc.serving(False)
        if self._server is not None:
            self._server.should_exit = True

    def run(self) -> None:
        """Serve until stopped. Raises the error of a model that could not be loaded."""
        if self.settings.threads is not None:
            import torch

            torch.set_num_threads(self.settings.threads)
        tls: dict[str, Any] = {}
        if self.settings.tls_cert is not None and self.settings.tls_key is not None:
            # Fails here, at start, for an unreadable, mismatched or exposed key.
            tls = tls_options(str(self.settings.tls_cert), str(self.settings.tls_key))
        sock = listen_tcp(self.settings.host, self.settings.port)
        sock.set_inheritable(True)
        self.url = socket_url(sock, scheme="https" if tls else "http")
        if self.settings.grpc_port is not None:
            try:
                self._grpc = self._grpc_server(self.settings.grpc_port)
            except BaseException:
                sock.close()
                raise
            self.grpc_url = self._grpc.address
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=self.settings.drain_timeout,
            **http_options(self.settings.read_timeouts),
            **tls,
        )
        self._server = _Uvicorn(config, self._signalled)
        if self._stop_requested:
            self._server.should_exit = True
        loader = threading.Thread(target=self._load_all, name="sealtorch-loader", daemon=True)
        try:
            _log.info("listening on %s", self.url)
            if self._grpc is not None:
                self._grpc.start()
                _log.info("gRPC listening on %s", self.grpc_url)
            self.listening.set()
            if self._on_listening is not None:
                self._on_listening(self.url)
            loader.start()
            self._server.run(sockets=[sock])
        finally:
            sock.close()
            if self._grpc is not None:
                self._grpc.stop(self.settings.drain_timeout)
            self.state.close()
        if self._load_error is not None:
            raise self._load_error
        _log.info("stopped")

    def _grpc_server(self, port: int) -> GrpcServer:
        from sealtorch.serving.grpc_service import GrpcServer

        return GrpcServer(
            self.state,
            host=self.settings.host,
            port=port,
            max_message_bytes=self.settings.max_body_bytes,
            max_pending=self.settings.max_pending,
            workers=self.settings.workers,
            tls_cert=self.settings.tls_cert,
            tls_key=self.settings.tls_key,
        )

    def _signalled(self, sig: int) -> None:
        self.state.stopping = True
        if self._grpc is not None:
            self._grpc.serving(False)
        _log.warning(
            "received %s: no new connections; draining in-flight requests (at most %.0f s)",
            signal.Signals(sig).name,
            self.settings.drain_timeout,
        )

    def _load_all(self) -> None:
        import torch

        _log.info("PyTorch uses %d threads", torch.get_num_threads())
        for source in self._sources:
            if self._stop_requested or (self._server is not None and self._server.should_exit):
                return
            try:
                model = source.load(max_images=self.settings.max_images)
            except BaseException as exc:  # noqa: BLE001 - forwarded to the main thread by run()
                self._load_error = exc
                _log.error("cannot serve model %s from %s", source.name, source.describe())
                self.stop()
                return
            if not model.sealed:
                _log.warning(
                    "model %s is NOT sealed: its weights were loaded in the clear (benchmark or "
                    "development use only)",
                    model.name,
                )
            self.state.add(model)
        self.ready.set()
        if self._grpc is not None:
            self._grpc.serving(True)
        _log.info(
            "ready: serving %s",
            ", ".join(f"{m.name} (v{m.version})" for m in self.state.models.values()),
        )
        if self._on_ready is not None:
            self._on_ready(self)
