"""A real local PCCS: an HTTP server on 127.0.0.1 serving the sample collateral in PCS v4 format."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pccs_fake import FakePccs


@pytest.fixture
def pccs(attestation_samples: Path) -> Iterator[FakePccs]:
    fake = FakePccs(
        collateral={
            tee: json.loads((attestation_samples / f"{tee}_quote_collateral.json").read_text())
            for tee in ("sgx", "tdx")
        }
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, headers, body = fake.respond(self.path)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            del format, args

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _private_sim_key(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEALTORCH_SIM_KEY", str(tmp_path_factory.mktemp("simkey") / "k"))
