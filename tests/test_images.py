"""Decoding: formats, modes (8-bit, RGB, 16-bit scaled by bit depth), and unusable files with their reasons."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mura_ray.data.images import DecodeError, decode_radiograph, png_significant_bits


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


def _with_sbit(png: bytes, bits: int) -> bytes:
    """The PNG with an sBIT chunk (significant bits) after its IHDR, as DICOM exporters write it."""
    import struct
    import zlib

    chunk = b"sBIT" + bytes([bits])
    ihdr_end = 8 + 12 + int.from_bytes(png[8:12], "big")
    return png[:ihdr_end] + struct.pack(">I", 1) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[ihdr_end:]


def test_16_bit_samples_of_fewer_bits_are_scaled_by_the_bits_they_use():
    """12-bit data in 16-bit samples spans the grey range (a 16-bit scale would make it 16 levels, nearly black),
    and 8-bit values in a 16-bit PNG stay as they are (a 16-bit scale made them all 0)."""
    twelve = np.array([[0, 1365, 2730, 4095]], dtype=np.uint16)
    assert decode_radiograph(_png(Image.fromarray(twelve))).tolist() == [[0, 85, 170, 255]]
    eight = np.array([[0, 100, 255]], dtype=np.uint16)
    assert decode_radiograph(_png(Image.fromarray(eight))).tolist() == [[0, 100, 255]]
    # A declared depth (sBIT) wins over the values: a dim 12-bit image stays dim, as its scanner wrote it.
    dim = np.array([[0, 1000, 2047]], dtype=np.uint16)
    declared = _with_sbit(_png(Image.fromarray(dim)), 12)
    assert png_significant_bits(declared) == 12 and png_significant_bits(_png(Image.fromarray(dim))) is None
    assert decode_radiograph(declared).tolist() == [[0, 62, 127]]
    assert decode_radiograph(_png(Image.fromarray(dim))).tolist() == [[0, 124, 255]]  # 11 bits hold it
    # The PNG spec's layout: samples scaled up to 16 bits, sBIT recording the original 12: a full-range image.
    spec = np.array([[0, 1365 * 16, 4095 * 16]], dtype=np.uint16)
    assert decode_radiograph(_with_sbit(_png(Image.fromarray(spec)), 12)).tolist() == [[0, 84, 254]]


def _png16(arr: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG of `arr` (H x W x C, uint16), written by hand: Pillow cannot write 16-bit colour PNGs."""
    import struct
    import zlib

    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_16_bit_colour_pngs_with_values_in_the_low_bits_are_refused_not_darkened():
    """Pillow reads 16-bit RGB and grey+alpha PNGs as 8-bit, keeping each sample's top byte: full-range data
    decodes right, 12-bit data would become 16 levels of near-black, and is refused with a reason instead."""
    ramp = np.array([0, 2000, 4095], dtype=np.uint16)
    rgb12 = np.broadcast_to(ramp[None, :, None], (2, 3, 3)).copy()
    grey_alpha12 = np.stack([np.broadcast_to(ramp, (2, 3)), np.full((2, 3), 65535, np.uint16)], axis=-1)
    for arr, colour_type in ((rgb12, 2), (grey_alpha12, 4)):
        with pytest.raises(DecodeError, match="16-bit colour PNG whose values use the low bits only"):
            decode_radiograph(_png16(arr, colour_type))
    assert decode_radiograph(_png16(rgb12 * 16, 2))[0].tolist() == [0, 125, 255]  # full range: read as is


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
