"""Image preprocessing declared inside a sealed model (``preprocess`` in the manifest).

The same function runs in the inference server and in tests' plain-PyTorch reference, so sealed
and plain predictions are bit-identical. Decoding is defensive: size limits are enforced before
pixels are decoded (decompression bombs), and every decoding failure is one clear error.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sealtorch.errors import PayloadError

if TYPE_CHECKING:
    import torch

__all__ = ["ImageDecodeError", "ImagePreprocess", "preprocess_image"]

#: Largest image (in pixels) the server decodes; bigger inputs are refused before decoding.
MAX_IMAGE_PIXELS = 40_000_000
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


class ImageDecodeError(PayloadError):
    """An input image could not be decoded (not an image, unsupported format, too large)."""


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise per channel."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @classmethod
    def from_spec(cls, spec: Mapping[str, object]) -> ImagePreprocess:
        """Build from the manifest's ``preprocess`` object (validated again here)."""
        if spec.get("type") != "image":
            raise PayloadError(f"unsupported preprocessing type {spec.get('type')!r}")

        def integer(name: str) -> int:
            value = spec.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096:
                raise PayloadError(f"preprocess.{name} must be an integer in 1..4096")
            return value

        def triple(name: str) -> tuple[float, float, float]:
            value = spec.get(name)
            if (
                not isinstance(value, Sequence)
                or len(value) != 3
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            ):
                raise PayloadError(f"preprocess.{name} must be three numbers (R, G, B)")
            return (float(value[0]), float(value[1]), float(value[2]))

        interpolation = spec.get("interpolation", "bilinear")
        if interpolation not in _INTERPOLATIONS:
            raise PayloadError(f"preprocess.interpolation must be one of {_INTERPOLATIONS}")
        std = triple("std")
        if any(s <= 0 for s in std):
            raise PayloadError("preprocess.std values must be positive")
        resize, crop = integer("resize"), integer("crop")
        if crop > resize:
            raise PayloadError("preprocess.crop cannot be larger than preprocess.resize")
        return cls(
            resize=resize, crop=crop, mean=triple("mean"), std=std, interpolation=str(interpolation)
        )


def preprocess_image(data: bytes, spec: ImagePreprocess) -> torch.Tensor:
    """Decode ``data`` (PNG, JPEG, ...) into a normalised ``[3, crop, crop]`` float32 tensor."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    resample = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
    }[spec.interpolation]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                width, height = opened.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageDecodeError(
                        f"image is {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS:,}"
                    )
                image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError("input is not a decodable image (PNG, JPEG, ...)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("image is too large to decode safely") from exc

    # Resize the shorter side to `resize`, keeping the aspect ratio (as torchvision does).
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.resize, int(spec.resize * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    image = image.resize(size, resample=resample)

    # Centre crop.
    width, height = image.size
    top = round((height - spec.crop) / 2.0)
    left = round((width - spec.crop) / 2.0)
    image = image.crop((left, top, left + spec.crop, top + spec.crop))

    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub_(mean).div_(std).contiguous()
