"""Decoding: formats, modes (8-bit, RGB, 16-bit scaled by bit depth), and unusable files with their reasons."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mura_ray.data.images import DecodeError, decode_radiograph


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_16_bit_is_scaled_by_bit_depth_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    data = _png(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_radiograph(data)
    assert out.dtype == np.uint8
    # convert("L") would clip everything above 255 to 255; scaling keeps the ramp.
    assert out.tolist() == [[0, 1, 128, 255]]


def test_rgb_and_grayscale_and_jpeg_become_one_channel():
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    assert decode_radiograph(_png(Image.fromarray(rgb))).shape == (4, 5)
    gray = np.full((6, 3), 77, dtype=np.uint8)
    assert decode_radiograph(_png(Image.fromarray(gray))).tolist() == gray.tolist()
    jpeg = decode_radiograph(_png(Image.fromarray(gray), "JPEG"))
    assert jpeg.shape == (6, 3) and abs(int(jpeg.mean()) - 77) <= 2


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello, not an image", "not a PNG or JPEG"),
        (_png(Image.new("L", (64, 64)))[:60], "cannot decode"),
        (_png(Image.new("L", (8, 8)), "GIF"), "not a PNG or JPEG"),
    ],
)
def test_unusable_files_raise_with_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_radiograph(data)


def test_pixel_limit_refuses_decompression_bombs():
    data = _png(Image.new("L", (300, 300)))
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decode_radiograph(data, max_pixels=300 * 299)
    assert decode_radiograph(data, max_pixels=300 * 300).shape == (300, 300)
