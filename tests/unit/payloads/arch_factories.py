"""Architecture factories referenced as ``arch_factories:NAME`` by the payload and API tests.

This directory is on ``sys.path`` while its tests run (pytest's default import mode), so the
references resolve exactly as ``package.module:factory`` references do for users.
"""

from __future__ import annotations

import torch
from torch import nn


class WithDerivedBuffer(nn.Module):
    """A model with a non-persistent buffer computed in ``__init__`` (not in its state_dict)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.register_buffer("scale", torch.arange(width, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


def tiny_mlp(width: int = 8, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


def derived(width: int = 4) -> nn.Module:
    return WithDerivedBuffer(width)


def not_a_module() -> object:
    return {"weights": 1}


def broken() -> nn.Module:
    raise RuntimeError("factory failed")
