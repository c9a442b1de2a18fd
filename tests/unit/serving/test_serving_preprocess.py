"""Image preprocessing: the manifest's spec, deterministic output, defensive decoding."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
import torch
from PIL import Image

from sealtorch._demo.pretrained import IMAGENET_PREPROCESS, sample_image
from sealtorch.payloads.manifest import ImagePreprocessSpec
from sealtorch.serving.preprocess import (
    MAX_IMAGE_PIXELS,
    ImageDecodeError,
    preprocess_image,
)

SPEC = ImagePreprocessSpec.from_json(IMAGENET_PREPROCESS)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (truncated) image stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    )


def test_sample_photo_gives_a_normalised_crop() -> None:
    tensor = preprocess_image(sample_image("chelsea.png"), SPEC)
    assert tensor.shape == (3, 224, 224)
    assert tensor.dtype == torch.float32
    assert tensor.is_contiguous()
    again = preprocess_image(sample_image("chelsea.png"), SPEC)
    assert torch.equal(tensor, again)  # deterministic, bit for bit


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_common_formats_decode(fmt: str) -> None:
    image = Image.new("RGB", (300, 260), (120, 30, 200))
    tensor = preprocess_image(_encoded(image, fmt), SPEC)
    assert tensor.shape == (3, 224, 224)


def test_rare_formats_are_not_even_opened() -> None:
    tiff = _encoded(Image.new("RGB", (64, 64)), "TIFF")
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        preprocess_image(tiff, SPEC)


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_garbage_is_one_clear_error(data: bytes) -> None:
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        preprocess_image(data, SPEC)


@pytest.mark.parametrize(
    ("side", "message"),
    [
        (7_000, f"the limit is {MAX_IMAGE_PIXELS:,}"),  # 49 Mpx: over sealtorch's own limit
        (20_000, "too large to decode safely"),  # 400 Mpx: Pillow's bomb check fires first
    ],
)
def test_decompression_bombs_are_refused_before_decoding(side: int, message: str) -> None:
    bomb = _png_header_only(side, side)  # claimed by ~100 bytes
    assert len(bomb) < 200
    with pytest.raises(ImageDecodeError, match=message):
        preprocess_image(bomb, SPEC)


def test_extreme_aspect_ratios_are_refused_before_resizing() -> None:
    # 1 x 200_000 pixels is small, but resizing its short side to 256 would make 51 Gpx.
    thin = _png_header_only(1, 200_000)
    with pytest.raises(ImageDecodeError, match="aspect ratio"):
        preprocess_image(thin, SPEC)


def test_truncated_images_fail_cleanly() -> None:
    with pytest.raises(ImageDecodeError):
        preprocess_image(_png_header_only(64, 64), SPEC)


def test_grey_and_alpha_images_become_rgb() -> None:
    for mode in ("L", "RGBA", "P"):
        tensor = preprocess_image(_encoded(Image.new(mode, (256, 256)), "PNG"), SPEC)
        assert tensor.shape == (3, 224, 224)
