"""A fake key source: what a hostile cloud host can put where an enclave asks for its keys.

The host owns the network, the ports and the files, so it can answer on the Unix socket (or the
port) an enclave's ``--keys`` names. :class:`FakeKeySource` is such an answer, a real HTTP
server on a real Unix socket: it speaks the key release protocol, checks no evidence at all and
HPKE-seals a key *of its own* (the key of a file the host sealed itself) to whoever asks, under
an "anything goes" policy. HPKE base mode authenticates no sender, so the sealed key opens; what
stops the enclave is the key server's release statement, which the fake cannot sign. ``forge``
decides what it sends in place of one (by default nothing); tests use it to replay genuine
statements, sign with a key of their own, or alter a byte.

``sealtorch demo`` starts one to show ``serve`` refusing its key; the tests attack every
enclave-side consumer with it.
"""

from __future__ import annotations

import json
import secrets
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from sealtorch._crypto import hpke
from sealtorch.attestation import Policy
from sealtorch.protocol import (
    HPKE_SUITES,
    ChallengeResponse,
    GrantedKey,
    ReleaseRequest,
    ReleaseResponse,
    SignedStatement,
    key_release_info,
)

__all__ = ["ANYTHING_GOES", "FakeGrant", "FakeKeySource", "Forge", "no_statement"]

#: The policy the fake sends with its key: every TEE, any measurement, debug enclaves welcome.
ANYTHING_GOES: Final = Policy.from_dict(
    {
        "version": 1,
        "name": "anything goes",
        "allowed_tees": ["sgx", "tdx", "sim"],
        "allow_any_measurement_insecure": True,
        "allow_debug_enclave_insecure": True,
        "tcb": {
            "accepted_statuses": [
                "UpToDate",
                "SWHardeningNeeded",
                "ConfigurationNeeded",
                "ConfigurationAndSWHardeningNeeded",
                "OutOfDate",
                "OutOfDateConfigurationNeeded",
                "Revoked",
            ]
        },
    }
)


@dataclass(frozen=True)
class FakeGrant:
    """One key the fake is about to hand out, for ``forge`` to write a statement about."""

    model_id: str
    key_version: int
    key: bytes = field(repr=False)
    policy_digest: str
    lease_expires_at: datetime
    request_id: str
    hpke_suite: str
    hpke_public_key: bytes
    issued_at: datetime


#: What the fake sends as the release statement of a grant (``None``: none at all).
Forge = Callable[[FakeGrant], SignedStatement | None]


def no_statement(grant: FakeGrant) -> SignedStatement | None:
    """The plain fake: a key with no statement (it has no key server key to sign with)."""
    del grant
    return None


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class FakeKeySource:
    """A fake key server/cache on the Unix socket ``socket_path`` (see the module docstring).

    ``key`` is the 32-byte key it hands out as version ``key_version`` of whatever model is
    asked for; ``forge`` writes the statement that goes with it; ``policy`` is the policy
    document it attaches (default: :data:`ANYTHING_GOES`). Use it as a context manager.
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        key: bytes,
        key_version: int = 1,
        forge: Forge = no_statement,
        policy: Policy = ANYTHING_GOES,
        lease: timedelta = timedelta(hours=1),
    ) -> None:
        if len(key) != 32:
            raise ValueError("a data key is 32 bytes")
        self.socket_path = socket_path
        self.url = f"unix://{socket_path}"
        self._key = key
        self._version = key_version
        self._forge = forge
        self._policy = policy
        self._lease = lease
        #: How many keys it handed out (tests check that an enclave asked and was answered).
        self.keys_sent = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"FakeKeySource({self.url!r})"

    def __enter__(self) -> FakeKeySource:
        self.socket_path.unlink(missing_ok=True)
        source = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                status, body = source.answer(self.path, self.rfile.read(min(length, 1 << 20)))
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                del format, args  # quiet (and Unix sockets have no client address)

        self._server = _Server(str(self.socket_path), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        self.socket_path.unlink(missing_ok=True)

    def answer(self, path: str, raw: bytes) -> tuple[int, bytes]:
        """The fake's answer to ``POST path`` with body ``raw``: (status, JSON body)."""
        now = datetime.now(UTC)
        if path == "/v1/attestation/challenge":
            challenge = ChallengeResponse(
                nonce=secrets.token_bytes(32),
                expires_at=now + timedelta(minutes=1),
                hpke_suites=HPKE_SUITES,
                evidence_types=("sgx-dcap", "tdx-dcap", "sim"),
            )
            return 200, challenge.model_dump_json().encode()
        if path == "/v1/keys/renew":  # it keeps no sessions: attest again (and get its key)
            return 403, _error("session_invalid", "unknown session; release again")
        if path != "/v1/keys/release":
            return 404, _error("not_found", "no such endpoint")
        try:
            request = ReleaseRequest.model_validate_json(raw)
        except ValidationError:
            return 400, _error("invalid_request", "malformed release request")
        # No evidence is verified, no binding checked, no policy evaluated: anything goes.
        recipient = hpke.HpkePublicKey.decode(request.hpke.suite, request.hpke.public_key)
        request_id = secrets.token_hex(16)
        lease_end = now + self._lease
        granted = []
        for model_id in request.models or ("model",):
            grant = FakeGrant(
                model_id=model_id,
                key_version=self._version,
                key=self._key,
                policy_digest=self._policy.digest,
                lease_expires_at=lease_end,
                request_id=request_id,
                hpke_suite=request.hpke.suite,
                hpke_public_key=request.hpke.public_key,
                issued_at=now,
            )
            info = key_release_info(
                model_id=model_id,
                key_version=self._version,
                request_id=request_id,
                request_nonce=request.nonce,
                policy_digest=self._policy.digest,
                lease_expires_at=lease_end,
            )
            granted.append(
                GrantedKey(
                    model_id=model_id,
                    key_version=self._version,
                    sealed_key=hpke.seal(request.hpke.suite, recipient, self._key, info=info),
                    lease_expires_at=lease_end,
                    policy=self._policy.to_dict(),
                    policy_version=1,
                    policy_digest=self._policy.digest,
                    statement=self._forge(grant),
                )
            )
        self.keys_sent += len(granted)
        response = ReleaseResponse(
            request_id=request_id, server_time=now, granted=tuple(granted), denied=()
        )
        return 200, response.model_dump_json(exclude_none=True).encode()


def _error(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "reasons": [code]}}).encode()
