"""The loading guarantee: every tensor 64-byte aligned, outputs bit-identical to plain PyTorch.

What is guaranteed (README § Bit-exact outputs): a sealed model and the plain model built from
the same weights give bit-identical outputs for the same input *in the same process, with the
same number of threads and the same batch*. Both sides run the same kernels only if their
tensors have the same alignment, so every loaded tensor is 64-byte aligned like PyTorch's own
allocations. What is not guaranteed - by PyTorch itself - is equality across thread counts or
batch compositions; these tests set both explicitly and never compare across them.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file

import sealtorch
from sealtorch.keys import DataKey

sys.path.insert(0, str(Path(__file__).parent / "payloads"))
from arch_factories import small_cnn, tiny_mlp

KEY = DataKey(bytes(range(100, 132)))
DATA = Path(__file__).resolve().parents[1] / "data" / "sealed"


@pytest.fixture
def threads() -> Iterator[Callable[[int], None]]:
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _misaligned(module: torch.nn.Module) -> list[str]:
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return [name for name, t in tensors.items() if t.numel() and t.data_ptr() % 64]


def _timm(name: str, **kwargs: object) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


# (arch reference, kwargs, how to build the plain model, input size)
ARCHITECTURES = {
    "resnet18": (
        "torchvision:resnet18",
        {"num_classes": 10},
        lambda: torchvision.models.resnet18(weights=None, num_classes=10),
        64,
    ),
    "mobilenet_v3_small": (
        "torchvision:mobilenet_v3_small",
        {"num_classes": 7},
        lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=7),
        64,
    ),
    "efficientnet_lite0": (
        "timm:efficientnet_lite0",
        {"num_classes": 5},
        _timm("efficientnet_lite0", num_classes=5),
        96,
    ),
    "vit_tiny": (
        "timm:vit_tiny_patch16_224",
        {"num_classes": 3, "img_size": 64},
        _timm("vit_tiny_patch16_224", num_classes=3, img_size=64),
        64,
    ),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def sealed_pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    ref, kwargs, build, size = ARCHITECTURES[request.param]
    torch.manual_seed(7)
    plain = build().eval()
    path = tmp_path_factory.mktemp("bitexact") / f"{request.param}.sealed"
    sealtorch.encrypt_model(
        plain.state_dict(), path, model_id=request.param, key=KEY, arch=ref, arch_kwargs=kwargs
    )
    return plain, sealtorch.load_model(path, key=KEY), size


def test_every_tensor_of_a_loaded_model_is_64_byte_aligned(
    sealed_pair: tuple[torch.nn.Module, torch.nn.Module, int],
) -> None:
    _, sealed, _ = sealed_pair
    assert _misaligned(sealed) == []


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_outputs_are_bit_identical_at_the_same_threads_and_batch(
    sealed_pair: tuple[torch.nn.Module, torch.nn.Module, int],
    threads: Callable[[int], None],
    batch: int,
    num_threads: int,
) -> None:
    plain, sealed, size = sealed_pair
    threads(num_threads)
    torch.manual_seed(batch)
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        expected = plain(x)
        got = sealed(x)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected), (got - expected).abs().max().item()


def test_state_dicts_with_odd_byte_sizes_load_aligned(tmp_path: Path) -> None:
    state_dict = {
        "bf16_row_of_3": torch.randn(1, 3).bfloat16(),
        "int8": torch.tensor([-3], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "one_element": torch.tensor([1.5]),
        "count": torch.tensor(9, dtype=torch.int64),
        "half": torch.randn(5).half(),
        "matrix": torch.randn(7, 3),
    }
    path = tmp_path / "odd.sealed"
    sealtorch.encrypt_model(state_dict, path, model_id="odd", key=KEY)
    loaded = sealtorch.load_state_dict(path, key=KEY)
    assert [name for name, t in loaded.items() if t.data_ptr() % 64] == []
    for name, tensor in state_dict.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name


def test_program_payloads_load_aligned_and_bit_identical(
    tmp_path: Path, threads: Callable[[int], None]
) -> None:
    torch.manual_seed(3)
    plain = small_cnn().eval()
    example = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
        scripted = torch.jit.trace(plain, example)
    programs = {"torchscript": scripted, "export": torch.export.export(plain, (example,))}
    threads(1)
    for name, program in programs.items():
        path = tmp_path / f"{name}.sealed"
        sealtorch.encrypt_model(program, path, model_id=name, key=KEY)
        model = sealtorch.load_model(path, key=KEY)
        assert _misaligned(model) == [], name
        with torch.inference_mode():
            assert torch.equal(model(example), plain(example)), name


def test_a_file_sealed_with_the_packed_payload_layout_still_loads_exactly(
    threads: Callable[[int], None],
) -> None:
    """``small-cnn-payload-v1.sealed`` was written by sealtorch before payload alignment."""
    path = DATA / "small-cnn-payload-v1.sealed"
    expected = load_file(DATA / "small-cnn.safetensors")
    key = DataKey(bytes(range(32)))
    sealed = sealtorch.load_sealed_model(path, key=key, allowed_archs=["arch_factories:small_cnn"])
    assert sealed.manifest.payload_align is None
    assert sealed.manifest.labels == tuple(f"class {i}" for i in range(5))
    assert _misaligned(sealed.module) == []
    state_dict = sealtorch.load_state_dict(path, key=key)
    assert set(state_dict) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state_dict[name], tensor), name
        assert state_dict[name].data_ptr() % 64 == 0, name
    plain = small_cnn().eval()
    plain.load_state_dict(expected)
    threads(1)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(sealed.module(x), plain(x))


def test_decrypt_writes_a_standard_safetensors_file(tmp_path: Path) -> None:
    torch.manual_seed(4)
    mlp = tiny_mlp()
    path = tmp_path / "mlp.sealed"
    sealtorch.encrypt_model(mlp, path, model_id="mlp", key=KEY, metadata={"team": "x"})
    out = tmp_path / "plain.safetensors"
    sealtorch.decrypt_model(path, out, key=KEY)
    loaded = load_file(out)  # the official reader refuses gaps: the output is packed
    assert set(loaded) == set(mlp.state_dict())
    for name, tensor in mlp.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
