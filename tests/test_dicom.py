"""DICOM decoding: pydicom's shipped files (real CR, compressed, truncated and non-image objects) and synthetic
radiographs written as DICOM in every photometry, bit depth and transfer syntax the installed encoders give."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from mura_ray.config import UserError
from mura_ray.data import dicom
from mura_ray.data.film import render
from mura_ray.data.images import DecodeError, decode_radiograph, load_pixels, load_pixels_and_stats
from mura_ray.data.synthetic import dicom_radiograph, save_dicom

CR_FILES = ("dicomdirtests/77654033/CR1/6154", "dicomdirtests/77654033/CR2/6247", "dicomdirtests/77654033/CR3/6278")


def _shipped(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom's wheel lacks {name}"
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def wrist() -> np.ndarray:
    return render("WRIST", None, 96, np.random.default_rng(3))


def _written(tmp_path, ds, name: str, syntax: str | None = None) -> bytes:
    save_dicom(ds, tmp_path / name, syntax)
    return (tmp_path / name).read_bytes()


def test_computed_radiographs_of_one_study(tmp_path):
    """pydicom's CR study: MONOCHROME1 with window and rescale values, decoded with both and inverted."""
    images = [dicom.read_dicom(_shipped(n), 10**6, key=b"k") for n in CR_FILES]
    assert len({i.study_id for i in images}) == 1 and len({i.image_id for i in images}) == 3
    assert all(i.image_id.endswith("-1") and i.pixels.dtype == np.uint8 for i in images)
    assert len({i.patient_id for i in images}) == 1 and len(images[0].patient_id) == 32
    ds = pydicom.dcmread(io.BytesIO(_shipped(CR_FILES[0])))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and "WindowWidth" in ds and "RescaleSlope" in ds
    # The same pixels declared MONOCHROME2 come out as the exact negative: MONOCHROME1 is inverted.
    ds.PhotometricInterpretation = "MONOCHROME2"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    as_mono2 = decode_radiograph(buffer.getvalue())
    assert np.array_equal(as_mono2, 255 - images[0].pixels)
    # The window decides the grey levels: without it, the stored 12-bit range does, and the image is darker
    # and flatter (the window is narrower than the stored range).
    del ds.WindowCenter, ds.WindowWidth
    buffer = io.BytesIO()
    ds.save_as(buffer)
    unwindowed = decode_radiograph(buffer.getvalue())
    assert np.ptp(unwindowed.astype(int)) < np.ptp(as_mono2.astype(int))


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_RLE.dcm", "JPEGLSNearLossless_16.dcm"])
def test_compressed_files_decode(name):
    pixels = load_pixels(_shipped(name), 32)
    ds = pydicom.dcmread(io.BytesIO(_shipped(name)), stop_before_pixels=True)
    assert pixels.shape == (32, 32) and pixels.dtype == np.uint8
    assert decode_radiograph(_shipped(name)).shape == (ds.Rows, ds.Columns)


@pytest.mark.parametrize(("name", "reason", "skip"), [
    ("MR_truncated.dcm", "cannot decode the pixel data (Explicit VR Little Endian): The number of bytes of pixel "
                         "data is less than expected", False),
    ("JPEG-lossy.dcm", "cannot decode the pixel data (JPEG Extended (Process 2 and 4)): Unable to decode", False),
    ("rtplan.dcm", "DICOM object without pixel data (RT Plan Storage): not an image", True),
    ("test-SR.dcm", "DICOM object without pixel data (Comprehensive SR Storage): not an image", True),
    ("dicomdirtests/DICOMDIR", "DICOM object without pixel data (Media Storage Directory Storage)", True),
])
def test_unusable_objects_give_reasons(name, reason, skip):
    with pytest.raises(dicom.DicomError) as caught:
        dicom.read_dicom(_shipped(name), 10**7, key=None)
    assert str(caught.value).startswith(reason) and caught.value.skip is skip
    with pytest.raises(DecodeError, match="^" + reason[:20].replace("(", r"\(")):
        load_pixels(_shipped(name), 32)


def test_monochrome1_and_monochrome2_give_the_same_model_input(tmp_path, wrist):
    mono2 = load_pixels(_written(tmp_path, dicom_radiograph(wrist), "m2"), 64)
    mono1 = load_pixels(_written(tmp_path, dicom_radiograph(wrist, monochrome1=True), "m1"), 64)
    assert np.array_equal(mono1, mono2)
    # and the model input is the radiograph: bone bright, as the source image
    assert np.corrcoef(mono2.ravel(), load_pixels(_png(wrist), 64).ravel())[0, 1] > 0.99
    # scoring's image statistics (drift) of a DICOM file: its stored size, as of any image
    _, stats = load_pixels_and_stats(_written(tmp_path, dicom_radiograph(wrist), "m2"), 64)
    assert (stats.height, stats.width) == wrist.shape


def _png(image: np.ndarray) -> bytes:
    return dicom.encode_png(np.round(image * 255).astype(np.uint8))


def test_rescale_and_bit_depth(tmp_path, wrist):
    plain = load_pixels(_written(tmp_path, dicom_radiograph(wrist, bits=12), "plain"), 64)
    rescaled = dicom_radiograph(wrist, bits=12, slope=0.5, intercept=-1024.0)
    assert np.array_equal(load_pixels(_written(tmp_path, rescaled, "rescaled"), 64), plain)
    ten_bit = load_pixels(_written(tmp_path, dicom_radiograph(wrist, bits=10), "ten"), 64)
    assert np.abs(ten_bit.astype(int) - plain).max() <= 1
    # Signed storage (PixelRepresentation 1): the same image shifted into [-2048, 2047] gives the same input.
    signed = dicom_radiograph(wrist, bits=12)
    signed.set_pixel_data((signed.pixel_array.astype(np.int32) - 2048).astype(np.int16), "MONOCHROME2", 12,
                          generate_instance_uid=False)
    assert signed.PixelRepresentation == 1
    assert np.array_equal(load_pixels(_written(tmp_path, signed, "signed"), 64), plain)
    # A window in rescaled units clips: everything above its top is white.
    windowed = dicom_radiograph(wrist, bits=12, slope=0.5, intercept=-1024.0, window=(-512.0, 512.0))
    pixels = decode_radiograph(_written(tmp_path, windowed, "windowed"))
    stored = np.asarray(windowed.pixel_array, dtype=float) * 0.5 - 1024.0
    assert (pixels[stored > -256.0] == 255).all() and (pixels[stored < -768.0] == 0).all()


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("monochrome1", [False, True])
def test_lossless_syntaxes_give_the_uncompressed_input(tmp_path, wrist, syntax, monochrome1):
    plain = load_pixels(_written(tmp_path, dicom_radiograph(wrist), "plain"), 64)
    data = _written(tmp_path, dicom_radiograph(wrist, monochrome1=monochrome1), "packed", syntax)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(load_pixels(data, 64), plain)


@pytest.mark.parametrize("syntax", [JPEG2000, JPEGLSNearLossless, JPEGBaseline8Bit])
def test_lossy_syntaxes_stay_close(tmp_path, wrist, syntax):
    plain = load_pixels(_written(tmp_path, dicom_radiograph(wrist, bits=8), "plain"), 64)
    ds = dicom_radiograph(wrist, bits=8)
    if syntax == JPEGBaseline8Bit:  # pydicom has no JPEG encoder: Pillow's JPEG, encapsulated
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([_jpeg(ds.pixel_array)])
        ds.file_meta.TransferSyntaxUID = syntax
        ds["PixelData"].VR = "OB"
        ds.save_as(tmp_path / "jpeg", enforce_file_format=True)
        data = (tmp_path / "jpeg").read_bytes()
    else:
        ds.compress(syntax, j2k_cr=[3], jls_error=2, generate_instance_uid=False)
        data = _written(tmp_path, ds, "lossy")
    assert np.abs(load_pixels(data, 64).astype(int) - plain).mean() < 3


def _jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_recognised_by_content(tmp_path, wrist):
    ds = dicom_radiograph(wrist)
    with_preamble = _written(tmp_path, ds, "IM0001")
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=False)  # no preamble, no DICM marker
    bare = buffer.getvalue()
    assert bare[128:132] != b"DICM" and dicom.is_dicom(bare) and dicom.is_dicom(with_preamble)
    assert np.array_equal(load_pixels(bare, 64), load_pixels(with_preamble, 64))
    for other in (_png(wrist), b"plain text, not an image\n" * 20, b"", b"\x00" * 400):
        assert not dicom.is_dicom(other)
    with pytest.raises(dicom.DicomError, match="^not a DICOM file$") as caught:
        dicom.read_dicom(b"plain text\n" * 20, 10**6, key=None)
    assert caught.value.skip
    assert dicom.may_hold_dicom("a/IM0001") and dicom.may_hold_dicom("1.2.840.113619.2.55") and \
        dicom.may_hold_dicom("x/scan.DCM") and not dicom.may_hold_dicom("README.txt")


def test_refused_images(tmp_path, wrist):
    frames = dicom_radiograph(wrist)
    stack = np.stack([frames.pixel_array] * 3)
    frames.set_pixel_data(stack, "MONOCHROME2", 12, generate_instance_uid=False)
    with pytest.raises(DecodeError, match=r"^multi-frame DICOM object \(3 frames\)"):
        decode_radiograph(_written(tmp_path, frames, "frames"))
    colour = dicom_radiograph(wrist)
    rgb = np.repeat(colour.pixel_array[..., None].astype(np.uint8), 3, axis=2)
    colour.set_pixel_data(rgb, "RGB", 8, generate_instance_uid=False)
    with pytest.raises(DecodeError, match="^photometric interpretation RGB"):
        decode_radiograph(_written(tmp_path, colour, "rgb"))
    with pytest.raises(DecodeError, match="exceeds the limit of 100"):
        decode_radiograph(_written(tmp_path, dicom_radiograph(wrist), "big"), max_pixels=100)


@pytest.mark.parametrize(("texts", "part"), [
    (("HAND", None), "HAND"), (("wrist", None), "WRIST"), (("UPPER ARM",), "HUMERUS"), (("THUMB",), "FINGER"),
    ((None, "XR WRIST 3 VIEWS LT"), "WRIST"), (("EXTREMITY", "Shoulder AP"), "SHOULDER"),
    (("HAND AND WRIST",), None), (("CSPINE", "CHEST PA"), None), ((None, None), None), (("ARM",), None),
])
def test_body_part_mapping(texts, part):
    assert dicom.map_body_part(*texts) == part


def test_patient_key(tmp_path, monkeypatch):
    monkeypatch.delenv(dicom.PATIENT_KEY_ENV, raising=False)
    monkeypatch.delenv(dicom.PATIENT_KEY_FILE_ENV, raising=False)
    assert dicom.patient_key(required=False) is None
    with pytest.raises(UserError, match="--no-patient-key"):
        dicom.patient_key(required=True)
    monkeypatch.setenv(dicom.PATIENT_KEY_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(UserError, match="cannot read the patient key file"):
        dicom.patient_key(required=True)
    (tmp_path / "key").write_text("s3cret\n")
    monkeypatch.setenv(dicom.PATIENT_KEY_FILE_ENV, str(tmp_path / "key"))
    assert dicom.patient_key(required=True) == b"s3cret"
    monkeypatch.setenv(dicom.PATIENT_KEY_ENV, "other")
    assert dicom.patient_key(required=True) == b"other"
    a, b = dicom.hash_patient("PID-1", b"other"), dicom.hash_patient("PID-1", b"s3cret")
    assert a != b and len(a) == 32 and "PID" not in a and dicom.hash_patient(None, b"k") is None


def test_an_image_cut_off_before_its_pixel_data_is_an_error_not_a_skip():
    data = _shipped("MR_small_RLE.dcm")
    cut = data[: data.rindex(b"\xe0\x7f\x10\x00") + 6]  # inside the Pixel Data element's header
    with pytest.raises(dicom.DicomError, match=r"^DICOM image object without pixel data \(MR Image Storage\)") as e:
        dicom.read_dicom(cut, 10**6, key=None)
    assert not e.value.skip


def test_a_transfer_syntax_without_a_decoder_is_a_reason(tmp_path, wrist):
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    ds = dicom_radiograph(wrist, bits=8)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(tmp_path / "video", enforce_file_format=True)
    with pytest.raises(DecodeError, match=r"^unsupported transfer syntax MPEG2 .*\(1\.2\.840\.10008\.1\.2\.4\.100\)"):
        load_pixels((tmp_path / "video").read_bytes(), 32)


def test_corrupt_bytes_give_reasons_never_exceptions():
    """Seeded corruptions of real files (bytes flipped, cut anywhere) and random bytes: a reason each time, whatever
    pydicom or a decoder raises (struct errors, pyo3 panics of pylibjpeg-rle on corrupt RLE frames)."""
    rng = np.random.default_rng(1)
    sources = [_shipped(n) for n in (CR_FILES[0], "MR_small_RLE.dcm", "JPEG2000.dcm", "rtplan.dcm")]
    for i in range(240):
        if i % 5 == 0:
            data = rng.integers(0, 256, int(rng.integers(0, 3000))).astype(np.uint8).tobytes()
        else:
            flipped = bytearray(sources[i % 4])
            for _ in range(int(rng.integers(1, 20))):
                flipped[int(rng.integers(132, len(flipped)))] = int(rng.integers(0, 256))
            data = bytes(flipped[: int(rng.integers(132, len(flipped) + 1))])
        for read in (lambda d: decode_radiograph(d), lambda d: dicom.read_dicom(d, 10**7, b"k")):
            try:
                read(data)
            except (DecodeError, dicom.DicomError) as e:
                assert str(e)
        dicom.read_header(data)
