"""Radiograph decoding shared by ingest, training input and scoring: Pillow, restricted formats, one channel.

MURA mixes 8-bit grayscale, RGB and 16-bit PNGs. 16-bit images are scaled by their bit depth (Pillow's
`convert("L")` would clip them), so every source ends as a `uint8` array of shape (height, width).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

FORMATS: tuple[str, ...] = ("PNG", "JPEG")
"""Formats Pillow may open; anything else is rejected before decoding."""

DEFAULT_MAX_PIXELS = 64_000_000
"""Larger images are refused as decompression bombs (real radiographs are at most a few megapixels)."""

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")


class DecodeError(ValueError):
    """An image that cannot be used; the message is the reason written to errors.jsonl."""


def open_radiograph(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Open and fully decode `data`, refusing empty, truncated, oversized and non-PNG/JPEG input.

    `draft_size` lets JPEG decode at a reduced scale (at least that many pixels on the short side), which is
    much faster when the image is about to be resized anyway.
    """
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            if img.width * img.height > max_pixels:
                raise DecodeError(f"image of {img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
            if draft_size and img.format == "JPEG":
                img.draft("L", (draft_size, draft_size))
            img.load()
    except DecodeError:
        raise
    except Image.UnidentifiedImageError:
        raise DecodeError("not a PNG or JPEG image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"cannot decode image: {e}") from None
    if img.width < 1 or img.height < 1:
        raise DecodeError("image has no pixels")
    return img


def to_grayscale(img: Image.Image) -> np.ndarray:
    """One-channel uint8 array; 16-bit and 32-bit data are scaled by bit depth, not clipped."""
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if mode.startswith("I;16") or (mode == "I" and arr.size and arr.max() > 255):
            # 16-bit PNGs: scale the full 0..65535 range to 0..255.
            return (arr.astype(np.uint32) * 255 // 65535).astype(np.uint8)
        return np.clip(arr, 0, 255).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA").convert("RGB")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def decode_radiograph(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> np.ndarray:
    """Decode image bytes to a (height, width) uint8 array, raising DecodeError with a reason."""
    return to_grayscale(open_radiograph(data, max_pixels, draft_size))
