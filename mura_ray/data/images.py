"""Radiograph decoding and preprocessing shared by ingest, training, scoring and Grad-CAM: Pillow, restricted
formats, one channel, `load_pixels` for the model's input. DICOM bytes (recognised by content) are decoded by
`dicom.decode_dicom` to the same 8-bit image.

MURA mixes 8-bit grayscale, RGB and 16-bit PNGs. 16-bit images are scaled by their bit depth (declared, or the one
their values need; Pillow's `convert("L")` would clip them), so every source ends as a `uint8` array of
shape (height, width).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mura_ray.data.dicom import DicomError, decode_dicom, is_dicom

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


def png_significant_bits(data: bytes) -> int | None:
    """The bits per sample that carry data, from a PNG's sBIT chunk (grayscale: one byte), or None without one.

    Pillow reads but does not report it; a 16-bit PNG exported from 12-bit radiograph data declares 12 there.
    """
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    pos = 8
    while pos + 9 <= len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        if kind == b"sBIT":
            return data[pos + 8] or None
        if kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def png_colour_depth(data: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, or None for anything else."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) < 26 or data[12:16] != b"IHDR":
        return None
    return data[24], data[25]


def to_grayscale(img: Image.Image, significant_bits: int | None = None) -> np.ndarray:
    """One-channel uint8 array; 16-bit and 32-bit data are scaled by their bit depth, not clipped.

    The bit depth is the PNG's declared significant bits (`significant_bits`, its sBIT chunk) or else the smallest
    one, 8 or more, that holds the image's largest value: radiographs exported from DICOM often carry 10-14 bits in
    16-bit samples, which a 16-bit scale would turn nearly black (12-bit data into 16 grey levels), and a 16-bit PNG
    holding 8-bit values into an all-black image.
    """
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if mode.startswith("I;16") or (mode == "I" and arr.size and arr.max() > 255):
            top = int(arr.max()) if arr.size else 0
            bits = max(8, top.bit_length())
            if significant_bits and top <= (1 << significant_bits) - 1:
                # sBIT with the data in the low bits (what DICOM exporters write); the PNG spec's layout, scaled up
                # to the full 16-bit range, has larger values and is scaled by the bits they use
                bits = significant_bits
            bits = min(bits, 32)
            full = (1 << bits) - 1
            return (np.clip(arr.astype(np.int64), 0, full) * 255 // full).astype(np.uint8)
        return np.clip(arr, 0, 255).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA").convert("RGB")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def decode_radiograph(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> np.ndarray:
    """Decode image bytes to a (height, width) uint8 array, raising DecodeError with a reason.

    DICOM content goes to `dicom.decode_dicom` (modality and VOI LUTs, MONOCHROME1 inverted, 8 bits).
    16-bit colour and grey+alpha PNGs are refused when their values sit in the low bits: Pillow keeps only the top
    8 bits of each such sample, so 12-bit data would come out as 16 grey levels, nearly black (16-bit grayscale,
    the usual radiograph export, is read whole and scaled by `to_grayscale`).
    """
    if is_dicom(data):
        try:
            return decode_dicom(data, max_pixels)
        except DicomError as e:
            raise DecodeError(str(e)) from None
    out = to_grayscale(open_radiograph(data, max_pixels, draft_size), png_significant_bits(data))
    header = png_colour_depth(data)
    if header is not None and header[0] == 16 and header[1] in (2, 4, 6) and out.size and int(out.max()) < 128:
        raise DecodeError(f"16-bit colour PNG whose values use the low bits only (Pillow keeps the top 8 bits of "
                          f"each sample: at most {int(out.max())} of 255 here); save it as 16-bit grayscale")
    return out


def resize_pad(img: np.ndarray, size: int, scale: float = 1.0) -> Image.Image:
    """Fit the longer side to `size * scale` (aspect preserved), then centre on a black `size`x`size` canvas."""
    h, w = img.shape
    factor = size * scale / max(h, w)
    nw, nh = max(1, round(w * factor)), max(1, round(h * factor))
    resized = Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=2.0)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    if nw > size or nh > size:
        canvas = resized.crop(((nw - size) // 2, (nh - size) // 2, (nw - size) // 2 + size, (nh - size) // 2 + size))
    return canvas


def load_pixels(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image bytes to the model's input pixels: decoded to one 8-bit channel, the longer side fitted to `size`
    (aspect preserved), centred on a black square: a (size, size) uint8 array.

    The one preprocessing of every model input: the training-ready cache stores it (`mura_ray.data.cache`), which
    training and validation read; scoring and Grad-CAM compute it from the originals; training augments these
    pixels on its device (`mura_ray.data.augment`). Raises DecodeError with a reason.
    """
    return load_pixels_and_stats(data, size, max_pixels)[0]


@dataclass(frozen=True)
class ImageStats:
    """What the scoring job records of each decoded image, for drift (`mura_ray.drift`)."""

    mean: float
    """Mean intensity of the decoded 8-bit image, in [0, 1] (a JPEG's decoded at the reduced scale the model input
    needs, whose averaging of neighbouring pixels leaves a smooth radiograph's statistics nearly unchanged)."""
    contrast: float
    """Standard deviation of its intensities, in [0, 1]."""
    height: int
    """Stored height in pixels (the file's, before a JPEG draft decode at reduced scale)."""
    width: int
    """Stored width in pixels."""


def load_pixels_and_stats(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS
                          ) -> tuple[np.ndarray, ImageStats]:
    """`load_pixels` and the decoded image's statistics (before resizing and padding), from one decode."""
    decoded = decode_radiograph(data, max_pixels, draft_size=size)
    if is_dicom(data):  # decoded whole (no draft decode): its size is the stored one
        height, width = decoded.shape
    else:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only: the stored size, not the draft's
            width, height = header.size
    # Every second row and column: a third of the cost (0.92 -> 0.31 ms at 512x410, about a tenth of the decode
    # before), the statistics within 1e-3.
    sample = decoded[::2, ::2]
    stats = ImageStats(mean=float(sample.mean()) / 255.0, contrast=float(sample.std()) / 255.0,
                       height=int(height), width=int(width))
    return np.asarray(resize_pad(decoded, size), dtype=np.uint8), stats


def normalize(pixels: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 pixels (`load_pixels`) to the model's float32 input: `(pixels / 255 - mean) / std`.

    The scoring actors apply the same arithmetic to the same uint8 pixels in torch, on their device."""
    return (np.asarray(pixels, dtype=np.float32) / 255.0 - mean) / std
