from __future__ import annotations

import io
import mmap
import warnings
from pathlib import Path

import pytest
import torch
from arch_factories import tiny_mlp
from safetensors.torch import save_file

from sealtorch.errors import ConfigError, PayloadError, UnsafePickleError
from sealtorch.payloads.sources import Payload, detect_file_kind, prepare_payload
from sealtorch.payloads.tensors import tensors_from_buffer


def _bytes(payload: Payload) -> bytes:
    return b"".join(bytes(piece) for piece in payload.stream())


def _tensors(payload: Payload) -> dict[str, torch.Tensor]:
    data = _bytes(payload)
    buffer = mmap.mmap(-1, len(data))
    buffer[:] = data
    return tensors_from_buffer(buffer, offset=0, size=len(data), align=payload.align)


def _scripted(module: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
        traced: torch.jit.ScriptModule = torch.jit.trace(module, example)
    return traced


def _save_script(module: torch.jit.ScriptModule, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(module, str(path))


class Marker:
    """A pickled object whose unpickling would create a file: arbitrary code execution."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.path,))


@pytest.fixture
def model() -> torch.nn.Module:
    return tiny_mlp().eval()


def test_state_dict_mapping_and_module(model: torch.nn.Module) -> None:
    for source in (model, model.state_dict()):
        payload = prepare_payload(source)
        assert payload.kind == "safetensors"
        assert payload.tensor_count == 4
        assert payload.align == 64
        loaded = _tensors(payload)
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded[name], tensor)
            assert loaded[name].data_ptr() % 64 == 0, name


def test_file_kinds_are_detected_by_content(tmp_path: Path, model: torch.nn.Module) -> None:
    save_file(model.state_dict(), tmp_path / "weights.bin")
    torch.save(model.state_dict(), tmp_path / "zip.weights")
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    example = torch.randn(1, 8)
    _save_script(_scripted(model, example), tmp_path / "scripted.pt")
    torch.export.save(torch.export.export(model, (example,)), tmp_path / "program.bin")
    assert detect_file_kind(tmp_path / "weights.bin") == "safetensors"
    assert detect_file_kind(tmp_path / "zip.weights") == "torch_zip"
    assert detect_file_kind(tmp_path / "legacy.pt") == "torch_legacy"
    assert detect_file_kind(tmp_path / "scripted.pt") == "torchscript"
    assert detect_file_kind(tmp_path / "program.bin") == "torch_export"
    for name, kind in [
        ("weights.bin", "safetensors"),
        ("zip.weights", "safetensors"),
        ("legacy.pt", "safetensors"),
        ("scripted.pt", "torchscript"),
        ("program.bin", "torch_export"),
    ]:
        payload = prepare_payload(tmp_path / name)
        assert payload.kind == kind, name
        assert len(_bytes(payload)) == payload.size
    script = prepare_payload(tmp_path / "scripted.pt")
    assert _bytes(script) == (tmp_path / "scripted.pt").read_bytes()


def test_unrecognised_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello world")
    with pytest.raises(PayloadError, match="cannot tell what"):
        prepare_payload(tmp_path / "notes.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_payload(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="is a directory"):
        prepare_payload(tmp_path)
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(PayloadError, match="damaged"):
        prepare_payload(tmp_path / "broken.pt")
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "not a model")
    with pytest.raises(PayloadError, match="not a PyTorch file"):
        prepare_payload(tmp_path / "other.zip")


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_would_run_code_is_refused(tmp_path: Path, legacy: bool) -> None:
    """The attacker's .pt: unpickling it creates a marker file. sealtorch must never do so."""
    proof = tmp_path / "proof-it-runs"
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save(
        {"weight": torch.ones(2), "payload": Marker(proof)},
        evil,
        _use_new_zipfile_serialization=not legacy,
    )
    # The file is a real exploit: a full unpickle runs the payload.
    torch.load(evil, weights_only=False)
    assert proof.exists()
    torch.save(
        {"weight": torch.ones(2), "payload": Marker(marker)},
        evil,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(UnsafePickleError, match="could run arbitrary code") as info:
        prepare_payload(evil)
    assert "state_dict()" in str(info.value)  # tells the user how to fix it
    assert not marker.exists()


def test_checkpoint_dict_suggests_state_dict_key(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "model": model.state_dict(), "lr": 0.1}, path)
    with pytest.raises(PayloadError, match="--state-dict-key model"):
        prepare_payload(path)
    payload = prepare_payload(path, state_dict_key="model")
    assert payload.tensor_count == 4
    with pytest.raises(PayloadError, match="no entry 'state_dict'"):
        prepare_payload(path, state_dict_key="state_dict")


def test_non_tensor_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PayloadError, match="not tensors"):
        prepare_payload({"a": torch.ones(1), "b": "text"})
    path = tmp_path / "list.pt"
    torch.save({"model": [torch.ones(1)]}, path)
    with pytest.raises(PayloadError, match="holds a list, not a state_dict"):
        prepare_payload(path, state_dict_key="model")
    torch.save([torch.ones(1)], path)
    with pytest.raises(PayloadError, match="holds a list, not a state_dict"):
        prepare_payload(path)


def test_wrong_source_types() -> None:
    with pytest.raises(ConfigError, match="cannot seal a int"):
        prepare_payload(3)
    with pytest.raises(ConfigError, match="not an open file"):
        prepare_payload(io.BytesIO(b""))
    with pytest.raises(ConfigError, match="state_dict_key"):
        prepare_payload(tiny_mlp(), state_dict_key="model")


def test_state_dict_key_only_for_checkpoints(tmp_path: Path, model: torch.nn.Module) -> None:
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match="checkpoints only"):
        prepare_payload(tmp_path / "m.safetensors", state_dict_key="model")


def test_script_module_and_exported_program_objects(model: torch.nn.Module) -> None:
    example = torch.randn(1, 8)
    script = prepare_payload(_scripted(model, example))
    assert script.kind == "torchscript"
    assert _bytes(script)[:2] == b"PK"
    program = prepare_payload(torch.export.export(model, (example,)))
    assert program.kind == "torch_export"


def test_programs_exported_in_training_mode_are_refused(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    program = torch.export.export(model, (torch.randn(2, 4),))
    with pytest.raises(PayloadError, match=r"training mode.*model\.eval\(\)"):
        prepare_payload(program)
    torch.export.save(program, tmp_path / "train.pt2")
    with pytest.raises(PayloadError, match="training mode"):
        prepare_payload(tmp_path / "train.pt2")
