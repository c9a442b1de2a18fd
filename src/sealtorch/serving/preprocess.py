"""Image preprocessing declared inside a sealed model (the manifest's ``preprocess``).

The same function runs in the inference server and in the tests' plain-PyTorch reference, so
sealed and plain predictions are bit-identical. The parameters are the manifest's own
:class:`~sealtorch.payloads.manifest.ImagePreprocessSpec` (validated when the model was sealed
and again when it is loaded); nothing here re-validates them.

Decoding is defensive, because the bytes come from any client:

* only common formats are opened (PNG, JPEG, WebP, BMP, GIF), never the rarer parsers;
* the pixel count is checked from the header *before* pixels are decoded (decompression
  bombs), and again for the resized image (an extreme aspect ratio would otherwise turn a
  small input into a huge intermediate image);
* every decoding failure is one :class:`ImageDecodeError` with a generic message.

Nothing here touches the process-wide ``warnings`` filters, so it is safe to call from several
threads at once.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Final

from sealtorch.errors import PayloadError
from sealtorch.payloads.manifest import ImagePreprocessSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_FORMATS",
    "MAX_IMAGE_PIXELS",
    "ImageDecodeError",
    "preprocess_image",
]

#: Largest image (in pixels) the server decodes; bigger inputs are refused before decoding.
MAX_IMAGE_PIXELS: Final = 40_000_000
#: The image formats the decoder accepts (Pillow format names).
IMAGE_FORMATS: Final = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class ImageDecodeError(PayloadError):
    """An input image could not be decoded (not an image, unsupported format, too large)."""


def _resized(width: int, height: int, short_side: int) -> tuple[int, int]:
    """The size after resizing the shorter side to ``short_side`` (torchvision's rule)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = short_side, int(short_side * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def preprocess_image(data: bytes, spec: ImagePreprocessSpec) -> torch.Tensor:
    """Decode ``data`` into a normalised ``[3, crop, crop]`` float32 tensor.

    Resize the shorter side to ``spec.resize`` (keeping the aspect ratio), centre-crop to
    ``spec.crop``, scale to [0, 1] and normalise with ``spec.mean``/``spec.std``.
    """
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    resample = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
    }[spec.interpolation]
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as opened:
            width, height = opened.size
            if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
                raise ImageDecodeError(
                    f"image is {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS:,}"
                )
            size = _resized(width, height, spec.resize)
            if size[0] * size[1] > MAX_IMAGE_PIXELS:
                raise ImageDecodeError(
                    f"image is {width}x{height} pixels; its aspect ratio is too extreme "
                    "to resize safely"
                )
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(
            f"input is not a decodable image ({', '.join(IMAGE_FORMATS)})"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("image is too large to decode safely") from exc

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
