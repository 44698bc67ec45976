"""DICOM radiographs: recognised by content, decoded with pydicom (compressed syntaxes through the pylibjpeg and
pyjpegls plugins) to the 8-bit grey image every other source becomes, and their ids, study, body part and keyed
patient hash read from the header.

Pixels: modality LUT (rescale slope/intercept), then the VOI LUT or window centre/width when present, else the
stored bit range, scaled to 0-255 (pydicom's `apply_modality_lut` and `apply_voi_lut`, evaluated once over every
storable value and then looked up), then MONOCHROME1 inverted, so bone is bright in both photometries.

Refused, with a reason: multi-frame objects (a radiograph view is one frame; multi-frame objects are cine,
tomosynthesis or enhanced CT/MR), colour photometries, more than 16 stored bits, transfer syntaxes without an
installed decoder, truncated or corrupt pixel data. Objects without pixels (structured reports, RT plans,
presentation states, DICOMDIR) and files that are not DICOM are skipped with a reason (`DicomError.skip`).

Patient identifiers never leave this module: `patient_id` is an HMAC of PatientID (`patient_key`), and no header
value other than UIDs and the body part goes into a row or a reason.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import re
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mura_ray import storage
from mura_ray.config import UserError
from mura_ray.labels import BODY_PARTS

logger = logging.getLogger(__name__)

PATIENT_KEY_ENV = "MURA_RAY_PATIENT_KEY"
"""Environment variable holding the key of the patient_id HMAC."""
PATIENT_KEY_FILE_ENV = "MURA_RAY_PATIENT_KEY_FILE"
"""Environment variable naming a file that holds the key (e.g. a mounted Kubernetes Secret)."""

DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".dic")
_SUFFIX = re.compile(r"\.([A-Za-z][A-Za-z0-9]{0,5})$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MAX_STORED_BITS = 16


class DicomError(ValueError):
    """A DICOM file (or a file that is not one) that gives no image; the message is the reason. `skip`: nothing
    to decode there (not DICOM, or an object without pixels), as opposed to an image that failed."""

    def __init__(self, reason: str, skip: bool = False):
        super().__init__(reason)
        self.skip = skip


@dataclass(frozen=True)
class DicomImage:
    """A decoded view: 8-bit pixels and the header fields a row takes (no patient identifier but the keyed hash)."""

    pixels: np.ndarray
    image_id: str
    study_id: str | None
    body_part: str | None
    patient_id: str | None


def may_hold_dicom(name: str) -> bool:
    """Whether a file name may be a DICOM file's, for raw-folder listings that also hold other files: a DICOM
    suffix, no suffix, or a numeric one (PACS exports name files `IM0001` or by UID, `1.2.840.113619.2.55.3.4`);
    the content decides (`is_dicom`)."""
    name = name.rsplit("/", 1)[-1]
    return name.lower().endswith(DICOM_SUFFIXES) or _SUFFIX.search(name) is None


_PARSE_ERRORS: tuple[type[Exception], ...] = (EOFError, ValueError, KeyError, TypeError, IndexError, OSError,
                                              OverflowError, NotImplementedError, AttributeError, struct.error)
"""What pydicom raises on bytes that are not a well-formed dataset (message without element values)."""


def is_dicom(data: bytes) -> bool:
    """DICOM by content: the `DICM` marker after the 128-byte preamble, or (files written without the preamble)
    a dataset that parses and carries SOP class and instance UIDs."""
    if data[128:132] == b"DICM":
        return True
    if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff" or len(data) < 8:
        return False
    try:
        with _parsing():  # elements of a forced parse are converted when read
            ds = _read(data, header_only=True)
            return all(_UID.match(str(ds.get(k, "") or "")) for k in ("SOPClassUID", "SOPInstanceUID"))
    except DicomError:
        return False


@contextmanager
def _parsing() -> Iterator[None]:
    """pydicom's failures on a malformed dataset (at parse time, or when a lazily converted element is first read)
    as a DicomError that names the exception's type only: its message may quote an element's value. Warnings are
    silenced for the same reason."""
    from pydicom.errors import BytesLengthException, InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except DicomError:
        raise
    except (InvalidDicomError, BytesLengthException, *_PARSE_ERRORS) as e:
        raise DicomError(f"cannot parse the DICOM dataset ({type(e).__name__})") from None


def _read(data: bytes, header_only: bool) -> Any:
    """pydicom's dataset of `data`; validation is off (its warnings quote the offending value, which may be a
    patient's name)."""
    import pydicom
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    with _parsing():
        return pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM", stop_before_pixels=header_only)


def _one_line(e: BaseException) -> str:
    """A decoder's message on one line (pydicom lists each plugin's failure on a line of its own), bounded."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _syntax(ds: Any) -> Any:
    from pydicom.uid import ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    return (meta.get("TransferSyntaxUID") if meta is not None else None) or ImplicitVRLittleEndian


def _check_image(ds: Any, max_pixels: int) -> None:
    """Refuse what is not a single-frame monochrome image this module decodes, before any pixel is decoded."""
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds:
        meta = getattr(ds, "file_meta", None)
        sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
        kind = getattr(sop, "name", None) or str(sop or "unknown SOP class")
        other = next((k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
        if other:
            raise DicomError(f"DICOM object with {other} ({kind}): only integer pixel data is supported")
        if "Image" in kind:  # an image SOP class (`CR Image Storage`) whose pixels are cut off or unreadable
            raise DicomError(f"DICOM image object without pixel data ({kind}): truncated or corrupt")
        raise DicomError(f"DICOM object without pixel data ({kind}): not an image", skip=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"multi-frame DICOM object ({frames} frames): a radiograph view is one frame; "
                         "multi-frame objects are not scored")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(f"photometric interpretation {photometric or 'missing'!s}: expected MONOCHROME1 or "
                         "MONOCHROME2 (a grey radiograph)")
    bits = int(ds.get("BitsStored", 0) or 0)
    if not 1 <= bits <= _MAX_STORED_BITS:
        raise DicomError(f"{bits} bits stored: expected 1 to {_MAX_STORED_BITS}")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * cols > max_pixels:
        raise DicomError(f"image of {cols}x{rows} pixels exceeds the limit of {max_pixels}")
    if rows < 1 or cols < 1:
        raise DicomError("image has no pixels")
    syntax = _syntax(ds)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomError(f"unsupported transfer syntax {getattr(syntax, 'name', '') or syntax} ({syntax})") from None
    if not decoder.is_available:
        missing = "; ".join(f"{k}: {', '.join(v)}" for k, v in decoder.missing_dependencies.items()) or "none"
        raise DicomError(f"no decoder installed for transfer syntax {syntax.name} (missing: {missing})")


def to_8bit(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Stored values to display grey levels: modality LUT, VOI LUT or window (else the stored bit range) scaled to
    0-255, MONOCHROME1 inverted.

    pydicom's functions run once over every value of the array's 8- or 16-bit type (at most 65,536; values beyond
    the stored bits clipped to them) and the image is then looked up in that table by its raw bits: one pass over
    the image, where applying them to it is several float64 passes (`benchmarks/dicom_decode.py`).
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    bits, signed = int(ds.BitsStored), int(ds.get("PixelRepresentation", 0) or 0) == 1
    low = -(1 << (bits - 1)) if signed else 0
    high = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    if arr.dtype.kind not in "ui" or arr.dtype.itemsize > 2:
        arr = np.clip(arr, low, high).astype(np.int16 if signed else np.uint16)  # bits stored <= 16
    raw = np.dtype(f"u{arr.dtype.itemsize}")
    # every raw bit pattern, read as the array's type, clipped to the stored range
    domain = np.arange(1 << (8 * arr.dtype.itemsize), dtype=np.int64).astype(raw).view(arr.dtype)
    stored = np.clip(domain.astype(np.int64), low, high)[None, :]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = np.asarray(apply_voi_lut(apply_modality_lut(stored, ds), ds), dtype=np.float64)[0]
    in_range = values[(domain >= low) & (domain <= high)]
    lo, hi = float(in_range.min()), float(in_range.max())
    table = np.zeros(len(values), dtype=np.uint8)
    if hi > lo:
        table = np.round(np.clip(values - lo, 0.0, hi - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        table = 255 - table
    return table[arr.view(raw)]


def decode_pixels(ds: Any, max_pixels: int) -> np.ndarray:
    """The 8-bit (rows, columns) image of a parsed dataset, or a DicomError with the reason."""
    _check_image(ds, max_pixels)
    syntax = _syntax(ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except (RuntimeError, *_PARSE_ERRORS) as e:
        raise DicomError(f"cannot decode the pixel data ({getattr(syntax, 'name', '') or syntax}): "
                         f"{_one_line(e)}") from None
    except BaseException as e:
        # Decoders written in Rust (pylibjpeg-rle) panic on some corrupt frames, and pyo3 raises that as a
        # PanicException, which derives from BaseException; anything else (Ctrl+C, SystemExit) goes on up.
        if type(e).__name__ != "PanicException":
            raise
        raise DicomError(f"cannot decode the pixel data ({getattr(syntax, 'name', '') or syntax}): the decoder "
                         f"failed on corrupt data ({_one_line(e)})") from None
    if arr.ndim != 2:
        raise DicomError(f"pixel data of shape {arr.shape}: expected one grey frame")
    return to_8bit(arr, ds)


def decode_dicom(data: bytes, max_pixels: int) -> np.ndarray:
    """DICOM bytes to a (height, width) uint8 image, or a DicomError with the reason."""
    with _parsing():
        return decode_pixels(_read(data, header_only=False), max_pixels)


def image_id(sop_instance_uid: str, frame: int = 1) -> str:
    """An image's id: its SOPInstanceUID and frame number (1: every image kept is single-frame)."""
    return f"{sop_instance_uid}-{frame}"


_PART_WORDS: dict[str, str] = {
    **{p: p for p in BODY_PARTS},
    "FINGERS": "FINGER", "THUMB": "FINGER", "HANDS": "HAND", "WRISTS": "WRIST", "ELBOWS": "ELBOW",
    "SHOULDERS": "SHOULDER", "UPPERARM": "HUMERUS", "UPPER ARM": "HUMERUS",
}
"""Words naming one of MURA's parts: DICOM's BodyPartExamined defined terms and their common free-text forms."""
_WORD = re.compile(r"UPPER ARM|[A-Z]+")


def map_body_part(*texts: str | None) -> str | None:
    """MURA's body part from BodyPartExamined, else from the series or study description: the first text naming
    exactly one of the seven parts (`HAND AND WRIST` names two: unknown, and the model's body-part head decides)."""
    for text in texts:
        if not text:
            continue
        named = {_PART_WORDS[w] for w in _WORD.findall(str(text).upper().replace("_", " ")) if w in _PART_WORDS}
        if len(named) == 1:
            return named.pop()
    return None


def patient_key(required: bool) -> bytes | None:
    """The patient_id HMAC key: `$MURA_RAY_PATIENT_KEY`, or the file named by `$MURA_RAY_PATIENT_KEY_FILE` (never a
    command-line flag: it would show in process lists and shell history). None when not `required` (the user chose
    --no-patient-key); a UserError when required and absent."""
    if not required:
        return None
    key = os.environ.get(PATIENT_KEY_ENV, "").encode()
    path = os.environ.get(PATIENT_KEY_FILE_ENV)
    if not key and path:
        try:
            with open(path, "rb") as f:
                key = f.read().strip()
        except OSError as e:
            raise UserError(f"${PATIENT_KEY_FILE_ENV}: cannot read the patient key file {path} "
                            f"({e.strerror})") from None
        if not key:
            raise UserError(f"${PATIENT_KEY_FILE_ENV}: the patient key file {path} is empty")
    if not key:
        raise UserError(f"DICOM input needs a key for patient_id (an HMAC of PatientID): set ${PATIENT_KEY_ENV} or "
                        f"${PATIENT_KEY_FILE_ENV} (a secret file), or pass --no-patient-key to leave patient_id "
                        "empty")
    return key


def hash_patient(patient_id: str | None, key: bytes | None) -> str | None:
    """HMAC-SHA256 of PatientID under `key`, 32 hex digits; None without a key or a PatientID."""
    if key is None or not patient_id:
        return None
    return hmac.new(key, str(patient_id).encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def _header_fields(ds: Any, key: bytes | None) -> tuple[str, str | None, str | None, str | None]:
    sop = str(ds.get("SOPInstanceUID", "") or "")
    if not _UID.match(sop):
        raise DicomError("DICOM dataset without a valid SOPInstanceUID")
    study = str(ds.get("StudyInstanceUID", "") or "") or None
    part = map_body_part(ds.get("BodyPartExamined"), ds.get("SeriesDescription"), ds.get("StudyDescription"))
    return image_id(sop), study, part, hash_patient(ds.get("PatientID"), key)


def read_dicom(data: bytes, max_pixels: int, key: bytes | None) -> DicomImage:
    """Decode a DICOM file's image and the fields of its row; a DicomError with the reason otherwise."""
    if not is_dicom(data):
        raise DicomError("not a DICOM file", skip=True)
    with _parsing():
        ds = _read(data, header_only=False)
        _check_image(ds, max_pixels)  # an object without pixels is skipped before its ids are checked
        fields = _header_fields(ds, key)
        return DicomImage(decode_pixels(ds, max_pixels), *fields)


def read_header(data: bytes) -> tuple[str, str | None, str | None] | None:
    """(image_id, study_id, body_part) of DICOM bytes, or None when they are not DICOM or have no valid header
    (their decode then says why)."""
    if not is_dicom(data):
        return None
    try:
        with _parsing():
            image, study, part, _ = _header_fields(_read(data, header_only=True), None)
    except DicomError:
        return None
    return image, study, part


def encode_png(pixels: np.ndarray) -> bytes:
    """An 8-bit image as PNG bytes: how an ingested dataset stores a DICOM view (lossless for the decoded image,
    without the header and its patient data, and read by the one decoder training and scoring use)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def inspect_dicom(batch: pd.DataFrame, max_pixels: int, key: bytes | None) -> pd.DataFrame:
    """Ray Data task of `ingest --source dicom`: read and decode each listed file once; the columns of
    `ingest.inspect_images` (the PNG's size as `nbytes`) plus the row's DICOM fields, or the reason it gives no
    image (`skip`: nothing to decode there)."""
    rows = []
    for uri in batch["uri"]:
        row: dict[str, Any] = dict(_INSPECTED)
        try:
            image = read_dicom(storage.read_bytes(uri), max_pixels, key)
            height, width = image.pixels.shape
            row.update(width=width, height=height, nbytes=len(encode_png(image.pixels)), dicom_id=image.image_id,
                       study_id=image.study_id, body_part=image.body_part, patient_id=image.patient_id)
        except DicomError as e:
            row.update(error=str(e), skip=e.skip)
        except FileNotFoundError:
            row.update(error="listed but missing on disk")
        except OSError as e:
            row.update(error=f"cannot read file: {e}")
        rows.append(row)
    return pd.DataFrame(rows, columns=list(_INSPECTED)).assign(image_id=batch["image_id"].values)


_INSPECTED: dict[str, Any] = {"width": 0, "height": 0, "nbytes": 0, "error": None, "skip": False, "dicom_id": None,
                              "study_id": None, "body_part": None, "patient_id": None}


def png_of(uri: str, max_pixels: int) -> bytes:
    """The decoded image of a DICOM file as PNG bytes: what an ingested dataset stores for it (`encode_png`)."""
    return encode_png(decode_dicom(storage.read_bytes(uri), max_pixels))
