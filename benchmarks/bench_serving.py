"""Inference server: sealed vs plain ResNet-50 in the same server, and process start to ready.

Targets from issue #6, measured against a plain baseline in the same run:

* Throughput, batch 1 and 8: one server process serves the sealed ResNet-50 (decrypted in
  memory) and the same weights loaded from a plain safetensors file; a client alternates
  requests between them (ABBA order, so drift hits both alike). Throughput ratio
  sealed/plain = median over back-to-back pairs of plain latency / sealed latency, target
  >= 0.98. p50/p99 latencies are reported. Requests use the binary tensor data extension (raw
  FP32), so the figures are the model's and the server's, not JSON's.
* The same over gRPC (issue #15): the same server also serves ``inference.GRPCInferenceService``;
  ResNet-50 sealed vs plain, batch 1 and 8, with ``raw_input_contents`` (ABBA pairs again).
* Per-request protocol overhead: a tiny model (``Linear(4, 4)``, batch 1) in the same server,
  REST with the binary extension vs gRPC with raw contents, alternating; the figure is the
  ratio of median latencies gRPC/REST (target <= 1: gRPC no worse than REST).
* Start to ready: ``sealtorch serve sealed.sealed --key-file`` vs the same server loading the
  plain file (the benchmark-only entry below), each from process start to its "ready on" line
  (decryption, model build and warm-up included), best of 4 alternating runs each; target
  sealed <= plain + 1 s.

The plain model can only be served through this module's ``serve`` entry
(``python -m benchmarks.bench_serving serve --plain FILE``): ``sealtorch serve`` accepts
sealed files only, and plain models are marked ``sealed=false`` in the metrics and the log.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

import sealtorch
from benchmarks._harness import Context, Result, percentile, result
from benchmarks._processes import start_process, stop_process
from sealtorch.keys import write_key_file

_REPO = Path(__file__).resolve().parents[1]
_ARCH = "torchvision:resnet50"
_READY = re.compile(r"^ready on (\S+)(?: grpc=(\S+))?")


# -- the benchmark-only server entry (plain models) --------------------------------------------


class PlainSource:
    """A plain (unsealed) safetensors ResNet-50, for comparison only."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def describe(self) -> str:
        return f"PLAIN (unsealed) {self.path}"

    def load(self, *, max_images: int) -> Any:
        import torchvision
        from safetensors.torch import load_file

        from sealtorch.serving.model import ServedModel

        start = time.perf_counter()
        module = torchvision.models.resnet50(weights=None)
        module.load_state_dict(load_file(self.path))
        model = ServedModel.build(module, name=self._name, sealed=False, max_images=max_images)
        model.load_seconds = time.perf_counter() - start
        return model


class TinySource:
    """A plain ``Linear(4, 4)``: per-request protocol overhead, next to nothing to compute."""

    name = "tiny"

    def describe(self) -> str:
        return "PLAIN (unsealed) Linear(4, 4)"

    def load(self, *, max_images: int) -> Any:
        from sealtorch.serving.model import ServedModel

        torch.manual_seed(15)
        return ServedModel.build(
            torch.nn.Linear(4, 4), name="tiny", sealed=False, max_images=max_images
        )


def serve_main(argv: list[str]) -> None:
    """``python -m benchmarks.bench_serving serve [--sealed F --key K] [--plain F] [--tiny]
    [--grpc-port P]``."""
    from sealtorch.serving.server import InferenceServer, SealedModelSource, ServerSettings

    parser = argparse.ArgumentParser(prog="bench_serving serve")
    parser.add_argument("--sealed", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--plain", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--grpc-port", type=int)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    sources: list[Any] = []
    if args.sealed is not None:
        sources.append(SealedModelSource(args.sealed, key=args.key, name="sealed"))
    if args.plain is not None:
        sources.append(PlainSource(args.plain, "plain"))
    if args.tiny:
        sources.append(TinySource())

    def listening(url: str) -> None:
        print(f"listening on {url}", flush=True)

    def ready(server: InferenceServer) -> None:
        grpc = f" grpc={server.grpc_url}" if server.grpc_url else ""
        print(f"ready on {server.url}{grpc}", flush=True)

    InferenceServer(
        ServerSettings(port=args.port, grpc_port=args.grpc_port, max_body_bytes=256 * 1024 * 1024),
        sources,
        on_listening=listening,
        on_ready=ready,
    ).run()


# -- measurements ------------------------------------------------------------------------------


def _start(command: list[str]) -> tuple[subprocess.Popen[str], str, float]:
    """Start a server; return it, its URL and the seconds from start to its ready line."""
    process, url, _, elapsed = _start_both(command)
    return process, url, elapsed


def _start_both(command: list[str]) -> tuple[subprocess.Popen[str], str, str | None, float]:
    """Start a server; return it, its URL, its gRPC address (if any) and its start time."""
    process, match, elapsed = start_process(command, ready=_READY, timeout=600, cwd=_REPO)
    grpc = match.group(2)
    return process, match.group(1), grpc.removeprefix("grpc://") if grpc else None, elapsed


class _GrpcInfer:
    """ModelInfer over one gRPC channel, with raw contents (the server's own message classes:
    tritonclient and kserve cannot be imported beside each other, and need not be here)."""

    def __init__(self, address: str) -> None:
        import grpc  # type: ignore[import-untyped]

        from sealtorch.serving.grpc_proto import SERVICE, message

        self._request = message("ModelInferRequest")
        response = message("ModelInferResponse")
        self._channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", -1)]
        )
        self._call = self._channel.unary_unary(
            f"/{SERVICE}/ModelInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString,
        )

    def request(self, model: str, name: str, x: torch.Tensor) -> Any:
        raw = x.contiguous().view(torch.uint8).numpy().tobytes()
        return self._request(
            model_name=model,
            inputs=[{"name": name, "datatype": "FP32", "shape": list(x.shape)}],
            raw_input_contents=[raw],
        )

    def infer(self, request: Any) -> torch.Tensor:
        response = self._call(request, timeout=600)
        shape = list(response.outputs[0].shape)
        raw = bytearray(response.raw_output_contents[0])
        return torch.frombuffer(raw, dtype=torch.float32).view(shape)

    def close(self) -> None:
        self._channel.close()


def _binary_request(
    x: torch.Tensor, name: str = "input", output: str = "output"
) -> tuple[bytes, dict[str, str]]:
    raw = x.contiguous().view(torch.uint8).numpy().tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": output, "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def _output(response: httpx.Response) -> torch.Tensor:
    if response.status_code != 200:
        raise RuntimeError(f"inference failed: {response.status_code} {response.text[:200]}")
    length = int(response.headers["Inference-Header-Content-Length"])
    shape = json.loads(response.content[:length])["outputs"][0]["shape"]
    return torch.frombuffer(bytearray(response.content[length:]), dtype=torch.float32).view(shape)


def _alternate(client: httpx.Client, batch: int, pairs: int) -> tuple[dict[str, list[float]], bool]:
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
    body, headers = _binary_request(x)
    outputs = {}
    for name in ("sealed", "plain"):  # warm-up, and the bit-identity check
        for _ in range(2):
            outputs[name] = _output(
                client.post(f"/v2/models/{name}/infer", content=body, headers=headers)
            )
    identical = torch.equal(outputs["sealed"], outputs["plain"])
    latencies: dict[str, list[float]] = {"sealed": [], "plain": []}
    for index in range(pairs):
        order = ("sealed", "plain") if index % 2 == 0 else ("plain", "sealed")
        for name in order:
            start = time.perf_counter()
            _output(client.post(f"/v2/models/{name}/infer", content=body, headers=headers))
            latencies[name].append(time.perf_counter() - start)
    return latencies, identical


def _alternate_grpc(
    client: _GrpcInfer, batch: int, pairs: int
) -> tuple[dict[str, list[float]], bool]:
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
    requests = {name: client.request(name, "input", x) for name in ("sealed", "plain")}
    outputs = {}
    for name in ("sealed", "plain"):
        for _ in range(2):
            outputs[name] = client.infer(requests[name])
    identical = torch.equal(outputs["sealed"], outputs["plain"])
    latencies: dict[str, list[float]] = {"sealed": [], "plain": []}
    for index in range(pairs):
        order = ("sealed", "plain") if index % 2 == 0 else ("plain", "sealed")
        for name in order:
            start = time.perf_counter()
            client.infer(requests[name])
            latencies[name].append(time.perf_counter() - start)
    return latencies, identical


def _overhead(http: httpx.Client, grpc: _GrpcInfer, rounds: int) -> dict[str, list[float]]:
    """Tiny-model latency per protocol, REST and gRPC alternating (ABBA)."""
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(15))
    body, headers = _binary_request(x, "input", "output")
    message = grpc.request("tiny", "input", x)

    def rest() -> torch.Tensor:
        return _output(http.post("/v2/models/tiny/infer", content=body, headers=headers))

    def remote() -> torch.Tensor:
        return grpc.infer(message)

    calls: dict[str, Callable[[], torch.Tensor]] = {"rest": rest, "grpc": remote}
    if not torch.equal(calls["rest"](), calls["grpc"]()):
        raise RuntimeError("REST and gRPC answered the tiny model differently")
    for call in (*calls.values(), *calls.values()):  # warm-up
        call()
    latencies: dict[str, list[float]] = {"rest": [], "grpc": []}
    for index in range(rounds):
        order = ("rest", "grpc") if index % 2 == 0 else ("grpc", "rest")
        for name in order:
            start = time.perf_counter()
            calls[name]()
            latencies[name].append(time.perf_counter() - start)
    return latencies


def _throughput_results(
    protocol: str, batch: int, latencies: dict[str, list[float]], identical: bool
) -> list[Result]:
    sealed_ms = [t * 1e3 for t in latencies["sealed"]]
    plain_ms = [t * 1e3 for t in latencies["plain"]]
    # Each pair ran back to back, so it saw the same machine load: the median of the per-pair
    # ratios is robust to load bursts that a ratio of medians is not. (CPU time is no better:
    # PyTorch's OpenMP threads spin while they wait for each other, so a loaded machine
    # inflates CPU time as much as wall-clock time.)
    ratio = statistics.median(p / s for p, s in zip(plain_ms, sealed_ms, strict=True))
    suffix = "" if protocol == "rest" else "-grpc"
    target = f"serving/resnet50{suffix}-b{batch}"
    results = [
        result(
            target,
            f"throughput ratio sealed/plain (same server, {protocol})",
            ratio,
            "x",
            ">= 0.98",
            ratio_of_medians=round(statistics.median(plain_ms) / statistics.median(sealed_ms), 3),
            pairs=len(sealed_ms),
            bit_identical=identical,
            sealed_p50_ms=round(percentile(sealed_ms, 50), 1),
            sealed_p99_ms=round(percentile(sealed_ms, 99), 1),
            plain_p50_ms=round(percentile(plain_ms, 50), 1),
            plain_p99_ms=round(percentile(plain_ms, 99), 1),
            sealed_images_per_s=round(batch * 1e3 / statistics.median(sealed_ms), 1),
            plain_images_per_s=round(batch * 1e3 / statistics.median(plain_ms), 1),
        )
    ]
    for name, samples in (("sealed", sealed_ms), ("plain", plain_ms)):
        for q in (50, 99):
            results.append(result(target, f"{name} p{q} latency", percentile(samples, q), "ms"))
    if not identical:
        results.append(result(target, "sealed == plain outputs", 0, "bool", ">= 1"))
    return results


def run(ctx: Context) -> list[Result]:
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(6)
    state_dict = torchvision.models.resnet50(weights=None).state_dict()
    key_path = ctx.workdir / "resnet50.key"
    key = write_key_file(key_path)
    sealed_path = ctx.workdir / "resnet50.sealed"
    plain_path = ctx.workdir / "resnet50.safetensors"
    sealtorch.encrypt_model(state_dict, sealed_path, model_id="resnet50", key=key, arch=_ARCH)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, plain_path)

    results: list[Result] = []
    bench = [sys.executable, "-m", "benchmarks.bench_serving", "serve"]

    # -- throughput and latency in one server, both protocols; protocol overhead ---------------
    process, url, grpc_address, _ = _start_both(
        [
            *bench,
            "--sealed",
            str(sealed_path),
            "--key",
            str(key_path),
            "--plain",
            str(plain_path),
            "--tiny",
            "--grpc-port",
            "0",
        ]
    )
    assert grpc_address is not None
    grpc = _GrpcInfer(grpc_address)
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            for batch, pairs in ((1, 12 if ctx.quick else 60), (8, 5 if ctx.quick else 20)):
                latencies, identical = _alternate(client, batch, pairs)
                results += _throughput_results("rest", batch, latencies, identical)
                latencies, identical = _alternate_grpc(grpc, batch, pairs)
                results += _throughput_results("grpc", batch, latencies, identical)
            rounds = 200 if ctx.quick else 2000
            overhead = _overhead(client, grpc, rounds)
            rest_us = statistics.median(overhead["rest"]) * 1e6
            grpc_us = statistics.median(overhead["grpc"]) * 1e6
            results.append(
                result(
                    "serving/protocol-overhead",
                    "per-request latency gRPC raw / REST binary (tiny model)",
                    grpc_us / rest_us,
                    "x",
                    "<= 1",
                    rest_p50_us=round(rest_us),
                    grpc_p50_us=round(grpc_us),
                    rest_p99_us=round(percentile(overhead["rest"], 99) * 1e6),
                    grpc_p99_us=round(percentile(overhead["grpc"], 99) * 1e6),
                    rounds=rounds,
                )
            )
    finally:
        grpc.close()
        stop_process(process, timeout=60)

    # -- process start to ready ----------------------------------------------------------------
    sealed_cmd = [
        sys.executable,
        "-m",
        "sealtorch",
        "serve",
        str(sealed_path),
        "--key-file",
        str(key_path),
        "--port",
        "0",
    ]
    plain_cmd = [*bench, "--plain", str(plain_path)]
    times: dict[str, list[float]] = {"sealed": [], "plain": []}
    for index in range(1 if ctx.quick else 4):
        order = (("sealed", sealed_cmd), ("plain", plain_cmd))
        for name, command in order if index % 2 == 0 else order[::-1]:
            process, _, elapsed = _start(command)
            stop_process(process, timeout=60)
            times[name].append(elapsed)
    # Best of the runs (as the harness's best_of): the cost itself, without the machine's load.
    sealed_s, plain_s = min(times["sealed"]), min(times["plain"])
    results.append(
        result(
            "serving/resnet50-start",
            "start to ready: sealed minus plain (best of runs)",
            sealed_s - plain_s,
            "s",
            "<= 1",
            sealed_s=round(sealed_s, 2),
            plain_s=round(plain_s, 2),
            sealed_runs=[round(t, 2) for t in times["sealed"]],
            plain_runs=[round(t, 2) for t in times["plain"]],
        )
    )
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve_main(sys.argv[2:])
    else:
        print(
            "usage: python -m benchmarks.bench_serving serve [--sealed F --key K] [--plain F] "
            "[--tiny] [--grpc-port P]"
        )
        sys.exit(2)
