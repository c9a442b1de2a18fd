"""A model sealed through the key server and loaded by an attested enclave:
``sealtorch encrypt --keyserver`` (the server wraps the content key; the data key never leaves
it), ``sealtorch.load_model(path, key=KeyReleaseClient(...))``, key rotation with
``sealtorch rewrap --keyserver`` and revocation of the old version."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import sealtorch
from _fixtures.keyserver import KeyServerUnderTest, make_tls, running_keyserver
from sealtorch.attestation import SimAttester
from sealtorch.cli import cli
from sealtorch.client import AdminClient, KeyServerWrapper
from sealtorch.errors import KeyReleaseError
from sealtorch.keyserver.masterkey import FileMasterKey
from sealtorch.keyserver.store import open_store, sqlite_url

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(tmp_path: Path) -> Iterator[KeyServerUnderTest]:
    store = open_store(sqlite_url(tmp_path / "keys.db"))
    store.migrate()
    try:
        with running_keyserver(
            tmp_path,
            store=store,
            master=FileMasterKey.create(tmp_path / "master.key"),
            attester=SimAttester(role="app", key_path=tmp_path / "sim.key"),
            tls=make_tls(tmp_path / "tls"),
        ) as running:
            yield running
    finally:
        store.close()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _keyserver_args(server: KeyServerUnderTest, token_file: Path) -> list[str]:
    return ["--keyserver", server.url, "--ca", str(server.ca), "--token-file", str(token_file)]


def test_encrypt_load_rotate_rewrap_revoke(server: KeyServerUnderTest, tmp_path: Path) -> None:
    server.add_model("tiny")
    token_file = tmp_path / "admin.token"
    token_file.write_text(server.admin_token + "\n")
    weights = tmp_path / "tiny.safetensors"
    model = _model()
    save_file(model.state_dict(), weights)
    sealed = tmp_path / "tiny.sealed"
    runner = CliRunner()
    result = runner.invoke(
        cli,
        ["encrypt", str(weights), "-o", str(sealed), "--model-id", "tiny",
         *_keyserver_args(server, token_file)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrapped by the key server" in result.output
    assert sealtorch.inspect_sealed(sealed).key_version == 1
    example = torch.randn(3, 8)

    with server.client() as client:
        loaded = sealtorch.load_state_dict(sealed, key=client)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())

    with AdminClient(server.url, token=server.admin_token, ca=server.ca) as admin:
        admin.rotate_key("tiny")
    result = runner.invoke(cli, ["rewrap", str(sealed), *_keyserver_args(server, token_file)])
    assert result.exit_code == 0, result.output
    assert sealtorch.inspect_sealed(sealed).key_version == 2
    with AdminClient(server.url, token=server.admin_token, ca=server.ca) as admin:
        admin.revoke_key("tiny", 1)
    with server.client() as client:
        loaded = sealtorch.load_state_dict(sealed, key=client)
        rebuilt = _model()
        rebuilt.load_state_dict(loaded)
        assert torch.equal(rebuilt(example), model(example))
        with pytest.raises(KeyReleaseError) as caught:  # the revoked version stays closed
            client.data_key("tiny", 1)
        assert caught.value.reasons == ("key_version_unavailable",)


def test_python_api_seals_with_a_remote_wrapper(server: KeyServerUnderTest, tmp_path: Path) -> None:
    server.add_model("py")
    model = _model()
    with AdminClient(server.url, token=server.admin_token, ca=server.ca) as admin:
        sealtorch.encrypt_model(
            model.state_dict(), tmp_path / "py.sealed", model_id="py", key=KeyServerWrapper(admin)
        )
    with server.client() as client:
        loaded = sealtorch.load_state_dict(tmp_path / "py.sealed", key=client)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_keyserver_and_key_file_are_exclusive(server: KeyServerUnderTest, tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    save_file(_model().state_dict(), weights)
    key_file = tmp_path / "k.key"
    assert CliRunner().invoke(cli, ["keygen", "-o", str(key_file)]).exit_code == 0
    result = CliRunner().invoke(
        cli,
        ["encrypt", str(weights), "-o", str(tmp_path / "x.sealed"), "--model-id", "x",
         "--key-file", str(key_file), "--keyserver", server.url],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "not both" in result.output
    result = CliRunner().invoke(
        cli, ["encrypt", str(weights), "-o", str(tmp_path / "y.sealed"), "--model-id", "y"]
    )
    assert result.exit_code == 2


def test_a_sealed_set_is_rotated_by_the_key_server(
    server: KeyServerUnderTest, tmp_path: Path
) -> None:
    """`rewrap --keyserver` of a sealed set: the server authenticates the first file's header,
    set block included, and rewraps its key; the other files are not touched. An edited set
    block does not authenticate: refused, and the file stays as it was."""
    import dataclasses

    from sealtorch.client import AdminError
    from sealtorch.sealed.header import SetBlock
    from sealtorch.sealed.reader import read_header
    from sealtorch.sealed.sets import set_paths

    server.add_model("big")
    token_file = tmp_path / "admin.token"
    token_file.write_text(server.admin_token + "\n")
    model = _model()
    sealed = tmp_path / "big.sealed"
    with AdminClient(server.url, token=server.admin_token, ca=server.ca) as admin:
        info = sealtorch.encrypt_model(
            model.state_dict(), sealed, model_id="big", key=KeyServerWrapper(admin),
            max_file_size=128, chunk_size=64,
        )  # fmt: skip
        assert info.file_count >= 2
        others = [p.read_bytes() for p in set_paths(sealed, info.file_count)[1:]]

        header = read_header(sealed)
        assert header.body.set is not None
        edited = SetBlock(
            set_id=header.body.set.set_id,
            index=0,
            count=header.body.set.count,
            digests=(bytes(32), *header.body.set.digests[1:]),
        )
        forged = dataclasses.replace(header, body=dataclasses.replace(header.body, set=edited))
        before = sealed.read_bytes()
        with pytest.raises(AdminError) as refused:
            admin.rewrap(forged)
        assert refused.value.code == "header_invalid"
        assert sealed.read_bytes() == before

        admin.rotate_key("big")
    result = CliRunner().invoke(cli, ["rewrap", str(sealed), *_keyserver_args(server, token_file)])
    assert result.exit_code == 0, result.output
    assert sealtorch.inspect_sealed(sealed).key_version == 2
    assert [p.read_bytes() for p in set_paths(sealed, info.file_count)[1:]] == others
    with server.client() as client:
        loaded = sealtorch.load_state_dict(sealed, key=client)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
