"""`sealtorch serve`: decrypt sealed models in memory and serve the Open Inference Protocol."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from sealtorch._listen import ReadTimeouts
from sealtorch.cli._options import sim_key_option, tee_option, tee_root_option
from sealtorch.cli.owner import _parse_json, _parse_size
from sealtorch.errors import ConfigError
from sealtorch.serving.jsondata import DEFAULT_MAX_JSON_ELEMENTS

_SECONDS = click.FloatRange(min=0, min_open=True, max=3600)


def _interfaces(values: tuple[str, ...], option: str, count: int) -> list[Any]:
    """``--inputs`` / ``--outputs``: one JSON list of tensor specs (or null: as sealed) per
    model, inline or @FILE."""
    from sealtorch.payloads.manifest import parse_tensor_specs

    if not values:
        return [None] * count
    if len(values) != count:
        raise click.UsageError(
            f"{option} was given {len(values)} times for {count} models; give one per model "
            "(in the same order; null keeps what was declared at sealing) or none"
        )
    result: list[Any] = []
    for value in values:
        document = _parse_json(value, option)
        if document is None:
            result.append(None)
            continue
        if not isinstance(document, list) or not document:
            raise click.BadParameter(
                "must be a non-empty JSON list of tensor specs", param_hint=option
            )
        try:
            result.append(parse_tensor_specs(document, option))
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from exc
    return result


_EPILOG = """\b
Examples:
  # development: the key comes from a file, nothing is attested (a loud warning says so)
  sealtorch serve resnet50.sealed --key-file resnet50.key --port 8080
\b
  # production, inside the enclave: keys from the local key cache, released by attestation
  sealtorch serve /models/resnet50.sealed /models/lite0.sealed \\
      --keys https://127.0.0.1:7443 --keyserver-pubkey sealtorch-release-key-v1:... \\
      --tee gramine --host 0.0.0.0 --port 8080
  sealtorch serve model.sealed --keys unix:///run/sealtorch/keycache.sock --tee tdx \\
      --keyserver-pubkey sealtorch-release-key-v1:...
\b
  # several models, renamed; a random free port (the first stdout line tells which)
  sealtorch serve a.sealed b.sealed --name classifier --name detector --port 0 --key-file k
\b
Then (Open Inference Protocol / KServe v2, REST):
  curl localhost:8080/v2/health/ready
  curl localhost:8080/v2/models/resnet50
  curl -d @request.json localhost:8080/v2/models/resnet50/infer
  curl localhost:8080/metrics
\b
Image models sealed with --preprocess also take encoded images (base64 in a BYTES input
named "image") and answer top-k labels with the classification parameter:
  {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["<base64>"]}],
   "outputs": [{"name": "probabilities", "parameters": {"classification": 5}}]}
\b
Hugging Face models (sealed save_pretrained directories) also take text, tokenized inside
the server with the sealed tokenizer, and causal LMs generate (the generate extension):
  curl -d '{"text_input": "Hello", "parameters": {"max_tokens": 16}}' \\
      localhost:8080/v2/models/gpt2/generate
  curl -N -d '{"text_input": "Hello"}' localhost:8080/v2/models/gpt2/generate_stream
\b
  # gRPC too (tritonclient.grpc, kserve.InferenceGRPCClient, grpcurl with reflection)
  sealtorch serve resnet50.sealed --key-file resnet50.key --port 8080 --grpc-port 8081
\b
Stdout carries machine-readable lines: "listening on http://HOST:PORT" once the socket
is bound (then "grpc listening on grpc://HOST:PORT" with --grpc-port), and
"ready on http://HOST:PORT" once every model is decrypted and warmed up.
SIGTERM or Ctrl-C: stop accepting, finish in-flight requests, exit 0.
Details: docs/serving.md; enclave deployment: docs/deployment.md.
"""


@click.command(epilog=_EPILOG)
@click.argument(
    "models",
    nargs=-1,
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="MODEL.sealed...",
)
@click.option(
    "--keys",
    "keys_url",
    metavar="URL",
    multiple=True,
    callback=lambda _ctx, _param, value: ",".join(value) or None,
    help="Key cache or key server releasing the model keys to this attested server: "
    "unix:///PATH (local key cache) or https://HOST:PORT. Repeat it (or give a comma list) "
    "for replicas: a connection failure or a 503 moves to the next.",
)
@click.option(
    "--keys-wait",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    envvar="SEALTORCH_SERVE_KEYS_WAIT",
    metavar="SECONDS",
    help="With --keys: how long to wait at start for a key source that is not up yet "
    "(retries with jittered backoff, each logged; env SEALTORCH_SERVE_KEYS_WAIT).",
)
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="DEVELOPMENT ONLY: read the data key from this file (`sealtorch keygen`); no "
    "attestation takes place.",
)
@click.option(
    "--keyserver-pubkey",
    "keyserver_pubkeys",
    multiple=True,
    metavar="KEY",
    help="With --keys (required): the key server's release-signing public key "
    "(sealtorch-release-key-v1:...; repeatable: old and new during a rollover). A key "
    "without a statement signed by it is refused, whoever sends it.",
)
@tee_option("The TEE this server runs in, whose evidence is sent with --keys.")
@click.option(
    "--keys-ca",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="CA certificate to trust for an https:// --keys URL (e.g. the key server's "
    "generated ca.pem); default: the system trust store.",
)
@sim_key_option()
@tee_root_option()
@click.option(
    "--hpke-suite",
    type=click.Choice(
        [
            "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM",
            "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM",
        ]
    ),
    help="HPKE suite the key is sealed with (default X25519; MLKEM768-X25519 is the "
    "post-quantum hybrid).",
)
@click.option(
    "--name",
    "names",
    multiple=True,
    metavar="NAME",
    help="Serve the models under these names, in order (default: each file's model id). "
    "Repeat once per model.",
)
@click.option(
    "--allow-arch",
    "allow_archs",
    multiple=True,
    metavar="MODULE:FACTORY",
    help="Also build sealed state dicts whose architecture is this package.module:factory "
    "(repeatable). torchvision: and timm: models are always allowed; no other code a sealed "
    "file names is imported. In an enclave this is part of the measured command line.",
)
@click.option(
    "--inputs",
    "inputs_json",
    multiple=True,
    metavar="JSON",
    help="Serve the model with these inputs instead of those declared at sealing: a JSON list "
    'of {"name", "datatype", "shape"} (or @FILE; null: as sealed). Repeat once per model. A '
    "transformers model takes input_ids, attention_mask, token_type_ids and one BYTES text "
    "input (which names it).",
)
@click.option(
    "--outputs",
    "outputs_json",
    multiple=True,
    metavar="JSON",
    help="Like --inputs, for the outputs (checked against the warm-up inference).",
)
@click.option(
    "--max-tokens",
    default=512,
    show_default=True,
    type=click.IntRange(min=1),
    metavar="N",
    help="Most tokens one generate request may ask for (its max_tokens); a model's positions "
    "bound it too.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port; 0 picks a free one.",
)
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    help="Also serve the Open Inference Protocol over gRPC (inference.GRPCInferenceService, "
    "with health and reflection) on this TCP port of --host; 0 picks a free one. Off unless "
    "given. Messages are limited by --max-body-size.",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Serve HTTPS (and gRPC over TLS) with this certificate chain (PEM); with --tls-key.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Private key of --tls-cert (PEM; refused if other users can read it).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="PyTorch threads per inference (default: PyTorch's choice, one per core).",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests computed at the same time (more helps small models on many cores).",
)
@click.option(
    "--max-body-size",
    default="64MiB",
    show_default=True,
    metavar="SIZE",
    help="Largest request body accepted; larger ones get 413.",
)
@click.option(
    "--max-json-elements",
    default=DEFAULT_MAX_JSON_ELEMENTS,
    show_default=True,
    type=click.IntRange(min=1),
    metavar="N",
    help="Most values a JSON request may hold (its tensor elements); more get 413. Send large "
    "tensors with the binary tensor data extension.",
)
@click.option(
    "--header-timeout",
    default=10.0,
    show_default=True,
    type=_SECONDS,
    metavar="SECONDS",
    help="Time a client has to send a request's headers, from connecting or from the "
    "request's first byte; then the connection is closed.",
)
@click.option(
    "--body-timeout",
    default=30.0,
    show_default=True,
    type=_SECONDS,
    metavar="SECONDS",
    help="Longest pause while a request body arrives.",
)
@click.option(
    "--keep-alive-timeout",
    default=5.0,
    show_default=True,
    type=_SECONDS,
    metavar="SECONDS",
    help="An idle connection is closed after this.",
)
@click.option(
    "--max-pending",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests queued behind the workers before the server answers 503.",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    metavar="cpu|cuda|cuda:N",
    help="Where the models' weights are decrypted to. cuda: a state dict straight onto the "
    "GPU, chunk by chunk through a small pinned staging buffer (host memory stays at a few "
    "chunks). Refused where no CUDA device is available.",
)
@click.option(
    "--drain-timeout",
    default=30,
    show_default=True,
    type=click.IntRange(min=0),
    help="Seconds in-flight requests may take to finish after SIGTERM.",
)
def serve(
    models: tuple[Path, ...],
    keys_url: str | None,
    keys_wait: float,
    key_file: Path | None,
    keyserver_pubkeys: tuple[str, ...],
    tee: str | None,
    keys_ca: Path | None,
    sim_key: Path | None,
    tee_root: Path | None,
    hpke_suite: str | None,
    names: tuple[str, ...],
    allow_archs: tuple[str, ...],
    inputs_json: tuple[str, ...],
    outputs_json: tuple[str, ...],
    max_tokens: int,
    host: str,
    port: int,
    grpc_port: int | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    threads: int | None,
    workers: int,
    max_body_size: str,
    max_json_elements: int,
    header_timeout: float,
    body_timeout: float,
    keep_alive_timeout: float,
    max_pending: int,
    device: str,
    drain_timeout: int,
) -> None:
    """Serve sealed models over the Open Inference Protocol (KServe v2 REST).

    Each model's key is obtained (by attestation with --keys, or from a development
    --key-file), the model is authenticated, decrypted in memory, built and warmed up; the
    server reports ready only when every model is. A model that cannot be loaded — a refused
    key (the reasons are printed), a file that fails authentication — stops the server with a
    non-zero exit status.
    """
    from sealtorch.keys import KeyProvider
    from sealtorch.serving.keysource import dev_key_file, resolve_key_source
    from sealtorch.serving.server import InferenceServer, SealedModelSource, ServerSettings

    if (keys_url is None) == (key_file is None):
        raise click.UsageError("give exactly one key source: --keys URL or --key-file FILE")
    from sealtorch.cli._progress import model_progress
    from sealtorch.payloads.device import resolve_device

    target = resolve_device(device)  # refused here, before any key is asked for
    progress = model_progress(click.get_current_context())
    if names and len(names) != len(models):
        raise click.UsageError(
            f"--name was given {len(names)} times for {len(models)} models; give one per model "
            "(in the same order) or none"
        )
    inputs = _interfaces(inputs_json, "--inputs", len(models))
    outputs = _interfaces(outputs_json, "--outputs", len(models))
    settings = ServerSettings(
        max_tokens=max_tokens,
        host=host,
        port=port,
        grpc_port=grpc_port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        threads=threads,
        workers=workers,
        max_body_bytes=_parse_size(max_body_size),
        max_json_elements=max_json_elements,
        read_timeouts=ReadTimeouts(
            header=header_timeout, body=body_timeout, keep_alive=keep_alive_timeout
        ),
        max_pending=max_pending,
        drain_timeout=drain_timeout,
    )
    provider: KeyProvider
    if key_file is not None:
        if tee is not None or keys_ca or sim_key or tee_root or hpke_suite or keyserver_pubkeys:
            raise click.UsageError(
                "--tee, --keys-ca, --sim-key, --tee-root, --hpke-suite and --keyserver-pubkey "
                "apply to --keys; a --key-file involves no TEE"
            )
        provider = dev_key_file(key_file)  # logs the development warning (once)
    else:
        assert keys_url is not None  # noqa: S101 - checked above
        provider = resolve_key_source(
            keys_url,
            tee=tee,
            ca=keys_ca,
            tee_root=tee_root,
            sim_key=sim_key,
            hpke_suite=hpke_suite,
            keyserver_pubkeys=keyserver_pubkeys,
            wait=keys_wait,
        )
    sources = [
        SealedModelSource(
            path,
            key=provider,
            name=names[index] if names else None,
            allowed_archs=allow_archs,
            inputs=inputs[index],
            outputs=outputs[index],
            device=target,
            progress=progress,
        )
        for index, path in enumerate(models)
    ]
    if len({s.name for s in sources}) != len(sources):
        raise ConfigError(
            "two models would be served under the same name; give distinct --name values"
        )

    def listening(url: str) -> None:
        click.echo(f"listening on {url}")
        if server.grpc_url is not None:
            click.echo(f"grpc listening on {server.grpc_url}")
        sys.stdout.flush()

    def ready(server: InferenceServer) -> None:
        # Every model is decrypted: the keys are not needed any more, so forget them.
        close = getattr(provider, "close", None)
        if close is not None:
            close()
        click.echo(f"ready on {server.url} ({', '.join(server.state.names)})")
        sys.stdout.flush()

    server = InferenceServer(settings, sources, on_listening=listening, on_ready=ready)
    server.run()
