"""What this process uses when a caller of :func:`sealtorch.api.load_sealed_model` names
nothing: the device to load onto and a progress reporter for each model's decryption.

``sealtorch serve --device`` and its start-up progress set them once, before the server loads
its models (on a thread of the same process), so the inference server's code carries neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["default_device", "default_progress", "set_default_device", "set_default_progress"]

#: A progress callback: ``(done_bytes, total_bytes)``.
Progress = Callable[[int, int], None]

_device: list[torch.device | None] = [None]
_progress: list[Callable[[str], Progress] | None] = [None]


def set_default_device(device: torch.device | None) -> None:
    """Load models onto ``device`` (a resolved CUDA device; None: host memory)."""
    _device[0] = device


def default_device() -> torch.device | None:
    return _device[0]


def set_default_progress(factory: Callable[[str], Progress] | None) -> None:
    """``factory(model_name)`` makes the progress callback of each model loaded."""
    _progress[0] = factory


def default_progress(name: str) -> Progress | None:
    factory = _progress[0]
    return None if factory is None else factory(name)
