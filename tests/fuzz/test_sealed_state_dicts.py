"""Property-based round trips of state_dicts through the sealed format (all dtypes, shapes)."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sealtorch
from sealtorch.keys import DataKey

KEY = DataKey(bytes(range(32, 64)))
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]


@st.composite
def tensors(draw: st.DrawFn, max_elements: int = 64) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    numel = 1
    for dim in shape:
        numel *= dim
    if numel > max_elements:
        shape = (max_elements,)
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0,
        256,
        (*shape, torch.empty((), dtype=dtype).element_size()),
        generator=generator,
        dtype=torch.uint8,
    )
    tensor = raw.view(dtype).reshape(shape) if dtype != torch.bool else raw[..., 0] > 127
    if draw(st.booleans()) and tensor.dim() >= 2:
        tensor = tensor.transpose(0, 1)  # non-contiguous
    return tensor


names = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=20
).filter(lambda n: n != "__metadata__")


def _round_trip(state_dict: dict[str, torch.Tensor], chunk_size: int) -> dict[str, torch.Tensor]:
    out = io.BytesIO()
    sealtorch.encrypt_model(state_dict, out, model_id="fuzz", key=KEY, chunk_size=chunk_size)
    out.seek(0)
    return sealtorch.load_state_dict(out, key=KEY)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # bitwise equality (NaNs compare equal to themselves)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


@settings(max_examples=60)
@given(
    state_dict=st.dictionaries(names, tensors(), max_size=12),
    chunk_exponent=st.integers(6, 12),
)
def test_round_trip_any_dtypes_and_shapes(
    state_dict: dict[str, torch.Tensor], chunk_exponent: int
) -> None:
    loaded = _round_trip(state_dict, 1 << chunk_exponent)
    assert list(loaded) == list(state_dict)
    for name, tensor in state_dict.items():
        assert _same(loaded[name], tensor), name


def test_many_small_tensors() -> None:
    generator = torch.Generator().manual_seed(0)
    state_dict = {
        f"layer{i}.{kind}": torch.randn(i % 7 + 1, generator=generator).to(DTYPES[i % 4])
        for i in range(2000)
        for kind in ("weight", "bias")
    }
    loaded = _round_trip(state_dict, 4096)
    assert all(_same(loaded[n], t) for n, t in state_dict.items())


@pytest.mark.parametrize("chunk_size", [64 * 1024, 1 << 20])
def test_one_large_tensor(chunk_size: int) -> None:
    large = torch.randn(3_000_001, generator=torch.Generator().manual_seed(1))  # ~12 MB, odd size
    loaded = _round_trip({"large": large, "tail": torch.ones(3, dtype=torch.int8)}, chunk_size)
    assert _same(loaded["large"], large)
    assert _same(loaded["tail"], torch.ones(3, dtype=torch.int8))
