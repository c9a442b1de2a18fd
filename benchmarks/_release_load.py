"""The attested key release under load, shared by the key server and key cache benchmarks.

* :func:`start_keyserver`: a real ``sealtorch keyserver serve`` process with models whose policy
  admits the benchmark's sim "app" enclave.
* :func:`run_load`: ``concurrency`` clients (asyncio tasks, one HTTP/1.1 keep-alive connection
  each, in a separate load-generator process so it does not share the server's interpreter) run
  the whole protocol against a server: ``POST /v1/attestation/challenge``, a fresh HPKE key
  pair, sim evidence binding nonce and key (Ed25519-signed), ``POST /v1/keys/release``, and the
  client's HPKE open of the returned key with its info binding (the load generator does not
  verify the release statement: it measures the server, and its client work stays as before).
  Closed loop (as fast as they can) or paced at an offered rate. The server's CPU time (all its
  processes) is read at the start and the end of the measured window.
* :func:`bare_release_seconds`: the baseline, the bare server-side work of one release in a
  loop (parse the request, verify the sim evidence, evaluate the policy, HPKE-seal, sign the
  release statement or attach a forwarded one, build the response); no HTTP, TLS or database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from benchmarks._harness import percentile
from benchmarks._processes import start_process, stop_process, tree_cpu_times

_LISTENING = re.compile(r"^listening on (\S+)$")


def sim_signer_policy() -> dict[str, Any]:
    """The policy the benchmarks' key servers set: the sim TEE, pinned by MRSIGNER+ISVPRODID.

    Not MRENCLAVE: the processes measure the package files when they start, and the files may
    change while a benchmark runs on a shared checkout.
    """
    from sealtorch.attestation import SIM_MRSIGNER

    return {"allowed_tees": ["sim"], "sim": {"mrsigner": [SIM_MRSIGNER], "isv_prod_id": 0}}


# -- the key server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyServer:
    """A running ``sealtorch keyserver serve``."""

    process: subprocess.Popen[str]
    url: str
    ca: Path
    key_path: Path  # the sim key of the "app" enclave the server trusts
    release_key: str  # its release-signing public key (key caches pin it)


def start_keyserver(
    workdir: Path,
    *,
    models: Sequence[str],
    database_url: str | None = None,
    workers: int | None = None,
    env: dict[str, str] | None = None,
) -> KeyServer:
    """Initialise a data directory in ``workdir/ks`` (trusting a new sim key, ``workdir/sim.key``),
    serve it on a free port and create ``models`` with :func:`sim_signer_policy`."""
    from sealtorch.attestation import SimAttester
    from sealtorch.client import AdminClient
    from sealtorch.errors import Error
    from sealtorch.keyserver.datadir import init_data_dir

    key_path = workdir / "sim.key"
    app = SimAttester(role="app", key_path=key_path)
    created = init_data_dir(
        workdir / "ks", sim_trusted_keys=[app.public_key], database_url=database_url
    )
    command = [sys.executable, "-m", "sealtorch", "-q", "keyserver", "serve",
               str(created.data_dir), "--port", "0"]  # fmt: skip
    if workers is not None:
        command += ["--workers", str(workers)]
    process, match, _ = start_process(command, ready=_LISTENING, timeout=120, env=env)
    server = KeyServer(
        process,
        match.group(1),
        created.data_dir / "tls" / "ca.crt",
        key_path,
        created.release_public_key,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with AdminClient(server.url, token=created.admin_token, ca=server.ca) as admin:
                    existing = {m.model_id for m in admin.list_models()}
                    for model in models:
                        if model not in existing:
                            admin.create_model(model)
                            admin.set_policy(model, sim_signer_policy())
                break
            except Error:  # not answering yet (AdminError "unreachable"), or refusing
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    except BaseException:
        stop_process(process)
        raise
    return server


# -- the load generator (runs in its own process) -----------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where the load goes: a Unix socket path (the key cache), or an https URL with the CA
    certificate that signed the server's (the key server)."""

    address: str
    ca: str | None = None  # None: ``address`` is a Unix socket


@dataclass(frozen=True)
class Load:
    """One load run, as the load-generator process gets it."""

    endpoint: Endpoint
    key_path: str  # the sim key of the "app" enclave
    models: tuple[str, ...]  # client n asks for models[n % len(models)]
    concurrency: int
    seconds: float  # the measured window
    warmup: float  # before it (releases that start then are not sampled)
    rate: float | None  # None: closed loop (as fast as they can); else offered releases/s


@dataclass(frozen=True)
class LoadRun:
    """What one load run measured."""

    samples: list[float]  # seconds per release started in the measured window
    errors: int
    failures: dict[str, int]  # the five commonest causes of errors, with counts
    seconds: float  # the measured window, as it ran
    client_cpu: float  # the load generator's CPU cores (warm-up included)
    server_user_seconds: float = 0.0  # the server's CPU in the measured window (all processes)
    server_cpu_seconds: float = 0.0  # user + system

    @property
    def rate(self) -> float:
        """Releases per second in the measured window."""
        return len(self.samples) / self.seconds

    def latency_ms(self, q: float) -> float:
        """The q-th percentile latency in ms; infinite when no release succeeded."""
        return percentile(self.samples, q) * 1000 if self.samples else float("inf")


class _Connection:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams.

    httpx's async pool costs about 3 ms of CPU per request with 32 connections, which would make
    the load generator, not the server, the bottleneck on 2 cores; this costs about 0.1 ms.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader = reader
        self.writer = writer
        self.host = host

    @classmethod
    async def open(cls, endpoint: Endpoint, ssl_context: Any) -> _Connection:
        if endpoint.ca is None:
            reader, writer = await asyncio.open_unix_connection(endpoint.address)
            return cls(reader, writer, "localhost")
        from urllib.parse import urlsplit

        parts = urlsplit(endpoint.address)
        reader, writer = await asyncio.open_connection(
            parts.hostname, parts.port, ssl=ssl_context, server_hostname=parts.hostname
        )
        return cls(reader, writer, parts.netloc)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
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
    load: Load, client: int, ssl_context: Any, attester: Any, deadline: float,
    warm_until: float, samples: list[float], failures: dict[str, int],
) -> int:  # fmt: skip
    """Client number ``client``: releases until ``deadline``; returns its error count."""
    import json

    from sealtorch._crypto import hpke
    from sealtorch.attestation import report_data_for
    from sealtorch.errors import Error
    from sealtorch.protocol import b64decode, b64encode, key_release_info

    suite = hpke.DEFAULT_SUITE
    model = load.models[client % len(load.models)]
    interval = load.concurrency / load.rate if load.rate else None
    errors = 0
    connection = await _Connection.open(load.endpoint, ssl_context)
    # Paced clients start spread over one interval.
    next_start = time.perf_counter() + (interval or 0) * client / load.concurrency
    try:
        while time.perf_counter() < deadline:
            if interval is not None:  # paced: a fixed offered rate, not as fast as possible
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
                connection = await _Connection.open(load.endpoint, ssl_context)
                continue
            except Error as exc:  # e.g. a key that fails to open (IntegrityError): an error too
                errors += 1
                what = f"{type(exc).__name__}: {exc}"[:200]
                failures[what] = failures.get(what, 0) + 1
                continue
            if start >= warm_until:
                samples.append(time.perf_counter() - start)
    finally:
        connection.close()
    return errors


async def _load(load: Load, out: Any) -> LoadRun:
    from sealtorch.attestation import SimAttester

    attester = SimAttester(role="app", key_path=load.key_path)
    attester.evidence(b"\0" * 64)  # load the key and measure before the clock starts
    ssl_context = None
    if load.endpoint.ca is not None:
        from sealtorch._crypto.tls import client_ssl_context

        ssl_context = client_ssl_context(ca_path=load.endpoint.ca)
    now = time.perf_counter()
    warm_until = now + load.warmup
    deadline = warm_until + load.seconds
    samples: list[float] = []
    failures: dict[str, int] = {}
    cpu = time.process_time()

    async def mark(at: float, what: str) -> None:  # tells the parent to read the server's CPU
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        out.put((what, None))

    marks = [
        asyncio.create_task(mark(warm_until, "start")),
        asyncio.create_task(mark(deadline, "end")),
    ]
    errors = await asyncio.gather(
        *(
            _release_loop(load, n, ssl_context, attester, deadline, warm_until, samples, failures)
            for n in range(load.concurrency)
        )
    )
    measured = time.perf_counter() - warm_until
    cpu = time.process_time() - cpu
    await asyncio.gather(*marks)
    return LoadRun(
        samples=samples,
        errors=sum(errors),
        failures=dict(sorted(failures.items(), key=lambda kv: -kv[1])[:5]),
        seconds=measured,
        client_cpu=cpu / (measured + load.warmup),
    )


def _load_process(load: Load, out: Any) -> None:
    out.put(("done", asyncio.run(_load(load, out))))


def run_load(load: Load, *, server_pid: int) -> LoadRun:
    """Run ``load`` in a load-generator process against the server whose process (and children)
    is ``server_pid``; the server's CPU time is read over the measured window only."""
    import psutil

    server = psutil.Process(server_pid)
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    loader = spawn.Process(target=_load_process, args=(load, out))
    loader.start()
    times: dict[str, tuple[float, float]] = {}
    while True:
        what, value = out.get(timeout=load.seconds + load.warmup + 120)
        if what == "done":
            stats: LoadRun = value
            break
        times[what] = tree_cpu_times(server)  # the measured window only (after the warm-up)
    loader.join(timeout=30)
    (user0, system0), (user1, system1) = times["start"], times["end"]
    return dataclasses.replace(
        stats,
        server_user_seconds=user1 - user0,
        server_cpu_seconds=(user1 - user0) + (system1 - system0),
    )


# -- the baseline: the bare server-side work of one release -------------------------------------


def bare_release_seconds(
    key_path: Path,
    *,
    runs: int,
    policy: dict[str, Any],
    model_id: str,
    statement: Literal["sign", "forward"] = "sign",
) -> float:
    """CPU seconds of the bare server-side work of one release (best of three loops of
    ``runs``): parse the request, verify the sim evidence (signed with the key in ``key_path``),
    check its report_data binding, evaluate ``policy``, HPKE-seal a key for ``model_id``, sign
    its release statement (``"sign"``, the key server) or attach one signed earlier
    (``"forward"``, a key cache), build the response."""
    import secrets

    from sealtorch._crypto import hpke
    from sealtorch.attestation import (
        Evidence,
        Policy,
        SimAttester,
        binding_reasons,
        make_verifiers,
        report_data_for,
    )
    from sealtorch.keyserver.signingkey import FileReleaseSigningKey
    from sealtorch.protocol import (
        GrantedKey,
        ReleaseRequest,
        ReleaseResponse,
        issue_statement,
        key_release_info,
    )

    signer = FileReleaseSigningKey(secrets.token_bytes(32))
    app = SimAttester(role="app", key_path=key_path)
    verifiers = make_verifiers(sim_trusted_keys=[app.public_key])
    checked = Policy.from_dict(policy)
    document = checked.to_dict()
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
                    "models": [model_id],
                }
            ).model_dump_json()
        )
    now = datetime.now(UTC)
    lease = now + timedelta(hours=1)

    def sign(public_key: bytes) -> Any:
        return issue_statement(
            signer, model_id=model_id, key_version=1, key=key, policy_digest=checked.digest,
            lease_expires_at=lease, hpke_suite=hpke.DEFAULT_SUITE, hpke_public_key=public_key,
            request_id="r" * 32, issued_at=now,
        )  # fmt: skip

    forwarded = sign(hpke.generate_private_key().public_key().encode())

    def one(raw: str) -> bytes:
        request = ReleaseRequest.model_validate_json(raw)
        claims = verifiers.verify(
            Evidence(type=request.evidence.type, data=request.evidence.data), now=now
        )
        expected = report_data_for(
            nonce=request.nonce,
            hpke_suite=request.hpke.suite,
            public_key=request.hpke.public_key,
        )
        if binding_reasons(claims, expected):
            raise RuntimeError("the bare release was refused: binding")
        if not checked.evaluate(claims, now=now).allowed:
            raise RuntimeError("the bare release was refused: policy")
        info = key_release_info(
            model_id=model_id, key_version=1, request_id="r" * 32, request_nonce=request.nonce,
            policy_digest=checked.digest, lease_expires_at=lease,
        )  # fmt: skip
        sealed = hpke.seal(request.hpke.suite, request.hpke.public_key, key, info=info)
        granted = GrantedKey(
            model_id=model_id, key_version=1, sealed_key=sealed, lease_expires_at=lease,
            policy=document, policy_version=1, policy_digest=checked.digest,
            statement=sign(request.hpke.public_key) if statement == "sign" else forwarded,
        )  # fmt: skip
        return (
            ReleaseResponse(request_id="r" * 32, server_time=now, granted=(granted,), denied=())
            .model_dump_json()
            .encode()
        )

    for raw in bodies:
        one(raw)
    best = float("inf")
    for _ in range(3):  # best of three loops: the machine is shared
        start = time.process_time()
        for n in range(runs):
            one(bodies[n % len(bodies)])
        best = min(best, (time.process_time() - start) / runs)
    return best
