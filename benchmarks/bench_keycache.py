"""Key cache: local attested release over the Unix socket, and cold start.

**Release.** Each release is the whole protocol, as an inference enclave runs it against the
cache: ``POST /v1/attestation/challenge``, a fresh HPKE key pair, sim evidence binding nonce and
key (Ed25519-signed), ``POST /v1/keys/release``, and the client's HPKE open of the returned key
with its info binding. 16 concurrent clients (asyncio tasks, one keep-alive connection each) run
in a separate load-generator process against the real ``sealtorch keycache serve`` process, first
as fast as they can (throughput), then paced at the target rate (latency at that load). On 2
cores the load generator competes with the cache, so the cache's own CPU time per release is
measured too (``psutil``), which gives the rate one core can sustain. Targets (issue 5):
>= 1,000 releases/s, p99 <= 10 ms, zero errors.

Baseline in the same run: the bare server-side work of one release in a loop (parse the
request, verify the sim evidence, evaluate the policy, HPKE-seal, build the response) — the
floor the cache's per-release CPU is compared with.

On a shared machine each mode runs twice and the better run is reported (every run is in the
details).

**Cold start.** ``sealtorch keycache serve`` with 10 models, key server already answering:
process spawn to the ``ready:`` line (Python start-up and imports included), best of a few
runs. Target: <= 1 s.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks._harness import Context, Result, percentile, result

_CONCURRENCY = 16
_MODELS = 10
_TARGET_RATE = 1000.0
_READY = re.compile(r"^ready: (\S+).*\((\d+) models?\)$")
_LISTENING = re.compile(r"^listening on (\S+)$")


# -- load generator (its own process) -----------------------------------------------------------


class _Connection:
    """A minimal HTTP/1.1 keep-alive client over an asyncio Unix socket stream (httpx would
    cost more CPU per request than the cache itself)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: str) -> _Connection:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: keycache\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _release_loop(
    path: str, attester: Any, deadline: float, warm_until: float, samples: list[float],
    interval: float | None, offset: float, model: str, failures: dict[str, int],
) -> int:  # fmt: skip
    import json

    from sealtorch._crypto import hpke
    from sealtorch.attestation import report_data_for
    from sealtorch.protocol import b64decode, b64encode, key_release_info

    suite = hpke.DEFAULT_SUITE
    errors = 0
    connection = await _Connection.open(path)
    next_start = time.perf_counter() + offset
    try:
        while time.perf_counter() < deadline:
            if interval is not None:  # paced: a fixed offered rate
                wait = next_start - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                next_start += interval
            start = time.perf_counter()
            try:
                status, raw = await connection.post("/v1/attestation/challenge", b"{}")
                nonce = b64decode(json.loads(raw)["nonce"])
                private = hpke.generate_private_key(suite)
                public = private.public_key().encode()
                evidence = attester.evidence(
                    report_data_for(nonce=nonce, hpke_suite=suite, public_key=public)
                )
                request = {
                    "nonce": b64encode(nonce),
                    "evidence": evidence.to_wire(),
                    "hpke": {"suite": suite, "public_key": b64encode(public)},
                    "models": [model],
                }
                status, raw = await connection.post(
                    "/v1/keys/release", json.dumps(request).encode()
                )
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {raw[:120]!r}")
                body = json.loads(raw)
                granted = body["granted"][0]
                info = key_release_info(
                    model_id=model,
                    key_version=granted["key_version"],
                    request_id=body["request_id"],
                    request_nonce=nonce,
                    policy_digest=granted["policy_digest"],
                    lease_expires_at=datetime.fromisoformat(granted["lease_expires_at"]),
                )
                if (
                    len(hpke.open(suite, private, b64decode(granted["sealed_key"]), info=info))
                    != 32
                ):
                    raise RuntimeError("not a data key")
            except (OSError, ValueError, KeyError, IndexError, RuntimeError,
                    asyncio.IncompleteReadError) as exc:  # fmt: skip
                errors += 1
                what = f"{type(exc).__name__}: {exc}"[:200]
                failures[what] = failures.get(what, 0) + 1
                connection.close()
                connection = await _Connection.open(path)
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. a key that fails to open: an error too
                errors += 1
                what = f"{type(exc).__name__}: {exc}"[:200]
                failures[what] = failures.get(what, 0) + 1
                continue
            if start >= warm_until:
                samples.append(time.perf_counter() - start)
    finally:
        connection.close()
    return errors


async def _load(
    path: str, key_path: str, seconds: float, warmup: float, rate: float | None, out: Any
) -> dict[str, Any]:
    from sealtorch.attestation import SimAttester

    attester = SimAttester(role="app", key_path=key_path)
    attester.evidence(b"\0" * 64)  # load the key and measure before the clock starts
    now = time.perf_counter()
    warm_until = now + warmup
    deadline = warm_until + seconds
    samples: list[float] = []
    failures: dict[str, int] = {}
    cpu = time.process_time()
    interval = _CONCURRENCY / rate if rate else None

    async def mark(at: float, what: str) -> None:  # tells the parent to read the cache's CPU
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        out.put((what, None))

    marks = [
        asyncio.create_task(mark(warm_until, "start")),
        asyncio.create_task(mark(deadline, "end")),
    ]
    errors = await asyncio.gather(
        *(
            _release_loop(
                path, attester, deadline, warm_until, samples, interval,
                (interval or 0) * n / _CONCURRENCY, f"model-{n % _MODELS}", failures,
            )
            for n in range(_CONCURRENCY)
        )
    )  # fmt: skip
    measured = time.perf_counter() - warm_until
    cpu = time.process_time() - cpu
    await asyncio.gather(*marks)
    return {
        "samples": samples,
        "errors": sum(errors),
        "failures": dict(sorted(failures.items(), key=lambda kv: -kv[1])[:5]),
        "seconds": measured,
        "client_cpu": cpu / (measured + warmup),
    }


def _load_process(
    path: str, key_path: str, seconds: float, warmup: float, rate: float | None, out: Any
) -> None:
    out.put(("done", asyncio.run(_load(path, key_path, seconds, warmup, rate, out))))


def _run_load(
    path: Path, key_path: Path, seconds: float, warmup: float, rate: float | None, cache_pid: int
) -> dict[str, Any]:
    import psutil

    cache = psutil.Process(cache_pid)
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    loader = spawn.Process(
        target=_load_process, args=(str(path), str(key_path), seconds, warmup, rate, out)
    )
    loader.start()
    times: dict[str, Any] = {}
    while True:
        what, value = out.get(timeout=seconds + warmup + 120)
        if what == "done":
            stats: dict[str, Any] = value
            break
        times[what] = cache.cpu_times()  # the measured window only (after the warm-up)
    loader.join(timeout=30)
    before, after = times["start"], times["end"]
    stats["cache_user_seconds"] = after.user - before.user
    stats["cache_cpu_seconds"] = (after.user - before.user) + (after.system - before.system)
    return stats


# -- processes ----------------------------------------------------------------------------------


def _keyserver(workdir: Path) -> tuple[subprocess.Popen[str], str, Path, Path]:
    """A real key server with _MODELS models whose policy admits the cache and the app."""
    from sealtorch.attestation import SIM_MRSIGNER, SimAttester
    from sealtorch.client import AdminClient
    from sealtorch.keyserver.datadir import init_data_dir

    key_path = workdir / "sim.key"
    app = SimAttester(role="app", key_path=key_path)
    created = init_data_dir(workdir / "ks", sim_trusted_keys=[app.public_key], database_url=None)
    process = subprocess.Popen(
        [sys.executable, "-m", "sealtorch", "-q", "keyserver", "serve", str(created.data_dir),
         "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    match = _LISTENING.match(line)
    if not match:
        process.kill()
        raise RuntimeError(f"keyserver serve did not start: {line!r}")
    url = match.group(1)
    ca = created.data_dir / "tls" / "ca.crt"
    # Signer + product pins (not MRENCLAVE): the processes measure the package files when they
    # start, and the files may change while a benchmark runs on a shared checkout.
    policy = {"allowed_tees": ["sim"], "sim": {"mrsigner": [SIM_MRSIGNER], "isv_prod_id": 0}}
    deadline = time.monotonic() + 30
    while True:
        try:
            with AdminClient(url, token=created.admin_token, ca=ca) as admin:
                for n in range(_MODELS):
                    admin.create_model(f"model-{n}")
                    admin.set_policy(f"model-{n}", policy)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return process, url, ca, key_path


def _start_cache(
    workdir: Path, url: str, ca: Path, key_path: Path, public_key: str, name: str
) -> tuple[subprocess.Popen[str], float, int]:
    socket = workdir / f"{name}.sock"
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "sealtorch", "--log-format", "json", "keycache", "serve",
         "--keyserver", url, "--ca", str(ca), "--tee", "sim", "--sim-key", str(key_path),
         "--socket", str(socket), "--trust-sim-key", public_key],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    elapsed = time.perf_counter() - started
    match = _READY.match(line)
    if not match:
        _stop(process)
        raise RuntimeError(f"keycache serve did not start: {line!r}")
    return process, elapsed, int(match.group(2))


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


# -- baseline: the bare server-side work of one release ------------------------------------------


def _bare_release_seconds(key_path: Path, runs: int) -> float:
    import secrets

    from sealtorch._crypto import hpke
    from sealtorch.attestation import (
        Evidence,
        Policy,
        SimAttester,
        make_verifiers,
        report_data_for,
    )
    from sealtorch.protocol import GrantedKey, ReleaseRequest, ReleaseResponse, key_release_info

    app = SimAttester(role="app", key_path=key_path)
    verifiers = make_verifiers(sim_trusted_keys=[app.public_key])
    policy = Policy.from_dict({"allowed_tees": ["sim"], "sim": {"mrenclave": [app.mrenclave]}})
    document = policy.to_dict()
    key = secrets.token_bytes(32)
    bodies = []
    for _ in range(64):
        nonce = secrets.token_bytes(32)
        public = hpke.generate_private_key().public_key().encode()
        evidence = app.evidence(
            report_data_for(nonce=nonce, hpke_suite=hpke.DEFAULT_SUITE, public_key=public)
        )
        bodies.append(
            ReleaseRequest.model_validate(
                {
                    "nonce": nonce,
                    "evidence": {"type": "sim", "data": evidence.data},
                    "hpke": {"suite": hpke.DEFAULT_SUITE, "public_key": public},
                    "models": ["m"],
                }
            ).model_dump_json()
        )
    now = datetime.now(UTC)
    lease = now + timedelta(hours=1)

    def one(raw: str) -> bytes:
        request = ReleaseRequest.model_validate_json(raw)
        claims = verifiers.verify(
            Evidence(type=request.evidence.type, data=request.evidence.data), now=now
        )
        if not policy.evaluate(claims, now=now).allowed:
            raise RuntimeError("policy")
        info = key_release_info(
            model_id="m", key_version=1, request_id="r" * 32, request_nonce=request.nonce,
            policy_digest=policy.digest, lease_expires_at=lease,
        )  # fmt: skip
        sealed = hpke.seal(request.hpke.suite, request.hpke.public_key, key, info=info)
        granted = GrantedKey(
            model_id="m", key_version=1, sealed_key=sealed, lease_expires_at=lease,
            policy=document, policy_version=1, policy_digest=policy.digest,
        )  # fmt: skip
        return (
            ReleaseResponse(request_id="r" * 32, server_time=now, granted=(granted,), denied=())
            .model_dump_json()
            .encode()
        )

    for raw in bodies:
        one(raw)
    best = float("inf")
    for _ in range(3):  # best of three batches: the machine is shared
        start = time.process_time()
        for n in range(runs):
            one(bodies[n % len(bodies)])
        best = min(best, (time.process_time() - start) / runs)
    return best


# -- run ----------------------------------------------------------------------------------------


def run(ctx: Context) -> list[Result]:
    from sealtorch.attestation import SimAttester

    workdir = ctx.workdir
    seconds, warmup = (3.0, 1.0) if ctx.quick else (10.0, 2.0)
    keyserver, url, ca, key_path = _keyserver(workdir)
    bare = _bare_release_seconds(key_path, 300 if ctx.quick else 1000)
    public_key = SimAttester(role="app", key_path=key_path).public_key
    results: list[Result] = []
    try:
        starts = []
        for attempt in range(2 if ctx.quick else 5):
            process, elapsed, models = _start_cache(
                workdir, url, ca, key_path, public_key, f"cold{attempt}"
            )
            _stop(process)
            if models != _MODELS:
                raise RuntimeError(f"the cache started with {models} models, not {_MODELS}")
            starts.append(elapsed)
        results.append(
            result(
                "keycache/cold-start", f"spawn to ready, {_MODELS} models (best)",
                min(starts) * 1000, "ms", "<= 1000",
                median_ms=round(sorted(starts)[len(starts) // 2] * 1000, 1),
                runs=len(starts),
            )
        )  # fmt: skip

        cache, _, _ = _start_cache(workdir, url, ca, key_path, public_key, "load")
        socket = workdir / "load.sock"
        try:
            repeats = 1 if ctx.quick else 2
            saturated = [
                _run_load(socket, key_path, seconds, warmup, None, cache.pid)
                for _ in range(repeats)
            ]
            paced = [
                _run_load(socket, key_path, seconds, warmup, _TARGET_RATE, cache.pid)
                for _ in range(repeats)
            ]
            # The machine is shared: keep each mode's best run (all are in the details).
            runs = {
                "max": max(saturated, key=lambda s: len(s["samples"]) / s["seconds"]),
                f"at {_TARGET_RATE:.0f}/s": min(
                    paced, key=lambda s: percentile(s["samples"], 99) if s["samples"] else 1e9
                ),
            }
            for mode, every in zip(runs, (saturated, paced), strict=True):
                runs[mode]["all_runs"] = [
                    {
                        "releases_per_s": round(len(s["samples"]) / s["seconds"]),
                        "p99_ms": round(percentile(s["samples"], 99) * 1000, 2)
                        if s["samples"]
                        else None,
                    }
                    for s in every
                ]
        finally:
            _stop(cache)
    finally:
        _stop(keyserver)

    for mode, stats in runs.items():
        samples = stats["samples"]
        count = len(samples)
        if not samples:
            raise RuntimeError(f"no release succeeded ({mode}): {stats['failures']}")
        rate = count / stats["seconds"]
        cache_cpu = stats["cache_cpu_seconds"] / max(1, count)
        details = {
            "concurrency": _CONCURRENCY,
            "releases": count,
            "errors": stats["errors"],
            "failures": stats["failures"],
            "load_generator_cpu_cores": round(stats["client_cpu"], 2),
            "cache_cpu_ms_per_release": round(cache_cpu * 1000, 3),
            "cache_user_cpu_ms_per_release": round(
                stats["cache_user_seconds"] / max(1, count) * 1000, 3
            ),
            "bare_server_work_ms_per_release": round(bare * 1000, 3),
            "cores": os.cpu_count(),
            "runs": stats["all_runs"],
        }
        label = f"keycache/release {mode}"
        saturation = mode == "max"
        results += [
            result(label, "releases per second", rate, "releases/s",
                   ">= 1000" if saturation else None, **details),
            result(label, "p50 latency", percentile(samples, 50) * 1000, "ms"),
            result(label, "p99 latency", percentile(samples, 99) * 1000, "ms",
                   None if saturation else "<= 10"),
            result(label, "errors", stats["errors"], "count", "<= 0"),
        ]  # fmt: skip
        if saturation:
            results += [
                result("keycache/release", "cache CPU per release", cache_cpu * 1000, "ms"),
                result("keycache/release", "releases/s one cache core sustains",
                       1 / cache_cpu if cache_cpu else 0.0, "releases/s", ">= 1000"),
                result("keycache/release", "cache CPU vs bare server-side work",
                       cache_cpu / bare if bare else 0.0, "x"),
            ]  # fmt: skip
    return results
