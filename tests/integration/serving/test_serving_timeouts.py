"""The inference server's read timeouts on real sockets: a client that sends nothing, a head a
byte at a time (slowloris), a body that stalls or a header that never ends is disconnected;
normal clients, slow but steady bodies and inference itself carry on meanwhile."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import ExitStack
from urllib.parse import urlsplit

import httpx
import pytest
from serving_helpers import running_server
from torch import nn

from _fixtures import slowclients
from sealtorch._listen import ReadTimeouts
from sealtorch.serving.model import ServedModel
from sealtorch.serving.server import InferenceServer, ServerSettings

INFER = "/v2/models/linear/infer"
BODY = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}'


class LinearSource:
    """A plain two-by-two linear layer: the timeouts do not depend on the model."""

    name = "linear"

    def describe(self) -> str:
        return "a plain linear layer"

    def load(self, *, max_images: int) -> ServedModel:
        return ServedModel.build(
            nn.Linear(2, 2), name="linear", sealed=False, max_images=max_images
        )


@pytest.fixture(scope="module")
def server() -> Iterator[InferenceServer]:
    settings = ServerSettings(
        port=0, workers=1, read_timeouts=ReadTimeouts(header=2.0, body=2.0, keep_alive=2.0)
    )
    with running_server([LinearSource()], settings) as running:
        yield running


@pytest.fixture(scope="module")
def connect(server: InferenceServer) -> slowclients.Connect:
    assert server.url is not None
    address = urlsplit(server.url)
    assert address.hostname is not None
    assert address.port is not None
    host, port = address.hostname, address.port
    return lambda: socket.create_connection((host, port), timeout=10)


def test_a_silent_connection_is_closed(connect: slowclients.Connect) -> None:
    assert slowclients.silent(connect)


def test_a_head_sent_a_byte_at_a_time_is_cut(connect: slowclients.Connect) -> None:
    assert slowclients.slowloris(connect) < len(slowclients.SLOW_HEAD)


def test_a_stalled_body_is_cut(connect: slowclients.Connect) -> None:
    assert slowclients.stalled_body(connect, INFER)


def test_a_header_that_never_ends_is_refused(connect: slowclients.Connect) -> None:
    sent, answer = slowclients.endless_header(connect)
    assert sent < slowclients.ENDLESS  # refused, not buffered without end
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 ")


def test_slow_clients_hold_no_worker_and_normal_clients_carry_on(
    server: InferenceServer, connect: slowclients.Connect
) -> None:
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
    with ExitStack() as stack, httpx.Client(base_url=str(server.url), timeout=60) as client:
        stalled = [stack.enter_context(connect()) for _ in range(3)]
        for sock in stalled:  # three requests that will never finish (one worker in all)
            sock.sendall(head + BODY[:10])
        for _ in range(3):  # keep-alive requests, inference included, are served meanwhile
            response = client.post(INFER, content=BODY)
            assert response.status_code == 200, response.text
            assert client.get("/v2/health/ready").status_code == 200
        with connect() as steady:  # a body that keeps coming, longer in all than any timeout
            steady.sendall(head)
            assert slowclients.trickle(steady, BODY, interval=3.0 / len(BODY)) == len(BODY)
            steady.settimeout(60)
            assert steady.recv(65536).startswith(b"HTTP/1.1 200 ")
        for sock in stalled:
            assert slowclients.closed_by_server(sock)
