"""The Python API end to end: seal, inspect, load, decrypt, rewrap - and the attacker's side."""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch

import sealtorch
from sealtorch.api import SealedInfo, load_sealed_model
from sealtorch.errors import (
    INTEGRITY_MESSAGE,
    ConfigError,
    IntegrityError,
    KeyAccessError,
    PayloadError,
)
from sealtorch.keys import DataKey, StaticKey, write_key_file
from sealtorch.sealed.keywrap import LocalKeyWrapper
from sealtorch.sealed.reader import SealedReader

sys.path.insert(0, str(Path(__file__).parent / "payloads"))
from arch_factories import tiny_mlp

KEY = DataKey(bytes(range(100, 132)))
NEW_KEY = DataKey(bytes(range(200, 232)))
#: The test factory these tests seal with; loading allows it explicitly, as a deployment would.
MLP_ARCH = "arch_factories:tiny_mlp"


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_mlp().eval()


@pytest.fixture
def sealed_mlp(tmp_path: Path, mlp: torch.nn.Module) -> Path:
    path = tmp_path / "mlp.sealed"
    sealtorch.encrypt_model(
        mlp,
        path,
        model_id="mlp",
        key=KEY,
        arch="arch_factories:tiny_mlp",
        metadata={"owner": "secret-team-name"},
        labels=["secret-label-a", "secret-label-b", "secret-label-c"],
        chunk_size=64,
    )
    return path


def test_state_dict_round_trip_all_dtypes_in_one_buffer(tmp_path: Path) -> None:
    sd = {
        "f32": torch.randn(5, 3),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "i8": torch.randint(-128, 127, (9,), dtype=torch.int8),
        "i16": torch.randint(-1000, 1000, (3,), dtype=torch.int16),
        "i32": torch.randint(-(10**6), 10**6, (3,), dtype=torch.int32),
        "i64": torch.tensor(2**40),
        "u8": torch.randint(0, 255, (4, 4), dtype=torch.uint8),
        "bool": torch.rand(6) > 0.5,
        "empty": torch.empty(0, 3),
        "non_contiguous": torch.randn(4, 6).t(),
    }
    path = tmp_path / "sd.sealed"
    info = sealtorch.encrypt_model(sd, path, model_id="sd", key=KEY, chunk_size=256)
    assert isinstance(info, SealedInfo)
    assert info.path == path
    loaded = sealtorch.load_state_dict(path, key=KEY)
    assert list(loaded) == list(sd)
    for name, tensor in sd.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name
    pointers = sorted(t.data_ptr() for t in loaded.values() if t.numel())
    assert pointers[-1] - pointers[0] < info.plaintext_size  # one buffer, no copies


def test_torchscript_and_export_payloads(tmp_path: Path, mlp: torch.nn.Module) -> None:
    example = torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
        scripted = torch.jit.trace(mlp, example)
    sealtorch.encrypt_model(scripted, tmp_path / "ts.sealed", model_id="ts", key=KEY)
    program = torch.export.export(mlp, (example,))
    sealtorch.encrypt_model(program, tmp_path / "ep.sealed", model_id="ep", key=KEY)
    for name in ("ts", "ep"):
        model = sealtorch.load_model(tmp_path / f"{name}.sealed", key=KEY)
        assert not model.training
        with torch.inference_mode():
            assert torch.equal(model(example), mlp(example)), name
        with pytest.raises(PayloadError, match=r"use sealtorch\.load_model"):
            sealtorch.load_state_dict(tmp_path / f"{name}.sealed", key=KEY)
        with pytest.raises(ConfigError, match="carries its own architecture"):
            sealtorch.load_model(tmp_path / f"{name}.sealed", key=KEY, arch="timm:resnet18")
    # the owner's decrypt writes files the plain tools load
    sealtorch.decrypt_model(tmp_path / "ts.sealed", tmp_path / "plain.pt", key=KEY)
    sealtorch.decrypt_model(tmp_path / "ep.sealed", tmp_path / "plain.pt2", key=KEY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reloaded = torch.jit.load(tmp_path / "plain.pt")
    assert torch.equal(reloaded(example), mlp(example))
    assert torch.equal(torch.export.load(tmp_path / "plain.pt2").module()(example), mlp(example))


def _memfds() -> list[str]:
    found = []
    for entry in Path("/proc/self/fd").iterdir():
        try:
            target = str(entry.readlink())
        except OSError:  # closed while listing (the listing's own descriptor)
            continue
        if target.startswith("/memfd:"):
            found.append(target)
    return found


@pytest.mark.parametrize("memfd", ["available", "missing", "refused"])
def test_programs_load_through_memory_only(
    tmp_path: Path, mlp: torch.nn.Module, memfd: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Programs reach PyTorch's loaders through an anonymous in-memory file (never a path in a
    # file system), or as bytes where there are no memfds (other systems, library OSes).
    example = torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.trace(mlp, example)
    sealtorch.encrypt_model(scripted, tmp_path / "ts.sealed", model_id="ts", key=KEY)
    sealtorch.encrypt_model(
        torch.export.export(mlp, (example,)), tmp_path / "ep.sealed", model_id="ep", key=KEY
    )
    created: list[int] = []
    if memfd == "available":
        real = os.memfd_create

        def spy(name: str, flags: int = 0) -> int:
            fd = real(name, flags)
            created.append(fd)
            return fd

        monkeypatch.setattr(os, "memfd_create", spy)
    elif memfd == "missing":
        monkeypatch.delattr(os, "memfd_create")
    else:

        def refuse(name: str, flags: int = 0) -> int:
            raise OSError(errno.ENOSYS, "memfd_create is not implemented")

        monkeypatch.setattr(os, "memfd_create", refuse)
    before = sorted(tmp_path.iterdir())
    for name in ("ts", "ep"):
        model = sealtorch.load_model(tmp_path / f"{name}.sealed", key=KEY)
        with torch.inference_mode():
            assert torch.equal(model(example), mlp(example)), name
    assert len(created) == (2 if memfd == "available" else 0)
    assert _memfds() == []  # closed once loaded
    assert sorted(tmp_path.iterdir()) == before  # nothing written next to the sealed files


def test_sealing_rejects_arch_for_programs(tmp_path: Path, mlp: torch.nn.Module) -> None:
    program = torch.export.export(mlp, (torch.randn(1, 8),))
    with pytest.raises(ConfigError, match="state_dicts only"):
        sealtorch.encrypt_model(
            program, tmp_path / "x.sealed", model_id="x", key=KEY, arch="timm:resnet18"
        )
    assert _listing(tmp_path) == []


def test_load_model_needs_an_architecture(tmp_path: Path, mlp: torch.nn.Module) -> None:
    path = tmp_path / "noarch.sealed"
    sealtorch.encrypt_model(mlp.state_dict(), path, model_id="noarch", key=KEY)
    with pytest.raises(PayloadError, match="no architecture reference"):
        sealtorch.load_model(path, key=KEY)
    model = sealtorch.load_model(path, key=KEY, arch="arch_factories:tiny_mlp")
    x = torch.randn(2, 8)
    assert torch.equal(model(x), mlp(x))


def test_sealed_factories_load_only_where_allowed(sealed_mlp: Path, mlp: torch.nn.Module) -> None:
    with pytest.raises(PayloadError, match=f"not allowed on this machine.*--allow-arch {MLP_ARCH}"):
        sealtorch.load_model(sealed_mlp, key=KEY)
    model = sealtorch.load_model(sealed_mlp, key=KEY, allowed_archs=[MLP_ARCH])
    x = torch.randn(2, 8)
    assert torch.equal(model(x), mlp(x))
    with pytest.raises(ConfigError, match="always allowed"):
        sealtorch.load_model(sealed_mlp, key=KEY, allowed_archs=["timm:resnet18"])


@pytest.mark.parametrize(
    ("ref", "kwargs"),
    [
        ("os:system", {"command": "touch MARKER"}),
        ("subprocess:run", {"args": ["touch", "MARKER"]}),
        ("builtins:exec", {"source": "open('MARKER', 'w')"}),
        ("marker_module:build", {}),
    ],
)
def test_a_sealed_file_cannot_choose_the_code_that_loading_runs(
    ref: str,
    kwargs: dict[str, object],
    tmp_path: Path,
    mlp: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 12: ``--arch os:system --arch-kwargs {"command": ...} --skip-arch-check`` ran the
    command inside load_model. Whoever holds the key can seal that; loading must refuse it."""
    marker = tmp_path / "marker"
    monkeypatch.setenv("SEALTORCH_TEST_MARKER", str(marker))  # marker_module writes it
    sys.modules.pop("marker_module", None)
    given = json.loads(json.dumps(kwargs).replace("MARKER", str(marker)))
    path = tmp_path / "hostile.sealed"
    sealtorch.encrypt_model(
        mlp.state_dict(), path, model_id="h", key=KEY, arch=ref, arch_kwargs=given, check_arch=False
    )
    for allowed in ([], [MLP_ARCH]):
        with pytest.raises(PayloadError, match=f"{ref} is not allowed.*--allow-arch {ref}"):
            sealtorch.load_model(path, key=KEY, allowed_archs=allowed)
    assert not marker.exists()
    assert "marker_module" not in sys.modules


def test_architecture_is_checked_when_sealing(tmp_path: Path, mlp: torch.nn.Module) -> None:
    with pytest.raises(PayloadError, match="does not match architecture"):
        sealtorch.encrypt_model(
            mlp, tmp_path / "m.sealed", model_id="m", key=KEY, arch="torchvision:resnet18"
        )
    assert _listing(tmp_path) == []
    sealtorch.encrypt_model(
        mlp,
        tmp_path / "m.sealed",
        model_id="m",
        key=KEY,
        arch="torchvision:resnet18",
        check_arch=False,
    )
    with pytest.raises(PayloadError, match="does not match torchvision:resnet18"):
        sealtorch.load_model(tmp_path / "m.sealed", key=KEY)


def test_tensors_outlive_a_failed_load(tmp_path: Path, mlp: torch.nn.Module) -> None:
    """Regression: a failure after the tensors exist must not unmap the buffer under them."""
    path = tmp_path / "m.sealed"
    sealtorch.encrypt_model(mlp, path, model_id="m", key=KEY)
    with pytest.raises(PayloadError, match="does not match") as info:
        sealtorch.load_model(path, key=KEY, arch="torchvision:resnet18")
    survivors = []
    traceback = info.value.__traceback__
    while traceback is not None:
        for value in traceback.tb_frame.f_locals.values():
            if isinstance(value, dict):
                survivors += [v for v in value.values() if isinstance(v, torch.Tensor)]
        traceback = traceback.tb_next
    assert survivors
    assert all(torch.isfinite(t.float()).all() for t in survivors)  # readable, not unmapped


def test_load_sealed_model_returns_the_manifest(sealed_mlp: Path) -> None:
    loaded = load_sealed_model(sealed_mlp, key=KEY, allowed_archs=[MLP_ARCH])
    assert loaded.manifest.labels == ("secret-label-a", "secret-label-b", "secret-label-c")
    assert loaded.manifest.metadata == {"owner": "secret-team-name"}
    assert loaded.info.model_id == "mlp"


def test_sealed_file_reveals_only_the_public_header(sealed_mlp: Path, mlp: torch.nn.Module) -> None:
    blob = sealed_mlp.read_bytes()
    for secret in [
        *mlp.state_dict(),
        "arch_factories",
        "tiny_mlp",
        "secret-team-name",
        "secret-label-a",
        "safetensors",
        "F32",
    ]:
        assert secret.encode() not in blob, secret
    info = sealtorch.inspect_sealed(sealed_mlp)
    assert info.model_id == "mlp"
    assert info.file_size == len(blob)
    assert set(info.as_dict()) == {
        "model_id",
        "key_version",
        "format_version",
        "suite",
        "chunk_size",
        "chunk_count",
        "plaintext_size",
        "file_size",
    }
    assert "model_id=mlp" in str(info)


def test_tampered_files_return_nothing(sealed_mlp: Path, tmp_path: Path) -> None:
    blob = sealed_mlp.read_bytes()
    rng = random.Random(5)
    target = tmp_path / "tampered.sealed"
    for position in [20, 100, len(blob) // 2, len(blob) - 1, *rng.sample(range(16, len(blob)), 8)]:
        data = bytearray(blob)
        data[position] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
        for load in (sealtorch.load_state_dict, sealtorch.load_model):
            with pytest.raises(IntegrityError) as info:
                load(target, key=KEY)
            assert str(info.value) == INTEGRITY_MESSAGE
    target.write_bytes(blob[:-20])
    with pytest.raises(IntegrityError):
        sealtorch.load_model(target, key=KEY)


def test_wrong_key_and_restricted_providers(sealed_mlp: Path) -> None:
    with pytest.raises(IntegrityError):
        sealtorch.load_model(sealed_mlp, key=NEW_KEY)
    with pytest.raises(IntegrityError):
        sealtorch.load_model(sealed_mlp, key=NEW_KEY.material)
    with pytest.raises(KeyAccessError, match="for model 'other'"):
        sealtorch.load_model(sealed_mlp, key=StaticKey(KEY, model_id="other"))
    assert sealtorch.load_state_dict(sealed_mlp, key=StaticKey(KEY, model_id="mlp"))


def test_key_file_paths(tmp_path: Path, mlp: torch.nn.Module) -> None:
    key_path = tmp_path / "model.key"
    key = write_key_file(key_path)
    sealtorch.encrypt_model(mlp, tmp_path / "m.sealed", model_id="m", key=key_path)
    assert sealtorch.load_state_dict(tmp_path / "m.sealed", key=str(key_path))
    assert sealtorch.load_state_dict(tmp_path / "m.sealed", key=key)


def test_decrypt_model_writes_plain_safetensors(sealed_mlp: Path, mlp: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    out = sealed_mlp.parent / "plain.safetensors"
    manifest = sealtorch.decrypt_model(sealed_mlp, out, key=KEY)
    assert manifest.kind == "safetensors"
    assert manifest.arch == "arch_factories:tiny_mlp"
    assert out.stat().st_mode & 0o777 == 0o600
    loaded = load_file(out)
    for name, tensor in mlp.state_dict().items():
        assert torch.equal(loaded[name], tensor)
    with pytest.raises(ConfigError, match="already exists"):
        sealtorch.decrypt_model(sealed_mlp, out, key=KEY)
    sealtorch.decrypt_model(sealed_mlp, out, key=KEY, overwrite=True)


def test_decrypt_leaves_no_partial_output(sealed_mlp: Path, tmp_path: Path) -> None:
    """Chunks are 64 bytes: a flip near the end fails after most of the payload streamed out."""
    blob = sealed_mlp.read_bytes()
    for position in (len(blob) - 5, len(blob) // 2):
        data = bytearray(blob)
        data[position] ^= 0x40
        broken = tmp_path / "broken.sealed"
        broken.write_bytes(bytes(data))
        out_dir = tmp_path / "out"
        out_dir.mkdir(exist_ok=True)
        with pytest.raises(IntegrityError):
            sealtorch.decrypt_model(broken, out_dir / "plain.safetensors", key=KEY)
        assert _listing(out_dir) == []
    # truncated and wrong key: same
    broken.write_bytes(blob[:-1])
    with pytest.raises(IntegrityError):
        sealtorch.decrypt_model(broken, out_dir / "plain.safetensors", key=KEY)
    with pytest.raises(IntegrityError):
        sealtorch.decrypt_model(sealed_mlp, out_dir / "plain.safetensors", key=NEW_KEY)
    assert _listing(out_dir) == []


def test_rewrap_keeps_the_body_and_retires_the_old_key(sealed_mlp: Path) -> None:
    before = sealed_mlp.read_bytes()
    with SealedReader(sealed_mlp) as reader:
        body_offset = reader.body_offset
        old_body = reader.header.body
    info = sealtorch.rewrap(sealed_mlp, key=KEY, new_key=NEW_KEY)
    after = sealed_mlp.read_bytes()
    with SealedReader(sealed_mlp) as reader:
        new_offset = reader.body_offset
        assert reader.header.body == old_body
    assert after[new_offset:] == before[body_offset:]
    assert info.key_version == 2
    assert sealtorch.inspect_sealed(sealed_mlp).key_version == 2
    with pytest.raises(IntegrityError):
        sealtorch.load_state_dict(sealed_mlp, key=KEY)
    assert sealtorch.load_state_dict(sealed_mlp, key=NEW_KEY)
    assert _listing(sealed_mlp.parent) == ["mlp.sealed"]


def test_rewrap_in_place_follows_symlinks(sealed_mlp: Path) -> None:
    link = sealed_mlp.parent / "current.sealed"
    link.symlink_to(sealed_mlp.name)
    sealtorch.rewrap(link, key=KEY, new_key=NEW_KEY)
    assert link.is_symlink()
    with pytest.raises(IntegrityError):  # the real file was rotated, not just the link
        sealtorch.load_state_dict(sealed_mlp, key=KEY)
    assert sealtorch.load_state_dict(sealed_mlp, key=NEW_KEY)


def test_rewrap_to_another_file_with_explicit_version(sealed_mlp: Path) -> None:
    before = sealed_mlp.read_bytes()
    target = sealed_mlp.parent / "rotated.sealed"
    info = sealtorch.rewrap(
        sealed_mlp, key=KEY, new_key=NEW_KEY, new_key_version=9, destination=target
    )
    assert info.key_version == 9
    assert sealed_mlp.read_bytes() == before
    assert sealtorch.load_state_dict(target, key=NEW_KEY)
    with pytest.raises(ConfigError, match="already exists"):
        sealtorch.rewrap(sealed_mlp, key=KEY, new_key=NEW_KEY, destination=target)


def test_rewrap_with_wrong_old_key_changes_nothing(sealed_mlp: Path) -> None:
    before = sealed_mlp.read_bytes()
    with pytest.raises(IntegrityError):
        sealtorch.rewrap(sealed_mlp, key=NEW_KEY, new_key=NEW_KEY)
    assert sealed_mlp.read_bytes() == before
    assert _listing(sealed_mlp.parent) == ["mlp.sealed"]


def test_content_key_wrapper_as_key(tmp_path: Path, mlp: torch.nn.Module) -> None:
    wrapper = LocalKeyWrapper(KEY, key_version=5)
    info = sealtorch.encrypt_model(mlp, tmp_path / "m.sealed", model_id="m", key=wrapper)
    assert info.key_version == 5
    assert sealtorch.load_state_dict(tmp_path / "m.sealed", key=KEY)
    with pytest.raises(ConfigError, match="key version 5, not 6"):
        sealtorch.encrypt_model(
            mlp, tmp_path / "n.sealed", model_id="n", key=wrapper, key_version=6
        )


def test_encrypt_overwrite_and_progress(tmp_path: Path, mlp: torch.nn.Module) -> None:
    path = tmp_path / "m.sealed"
    calls: list[tuple[int, int]] = []
    info = sealtorch.encrypt_model(
        mlp, path, model_id="m", key=KEY, chunk_size=64, progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (info.plaintext_size, info.plaintext_size)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    with pytest.raises(ConfigError, match="already exists"):
        sealtorch.encrypt_model(mlp, path, model_id="m", key=KEY)
    sealtorch.encrypt_model(mlp, path, model_id="m2", key=KEY, overwrite=True)
    assert sealtorch.inspect_sealed(path).model_id == "m2"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model_id": "bad id"}, "invalid model id"),
        ({"chunk_size": 1000}, "power of two"),
        ({"key_version": 0}, "key version"),
        ({"arch": "resnet"}, "architecture reference"),
    ],
)
def test_invalid_arguments_fail_before_writing(
    tmp_path: Path, mlp: torch.nn.Module, kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"model_id": "m", "key": KEY, **kwargs}
    with pytest.raises(ConfigError, match=message):
        sealtorch.encrypt_model(mlp, tmp_path / "m.sealed", **arguments)  # type: ignore[arg-type]
    assert _listing(tmp_path) == []


def test_keys_never_reach_logs_or_errors(
    tmp_path: Path, mlp: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key_path = tmp_path / "k.key"
    key_path.write_text(
        "sealtorch-data-key-v1:" + base64.urlsafe_b64encode(KEY.material).decode().rstrip("=")
    )
    key_path.chmod(0o644)  # also provokes the permissions warning
    path = tmp_path / "m.sealed"
    sealtorch.encrypt_model(mlp, path, model_id="m", key=key_path, arch=MLP_ARCH)
    sealtorch.load_model(path, key=key_path, allowed_archs=[MLP_ARCH])
    sealtorch.rewrap(path, key=key_path, new_key=NEW_KEY)
    sealtorch.decrypt_model(path, tmp_path / "out.safetensors", key=NEW_KEY)
    errors = []
    for attempt in (lambda: sealtorch.load_model(path, key=KEY),):
        try:
            attempt()
        except IntegrityError as exc:
            errors.append(f"{exc!r} {exc}")
    assert "readable by other users" in caplog.text
    text = caplog.text + " ".join(errors)
    for key in (KEY, NEW_KEY):
        for form in (
            key.material.hex(),
            base64.urlsafe_b64encode(key.material).decode().rstrip("="),
            base64.b64encode(key.material).decode(),
            repr(key.material),
        ):
            assert form not in text
