"""Loading a sealed Hugging Face model is loading it with ``from_pretrained``: every parameter,
every buffer (persistent or not: position ids, causal masks...), every tie and the module tree
are identical, and the weights are the decrypted buffer itself, not copies. Also the staged
device path (pinned staging buffer, chunk by chunk), run on the CPU here and on a GPU where
there is one, and its refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from unittest import mock

import pytest
import torch

import sealtorch
from _fixtures.hf import tiny_bert, tiny_gpt2
from sealtorch.errors import ConfigError, IntegrityError
from sealtorch.keys import DataKey, encode_key
from sealtorch.payloads.device import decrypt_to_device, resolve_device, tensors_on_device
from sealtorch.payloads.hf_arch import load_transformers_model
from sealtorch.sealed.reader import SealedReader

transformers = pytest.importorskip("transformers")

KEY = DataKey(bytes(range(32)))
CUDA = torch.cuda.is_available()


_gpt2 = partial(tiny_gpt2, seed=3, vocab_size=96, n_positions=48, max_shard_size="40KB")

MODELS: dict[str, tuple[Callable[[Path], object], type]] = {
    "gpt2": (_gpt2, transformers.AutoModelForCausalLM),
    "bert": (
        partial(tiny_bert, seed=4, max_position_embeddings=40),
        transformers.AutoModelForSequenceClassification,
    ),
}


@pytest.fixture(params=sorted(MODELS))
def sealed(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path, type]:
    build, auto = MODELS[request.param]
    plain = tmp_path / "plain"
    build(plain)
    path = tmp_path / "model.sealed"
    sealtorch.encrypt_model(plain, path, model_id=request.param, key=KEY, chunk_size=4096)
    return plain, path, auto


def _ties(model: torch.nn.Module) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        groups.setdefault(id(tensor), set()).add(name)
    return {frozenset(names) for names in groups.values() if len(names) > 1}


def _assert_same_model(loaded: torch.nn.Module, plain: torch.nn.Module) -> None:
    assert type(loaded) is type(plain)
    assert [n for n, _ in loaded.named_modules()] == [n for n, _ in plain.named_modules()]
    for kind in ("named_parameters", "named_buffers"):
        mine = dict(getattr(loaded, kind)(remove_duplicate=False))
        theirs = dict(getattr(plain, kind)(remove_duplicate=False))
        assert list(mine) == list(theirs), kind
        for name, tensor in theirs.items():
            other = mine[name].cpu()
            assert (other.dtype, other.shape) == (tensor.dtype, tensor.shape), name
            assert torch.equal(other, tensor), name
            assert other.requires_grad is False
    persistent = {
        name
        for module_name, module in plain.named_modules()
        for name in (f"{module_name}.{b}" if module_name else b for b in module._buffers)
        if name.rsplit(".", 1)[-1] not in module._non_persistent_buffers_set
    }
    assert set(loaded.state_dict()) == set(plain.state_dict())
    assert persistent <= set(plain.state_dict())
    assert _ties(loaded) == _ties(plain)
    assert loaded.training is plain.training is False
    mine, theirs = loaded.config.to_dict(), plain.config.to_dict()
    del mine["_name_or_path"], theirs["_name_or_path"]  # the plain directory's path
    assert mine == theirs


def test_the_same_model_as_from_pretrained(sealed: tuple[Path, Path, type]) -> None:
    plain_dir, path, auto = sealed
    plain = auto.from_pretrained(plain_dir).eval().requires_grad_(False)
    loaded = sealtorch.load_model(path, key=KEY)
    _assert_same_model(loaded, plain)
    if isinstance(loaded, transformers.GPT2LMHeadModel):
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_the_weights_are_the_decrypted_buffer(sealed: tuple[Path, Path, type]) -> None:
    _, path, _ = sealed
    loaded = sealtorch.load_model(path, key=KEY)
    size = sealtorch.inspect_sealed(path).plaintext_size
    tensors = dict(loaded.named_parameters())
    starts = [t.data_ptr() for t in tensors.values()]
    low = min(starts)
    # one buffer of the plaintext's size holds them all: nothing was copied
    assert max(t.data_ptr() + t.nbytes for t in tensors.values()) - low <= size
    assert all(p % 64 == 0 for p in starts)


def _staged(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    with SealedReader(path) as reader:
        placed = decrypt_to_device(reader, reader.content_key(KEY), device, threads=3)
    assert placed is not None
    tensors = tensors_on_device(placed)
    assert placed.host.closed
    return tensors


def test_staged_path_gives_the_same_tensors(sealed: tuple[Path, Path, type]) -> None:
    _, path, _ = sealed
    expected = sealtorch.load_state_dict(path, key=KEY)
    staged = _staged(path, torch.device("cpu"))
    assert list(staged) == list(expected)
    for name, tensor in expected.items():
        assert staged[name].dtype == tensor.dtype, name
        assert torch.equal(staged[name], tensor), name
    bases = {t.untyped_storage().data_ptr() for t in staged.values() if t.numel()}
    assert len(bases) == 1  # views of one device buffer


def test_staged_path_keeps_the_host_copy_sparse(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    _gpt2(plain)
    path = tmp_path / "m.sealed"
    sealtorch.encrypt_model(plain, path, model_id="gpt2", key=KEY, chunk_size=4096)
    with SealedReader(path) as reader:
        placed = decrypt_to_device(reader, reader.content_key(KEY), torch.device("cpu"))
    assert placed is not None
    manifest = placed.manifest
    host = bytes(placed.host)
    data = placed.data.numpy().tobytes()
    front = manifest.payload_offset + 8
    files = manifest.payload_offset + manifest.payload_size
    assert host[:front] == data[:front]
    assert host[files:] == data[files:]
    # the tensor data, beyond the chunks that also hold the header, never went to the host
    middle = slice(front + 2 * 4096, files - 4096)
    assert not host[middle].strip(b"\x00")
    assert data[middle].strip(b"\x00")
    tensors_on_device(placed)


def test_staged_path_refuses_a_tampered_chunk(sealed: tuple[Path, Path, type]) -> None:
    _, path, _ = sealed
    files = sorted(path.parent.glob("model.sealed*"))
    victim = files[-1]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        _staged(path, torch.device("cpu"))


def test_device_map_path_builds_the_same_model(sealed: tuple[Path, Path, type]) -> None:
    plain_dir, path, auto = sealed
    loaded = sealtorch.api.load_sealed_model(path, key=KEY)
    config = loaded.files["config.json"]
    staged = _staged(path, torch.device("cpu"))
    model = load_transformers_model(
        f"transformers:{type(loaded.module).__name__}",
        bytes(config),
        staged,
        device=torch.device("cpu"),
    )
    _assert_same_model(model, auto.from_pretrained(plain_dir).eval().requires_grad_(False))


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_refused_without_cuda(sealed: tuple[Path, Path, type], device: str) -> None:
    _, path, _ = sealed
    with pytest.raises(ConfigError, match="no CUDA device") as caught:
        sealtorch.load_model(path, key=KEY, device=device)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("device", ["tpu", "mps", "nonsense"])
def test_unknown_devices_refused(device: str) -> None:
    with pytest.raises(ConfigError, match="cpu, cuda or cuda:N"):
        resolve_device(device)


def test_cpu_is_the_host_path() -> None:
    assert resolve_device("cpu") is None
    assert resolve_device(None) is None


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_load_onto_the_gpu(sealed: tuple[Path, Path, type]) -> None:
    plain_dir, path, auto = sealed
    loaded = sealtorch.load_model(path, key=KEY, device="cuda")
    assert {t.device.type for t in loaded.state_dict().values()} == {"cuda"}
    assert {b.device.type for b in loaded.buffers()} == {"cuda"}
    plain = auto.from_pretrained(plain_dir).eval().requires_grad_(False)
    _assert_same_model(loaded, plain)
    on_gpu = plain.to("cuda")
    ids = torch.tensor([[1, 5, 7, 9]], device="cuda")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, on_gpu(ids).logits)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_staged_path_refuses_a_tampered_chunk(sealed: tuple[Path, Path, type]) -> None:
    _, path, _ = sealed
    victim = min(path.parent.glob("model.sealed*"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        sealtorch.load_model(path, key=KEY, device="cuda")


def test_environment_thread_setting_is_used(
    sealed: tuple[Path, Path, type], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path, _ = sealed
    expected = sealtorch.load_state_dict(path, key=KEY)
    for threads in ("1", "4"):
        monkeypatch.setenv("SEALTORCH_DECRYPT_THREADS", threads)
        again = sealtorch.load_state_dict(path, key=KEY)
        assert all(torch.equal(again[n], t) for n, t in expected.items())
    monkeypatch.setenv("SEALTORCH_DECRYPT_THREADS", "0")
    with pytest.raises(ConfigError):
        sealtorch.load_state_dict(path, key=KEY)
    del os.environ["SEALTORCH_DECRYPT_THREADS"]


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_serve_refuses_cuda_without_cuda(sealed: tuple[Path, Path, type], tmp_path: Path) -> None:
    _, path, _ = sealed
    key_file = tmp_path / "model.key"
    key_file.write_text(encode_key(KEY) + "\n")
    key_file.chmod(0o600)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "sealtorch", "serve", str(path)),
            *("--key-file", str(key_file), "--device", "cuda", "--port", "0"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert result.stdout == ""  # never listened
    lines = result.stderr.strip().splitlines()
    assert lines == [
        (
            "error: device 'cuda' asked for, but no CUDA device is available here "
            "(torch.cuda.is_available() is False)"
        )
    ]


def test_serve_start_reports_progress_per_model(
    sealed: tuple[Path, Path, type], caplog: pytest.LogCaptureFixture
) -> None:
    """What `sealtorch serve` sets up: each model source loads with its own progress reporter
    (log lines when stderr is not a terminal), named after the model."""
    from sealtorch.cli import _progress
    from sealtorch.serving.server import SealedModelSource

    _, path, _ = sealed
    made: list[_progress._Progress] = []

    def factory(name: str) -> _progress._Progress:
        made.append(_progress._Progress(f"decrypting {name}", quiet=False, terminal=False))
        return made[-1]

    source = SealedModelSource(path, key=KEY, name="tiny", progress=factory)
    with (
        mock.patch.object(_progress, "_PROGRESS_THRESHOLD", 0),
        caplog.at_level("INFO", logger="sealtorch.progress"),
    ):
        source.load(max_images=1)
    records = [r for r in caplog.records if r.name == "sealtorch.progress"]
    assert len(made) == 1
    assert records
    assert records[-1].percent == 100  # type: ignore[attr-defined]
    assert records[-1].op == "decrypting tiny"  # type: ignore[attr-defined]
    sealtorch.load_model(path, key=KEY)  # nothing set process-wide: nothing more reported
    assert len([r for r in caplog.records if r.name == "sealtorch.progress"]) == len(records)


def test_a_finished_progress_bar_closes_itself() -> None:
    from sealtorch.cli._progress import _Progress

    bar = _Progress("decrypting m", quiet=False, terminal=True)
    bar(1 << 29, 1 << 30)
    assert bar.bar_shown
    bar(1 << 30, 1 << 30)  # done: the bar stops without stop()
    assert bar._bar is None
    bar(1 << 30, 1 << 30)  # nothing drawn again
    assert bar._bar is None
    bar.stop()
