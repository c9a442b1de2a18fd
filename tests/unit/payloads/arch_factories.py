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


def small_cnn(classes: int = 5) -> nn.Module:
    """Conv, batch norm (int64 ``num_batches_tracked``: 8 bytes that shift a packed layout), a
    linear head: the model kept sealed in the first payload layout in ``tests/data/sealed``."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, classes),
    )
