"""A key server with its own CA, reached without that CA: every client says the certificate is
not trusted and to pass --ca, instead of "unreachable" (and the key release client does not
retry what retrying cannot fix)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from keycache_helpers import Attesters, cache_settings, running_cache

from _fixtures.clock import FakeClock
from _fixtures.keyserver import KeyServerUnderTest, make_tls, running_keyserver
from sealtorch.client import AdminClient, AdminError, KeyReleaseClient
from sealtorch.errors import KeySourceUnreachableError
from sealtorch.keyserver.masterkey import FileMasterKey
from sealtorch.keyserver.store import Store

NOT_TRUSTED = "is not trusted (unable to get local issuer certificate)"


@pytest.fixture
def https_keyserver(
    tmp_path: Path, store: Store, master: FileMasterKey, attesters: Attesters, clock: FakeClock
) -> Iterator[KeyServerUnderTest]:
    with running_keyserver(
        tmp_path,
        store=store,
        master=master,
        attester=attesters.app,
        clock=clock,
        tls=make_tls(tmp_path / "tls"),
    ) as server:
        server.add_model("m1", policy=attesters.policy())
        yield server


def test_key_release_client(https_keyserver: KeyServerUnderTest, attesters: Attesters) -> None:
    waits: list[float] = []
    client = KeyReleaseClient(
        https_keyserver.url,
        attester=attesters.app,
        sleep=waits.append,
        trusted_release_keys=[https_keyserver.release_key],
    )
    with client, pytest.raises(KeySourceUnreachableError) as refused:
        client.release(["m1"])
    message = str(refused.value)
    assert f"the TLS certificate of the key cache or key server at {https_keyserver.url}" in message
    assert NOT_TRUSTED in message
    assert "with --ca (`sealtorch serve`: --keys-ca; Python: ca=)" in message
    assert waits == []  # not retried
    with https_keyserver.client(attesters.app) as trusting:  # with the CA: released
        assert trusting.release(["m1"]).key("m1")


def test_admin_client(https_keyserver: KeyServerUnderTest) -> None:
    admin = AdminClient(https_keyserver.url, token=https_keyserver.admin_token)
    with admin, pytest.raises(AdminError) as refused:
        admin.list_models()
    assert refused.value.code == "untrusted_certificate"
    assert NOT_TRUSTED in str(refused.value)
    assert "with --ca (Python: ca=)" in str(refused.value)
    assert "DATA_DIR/tls/ca.crt" in str(refused.value)


def test_key_cache_logs_and_reports_it(
    tmp_path: Path,
    https_keyserver: KeyServerUnderTest,
    attesters: Attesters,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = cache_settings(tmp_path, attesters, https_keyserver)
    with (
        caplog.at_level(logging.WARNING, logger="sealtorch.keycache"),
        running_cache(settings, clock=clock, attester=attesters.cache) as running,
    ):
        status = running.cache.status()
    expected = f"the TLS certificate of the key server at {https_keyserver.url} {NOT_TRUSTED}"
    assert expected in (status.keyserver.last_error or "")
    assert "pass the CA certificate that issued it with --ca" in (status.keyserver.last_error or "")
    logged = [r.getMessage() for r in caplog.records if "refresh failed" in r.getMessage()]
    assert len(logged) == 1
    assert expected in logged[0]  # in the text of the log line, not only in its extra fields

    trusting = settings.with_overrides(keyserver_ca=https_keyserver.ca)
    with running_cache(trusting, clock=clock, attester=attesters.cache) as running:
        assert running.cache.status().state == "ready"
