"""`sealtorch demo`: the whole system on one machine, with real processes on real sockets.

1. a key server (SQLite, file master key, TLS with its own development CA);
2. a model registered with a release policy pinning the simulated-TEE measurements of the key
   cache and the inference server code;
3. the model sealed through the key server (it wraps the content key; the data key never
   leaves it);
4. a key cache that attests to the key server and holds the leased key;
5. ``sealtorch serve``, which attests to the key cache, decrypts the model in memory and serves
   the KServe v2 API;
6. predictions through the API, checked bit for bit against plain PyTorch, a timing table, what
   the sealed file reveals, and a release the policy refuses;
7. a fake key source (what the cloud host can run on any socket): ``serve`` pointed at it
   refuses its key, since no release statement signed by the pinned key server key comes with it.

The TEE is the simulated one (``sim``): this machine has no SGX/TDX. It exercises the same code
paths as real hardware, under its own explicit opt-in (a policy that names ``sim``).
"""

from __future__ import annotations

import base64
import json
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from rich.console import Console
from rich.table import Table

from sealtorch._demo.processes import ServiceProcess
from sealtorch.errors import Error

if TYPE_CHECKING:
    import torch

__all__ = ["DemoOptions", "run_demo"]

PHOTOS = ("chelsea.png", "coffee.png")
#: The refused enclave: same sealtorch code, but it runs as another role, so its measurement
#: differs (as a modified enclave's would).
REFUSED_ROLE = "app"


@dataclass(frozen=True)
class DemoOptions:
    workspace: Path
    model: str = "efficientnet-lite0"  # or "resnet50" (random weights)
    top: int = 5
    steady_requests: int = 20


@dataclass
class _Model:
    model_id: str
    arch: str
    description: str
    state_dict: dict[str, torch.Tensor]
    labels: list[str]
    preprocess: dict[str, object]

    @property
    def size_mb(self) -> float:
        return sum(t.numel() * t.element_size() for t in self.state_dict.values()) / 1e6


@dataclass
class _Timings:
    rows: list[tuple[str, float]] = field(default_factory=list)

    def add(self, label: str, seconds: float) -> None:
        self.rows.append((label, seconds))


def _load_model(name: str) -> _Model:
    from sealtorch._demo.pretrained import (
        EFFICIENTNET_ARCH,
        IMAGENET_PREPROCESS,
        efficientnet_lite0_state_dict,
        imagenet_labels,
    )

    if name == "efficientnet-lite0":
        return _Model(
            model_id="efficientnet-lite0",
            arch=EFFICIENTNET_ARCH,
            description="pretrained EfficientNet-Lite0 (ImageNet)",
            state_dict=efficientnet_lite0_state_dict(),
            labels=imagenet_labels(),
            preprocess=IMAGENET_PREPROCESS,
        )
    import torch
    import torchvision

    torch.manual_seed(0)
    return _Model(
        model_id="resnet50",
        arch="torchvision:resnet50",
        description="ResNet-50 with random weights (predictions are noise)",
        state_dict=torchvision.models.resnet50(weights=None).state_dict(),
        labels=imagenet_labels(),
        preprocess=IMAGENET_PREPROCESS,
    )


@contextmanager
def _step(console: Console, text: str) -> Iterator[None]:
    start = time.perf_counter()
    with console.status(text + " ..."):
        yield
    console.print(f"[green]✔[/green] {text} [dim]({time.perf_counter() - start:.1f} s)[/dim]")


@contextmanager
def _interrupt_deferred() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) inside the block; raise KeyboardInterrupt after it if one came.

    Only the main thread can set signal handlers; elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, _frame: pending.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    if pending:
        raise KeyboardInterrupt


def run_demo(options: DemoOptions, console: Console) -> None:
    """Run the demo in ``options.workspace`` (which must exist and be empty or new)."""
    with ExitStack() as services:
        _Demo(options, console, services).run()


class _Demo:
    def __init__(self, options: DemoOptions, console: Console, services: ExitStack) -> None:
        self.options = options
        self.console = console
        self.services = services
        self.ws = options.workspace
        self.logs = self.ws / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.sim_key = self.ws / "sim-attestation.key"
        # Every process of the demo uses the workspace's simulated attestation key, never the
        # user's own (~/.local/share/sealtorch/...).
        self.env = {"SEALTORCH_SIM_KEY": str(self.sim_key)}
        self.timings = _Timings()

    def _start(self, name: str, args: list[str]) -> ServiceProcess:
        # A Ctrl-C while the child is being spawned would leave it running unregistered (an
        # orphan that outlives the demo): take it only once the child is registered for stop.
        with _interrupt_deferred():
            process = ServiceProcess(name, args, log_dir=self.logs, env=self.env)
            self.services.callback(process.stop)
        return process

    def run(self) -> None:
        from sealtorch.attestation import measure
        from sealtorch.attestation.sim import SimAttester

        console = self.console
        console.rule("[bold]sealtorch demo[/bold]: a model that can be used but not seen")
        console.print(
            "Everything runs on this machine as separate processes on real sockets, with the "
            "simulated TEE [dim](no SGX/TDX here; same code paths, explicit opt-in)[/dim].\n"
            f"Workspace: {self.ws}\n"
        )
        sim_public = SimAttester(role="serve", key_path=self.sim_key).public_key

        # 1. Key server.
        with _step(console, "key server: SQLite, file master key, TLS with its own CA"):
            keyserver_url, ca, token, pin = self._start_keyserver(sim_public)
        console.print(f"    {keyserver_url}  [dim](logs: {self.logs}/keyserver.log)[/dim]")
        console.print(
            f"    release-signing key (pinned by the key cache and serve): [dim]{pin}[/dim]"
        )

        # 2. The model and its release policy.
        with _step(console, "loading the model to protect"):
            model = _load_model(self.options.model)
        console.print(
            f"    {model.description}: {len(model.state_dict)} tensors, {model.size_mb:.1f} MB"
        )
        allowed = {role: measure(role) for role in ("keycache", "serve")}
        policy = {
            "version": 1,
            "name": f"{model.model_id}-demo",
            "allowed_tees": ["sim"],
            "sim": {"mrenclave": sorted(allowed.values())},
        }
        from sealtorch.client import AdminClient, KeyServerWrapper

        admin = AdminClient(keyserver_url, token=token, ca=ca)
        self.services.callback(admin.close)
        with _step(console, f"model {model.model_id!r} registered with a release policy"):
            admin.create_model(model.model_id)
            admin.set_policy(model.model_id, policy)
        console.print(
            "    policy: TEE sim only, MRENCLAVE must be the key cache's "
            f"({allowed['keycache'][:12]}…) or the inference server's ({allowed['serve'][:12]}…)"
        )

        # 3. Seal through the key server.
        import sealtorch

        sealed_path = self.ws / f"{model.model_id}.sealed"
        with _step(console, "sealed through the key server (it wraps the content key)"):
            start = time.perf_counter()
            sealtorch.encrypt_model(
                model.state_dict,
                sealed_path,
                model_id=model.model_id,
                key=KeyServerWrapper(admin),
                arch=model.arch,
                labels=model.labels,
                preprocess=model.preprocess,
            )
            self.timings.add(
                "seal the model (key wrapped by the key server)", time.perf_counter() - start
            )
        self._show_what_the_file_reveals(sealed_path, model)

        # 4. Key cache.
        socket_path = self.ws / "keycache.sock"
        with _step(console, "key cache: attested to the key server, holds the leased key"):
            start = time.perf_counter()
            cache = self._start(
                "keycache",
                [
                    "keycache",
                    "serve",
                    "--keyserver",
                    keyserver_url,
                    "--ca",
                    str(ca),
                    "--keyserver-pubkey",
                    pin,
                    "--tee",
                    "sim",
                    "--sim-key",
                    str(self.sim_key),
                    "--model",
                    model.model_id,
                    "--socket",
                    str(socket_path),
                    "--trust-sim-key",
                    sim_public,
                    "--allow-simulated-tee-insecure",
                ],
            )
            cache.wait_for(r"^ready: ", timeout=60)
            self.timings.add(
                "key cache start to ready (attest + fetch keys)", time.perf_counter() - start
            )
        console.print(f"    unix://{socket_path}")

        # 5. Inference server, with as many PyTorch threads as the plain reference model here:
        # float results are bit-identical only under the same threads and batch.
        import torch

        with _step(console, "inference server: attested to the key cache, decrypted, warmed up"):
            start = time.perf_counter()
            server = self._start(
                "serve",
                [
                    *self._serve_args(sealed_path, keys=f"unix://{socket_path}", pin=pin),
                    "--threads",
                    str(torch.get_num_threads()),
                ],
            )
            url = server.wait_for(r"^listening on (\S+)", timeout=120).group(1)
            server.wait_for(r"^ready on ", timeout=300)
            started = time.perf_counter() - start
        console.print(f"    {url}/v2/models/{model.model_id}")

        with httpx.Client(base_url=url, timeout=120) as http:
            self._classify(http, model)
            self._timing_table(http, model, started)
        self._refused_release(socket_path, model, pin)
        self._fake_key_source(model, pin)
        console.rule("[bold green]done[/bold green]")

    # -- steps ------------------------------------------------------------------------------

    def _serve_args(self, sealed: Path, *, keys: str, pin: str) -> list[str]:
        """``sealtorch serve`` of ``sealed`` in the simulated TEE, keys from ``keys``."""
        return [
            "serve",
            str(sealed),
            "--keys",
            keys,
            "--keyserver-pubkey",
            pin,
            "--tee",
            "sim",
            "--sim-key",
            str(self.sim_key),
            "--port",
            "0",
        ]

    def _start_keyserver(self, sim_public: str) -> tuple[str, Path, str, str]:
        from sealtorch.keyserver.datadir import init_data_dir

        # The demo uses the simulated TEE on purpose: opt in explicitly (its WARNING lines go
        # to the service's log file).
        result = init_data_dir(self.ws / "keyserver", sim_trusted_keys=[sim_public])
        process = self._start(
            "keyserver",
            [
                "keyserver",
                "serve",
                str(result.data_dir),
                "--port",
                "0",
                "--allow-simulated-tee-insecure",
            ],
        )
        url = process.wait_for(r"^listening on (\S+)", timeout=60).group(1)
        return url, result.ca_path, result.admin_token, result.release_public_key

    def _show_what_the_file_reveals(self, path: Path, model: _Model) -> None:
        import sealtorch

        header = sealtorch.inspect_sealed(path)
        blob = path.read_bytes()
        leaked = [name for name in model.state_dict if name.encode() in blob]
        self.console.print(f"    public header: {header}")
        self.console.print(
            f"    tensor names readable in the sealed file: [bold]{len(leaked)} of "
            f"{len(model.state_dict)}[/bold]"
        )
        if leaked:
            raise Error(f"the sealed file leaks tensor names, e.g. {leaked[0]!r}")

    def _classify(self, http: httpx.Client, model: _Model) -> None:
        import torch

        from sealtorch._demo.pretrained import sample_image
        from sealtorch.payloads.arch import build_module
        from sealtorch.payloads.manifest import ImagePreprocessSpec
        from sealtorch.serving.preprocess import preprocess_image

        plain = build_module(model.arch, {})
        plain.load_state_dict(model.state_dict)
        plain.eval()
        spec = ImagePreprocessSpec.from_json(model.preprocess)
        self.console.print(
            f"\n[bold]Predictions[/bold] through the KServe v2 API "
            f"(POST /v2/models/{model.model_id}/infer), top {self.options.top}; compared with "
            f"plain PyTorch here under the same conditions ({torch.get_num_threads()} threads, "
            "batch 1):"
        )
        for photo in PHOTOS:
            image = sample_image(photo)
            body = {
                "id": photo,
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "data": [base64.b64encode(image).decode("ascii")],
                    }
                ],
                "outputs": [
                    {"name": "output"},
                    {"name": "probabilities", "parameters": {"classification": self.options.top}},
                ],
            }
            answer = _post(http, f"/v2/models/{model.model_id}/infer", body)
            outputs = {o["name"]: o for o in answer["outputs"]}
            served = torch.tensor(outputs["output"]["data"], dtype=torch.float64)
            with torch.inference_mode():
                reference = plain(preprocess_image(image, spec).unsqueeze(0))
            identical = torch.equal(served.to(torch.float32), reference.flatten())
            table = Table(title=f"{photo}", title_justify="left", min_width=40)
            table.add_column("label")
            table.add_column("probability", justify="right")
            for entry in outputs["probabilities"]["data"]:
                value, _index, label = str(entry).split(":", 2)
                table.add_row(label, f"{float(value):.3f}")
            self.console.print(table)
            self.console.print(
                "    logits bit-identical to plain PyTorch on the same weights: "
                + ("[green]yes[/green]" if identical else "[red]NO[/red]")
            )
            if not identical:
                raise Error("the served model's output differs from plain PyTorch")

    def _timing_table(self, http: httpx.Client, model: _Model, started: float) -> None:
        from sealtorch._demo.pretrained import sample_image

        phases = _load_phases(http.get("/metrics").text, model.model_id)
        self.timings.add("inference server start to ready", started)
        self.timings.add(
            "  attestation + key release (serve ⇄ key cache)", phases.get("key_release", 0.0)
        )
        self.timings.add(
            f"  authenticate + decrypt the sealed file ({model.size_mb:.1f} MB)",
            phases.get("decrypt", 0.0),
        )
        self.timings.add(
            f"  build the model ({model.arch}, incl. importing it)", phases.get("build", 0.0)
        )
        self.timings.add("  first inference (warm-up)", phases.get("warmup", 0.0))
        body = {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": [base64.b64encode(sample_image(PHOTOS[0])).decode("ascii")],
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
        }
        latencies = []
        for _ in range(self.options.steady_requests):
            start = time.perf_counter()
            _post(http, f"/v2/models/{model.model_id}/infer", body)
            latencies.append(time.perf_counter() - start)
        latencies.sort()
        self.timings.add(
            f"steady-state request latency, p50 of {len(latencies)} (image in, top-1 out)",
            statistics.median(latencies),
        )
        table = Table(title="Timings", title_justify="left")
        table.add_column("step")
        table.add_column("time", justify="right")
        for label, seconds in self.timings.rows:
            table.add_row(label, f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s")
        self.console.print(table)

    def _refused_release(self, socket_path: Path, model: _Model, pin: str) -> None:
        from sealtorch.attestation.sim import SimAttester
        from sealtorch.client import KeyReleaseClient
        from sealtorch.errors import KeyReleaseError

        intruder = SimAttester(role=REFUSED_ROLE, key_path=self.sim_key)
        self.console.print(
            f"\n[bold]A refused release[/bold]: an enclave running other code "
            f"(MRENCLAVE {intruder.mrenclave[:16]}…) asks the key cache for the key:"
        )
        with KeyReleaseClient(
            f"unix://{socket_path}", attester=intruder, retries=0, trusted_release_keys=[pin]
        ) as client:
            try:
                client.data_key(model.model_id, 1)
            except KeyReleaseError as exc:
                self.console.print(
                    f"    [red]refused[/red]: {', '.join(exc.reasons) or 'no reason given'} "
                    f"[dim]({exc})[/dim]"
                )
                return
        raise Error("the key cache released the key to an enclave the policy does not allow")

    def _fake_key_source(self, model: _Model, pin: str) -> None:
        """The cloud host runs a key source of its own and points ``serve`` at it, with a file
        it sealed itself: without a statement signed by the pinned key, the key is refused."""
        import torch

        import sealtorch
        from sealtorch._demo.fakesource import FakeKeySource
        from sealtorch.keys import generate_key

        self.console.print(
            "\n[bold]A fake key source[/bold]: the cloud host owns every socket and port, so it "
            "answers where serve asks for keys, checks no evidence, and HPKE-seals a key of its "
            "own (of a model file it sealed itself) under an 'anything goes' policy:"
        )
        host_key = generate_key()
        host_file = self.ws / "host-sealed.sealed"
        sealtorch.encrypt_model(
            {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)},
            host_file,
            model_id=model.model_id,
            key=host_key,
            arch="torch.nn:Linear",
            arch_kwargs={"in_features": 4, "out_features": 3},
        )
        with FakeKeySource(self.ws / "fake-keysource.sock", key=host_key.material) as fake:
            serve = self._start(
                "serve-fake",
                self._serve_args(host_file, keys=fake.url, pin=pin),
            )
            status = serve.wait(timeout=300)
        lines = serve.log_lines()
        reasons = next((line for line in lines if line.startswith("reasons: ")), "")
        error = next((line for line in lines if line.startswith("error: ")), "")
        if status == 0 or "statement_missing" not in reasons or not fake.keys_sent:
            raise Error(
                "serve did not refuse the fake key source's key for lack of a release "
                f"statement (exit status {status}); see {serve.log_path}"
            )
        self.console.print(
            f"    serve [red]refused[/red] it and exited ({status}): "
            f"{reasons.removeprefix('reasons: ')} [dim]({error.removeprefix('error: ')})[/dim]"
        )


def _post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post(path, content=json.dumps(body))
    if response.status_code != 200:
        raise Error(f"POST {path} answered {response.status_code}: {response.text[:300]}")
    answer: dict[str, Any] = response.json()
    return answer


def _load_phases(metrics: str, model_id: str) -> dict[str, float]:
    phases: dict[str, float] = {}
    prefix = "sealtorch_model_load_phase_seconds{"
    for line in metrics.splitlines():
        if not line.startswith(prefix):
            continue
        labels, _, value = line[len(prefix) :].partition("} ")
        fields = dict(part.split("=", 1) for part in labels.split(","))
        if fields.get("model", "").strip('"') == model_id:
            phases[fields.get("phase", "").strip('"')] = float(value)
    return phases
