"""Models the serving tests seal and serve, referenced as ``serving_factories:NAME``.

This directory is on ``sys.path`` while its tests run, and on ``PYTHONPATH`` for the
``sealtorch serve`` subprocesses, so the architecture references resolve as users' do.
"""

from __future__ import annotations

import time

import torch
from torch import nn

#: Every numeric datatype the "types" model takes, with a torch dtype and an exact operation.
TYPE_INPUTS: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f64": torch.float64,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u8": torch.uint8,
    "flag": torch.bool,
}


class AllTypes(nn.Module):
    """Returns one output per input, computed exactly (no rounding) in the input's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0), requires_grad=False)

    def forward(
        self,
        f32: torch.Tensor,
        f16: torch.Tensor,
        bf16: torch.Tensor,
        f64: torch.Tensor,
        i64: torch.Tensor,
        i32: torch.Tensor,
        i16: torch.Tensor,
        i8: torch.Tensor,
        u8: torch.Tensor,
        flag: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return {
            "f32_out": f32 * self.scale,
            "f16_out": f16 * 2,
            "bf16_out": bf16 * 2,
            "f64_out": f64 * 2,
            "i64_out": i64 + 1,
            "i32_out": i32 - 1,
            "i16_out": i16 * 2,
            "i8_out": -i8,
            "u8_out": u8 // 2,
            "flag_out": ~flag,
        }


def example_inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(batch)
    values = []
    for dtype in TYPE_INPUTS.values():
        if dtype.is_floating_point:
            values.append(torch.randn(batch, 3, generator=generator).to(dtype))
        elif dtype == torch.bool:
            values.append(torch.rand(batch, 3, generator=generator) > 0.5)
        else:
            info = torch.iinfo(dtype)
            low, high = max(info.min // 4, -1000), min(info.max // 4, 1000)
            values.append(torch.randint(low, high, (batch, 3), generator=generator, dtype=dtype))
    return tuple(values)


def exported_all_types() -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(
        AllTypes().eval(),
        example_inputs(2),
        dynamic_shapes=tuple({0: batch} for _ in TYPE_INPUTS),
    )


def tiny_classifier(width: int = 6, classes: int = 4) -> nn.Module:
    """A small MLP classifier (sealed with declared inputs/outputs and labels)."""
    return nn.Sequential(nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, classes))


class Sleeper(nn.Module):
    """Doubles its input; sleeps ``x[0, 0]`` seconds first (at most 10), to test draining."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delay = float(x[0, 0]) if x.numel() else 0.0
        if delay > 0:
            time.sleep(min(delay, 10.0))
        return x * 2


def sleeper() -> nn.Module:
    return Sleeper()
