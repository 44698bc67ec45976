"""DICOM decode benchmark: images/s per core from DICOM bytes to the model's input pixels, uncompressed and JPEG 2000.

Ours is `images.load_pixels` on the DICOM bytes (pydicom and its plugins, `dicom.to_8bit`: modality and VOI LUTs
evaluated once over the storable values, then looked up; resize and pad). The baseline is the plain pydicom loop a
user would write: `dcmread`, `pixel_array`, `apply_modality_lut` and `apply_voi_lut` on the image, MONOCHROME1
inverted and scaled to 8 bits in NumPy, then the same `resize_pad`. Both run in this one process, pinned to one
core, on the same files (synthetic radiographs written as 12-bit MONOCHROME1 DX with rescale and a window), each
timed over several rounds, alternating: images per second of wall time, and per CPU second of the process (steadier
on a shared machine). Prints one JSON line.

    .venv/bin/python benchmarks/dicom_decode.py
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import time

import numpy as np
from _common import emit, load_1m, median, setup_logging

logger = logging.getLogger("benchmarks.dicom_decode")


def _files(n: int, side: int, syntax: str | None) -> list[bytes]:
    from mura_ray.data.film import render
    from mura_ray.data.synthetic import dicom_radiograph, save_dicom

    out = []
    for i in range(n):
        image = render(("WRIST", "HAND", "ELBOW", "SHOULDER")[i % 4], None, side, np.random.default_rng(i))
        ds = dicom_radiograph(image, bits=12, monochrome1=True, slope=0.5, intercept=-1024.0,
                              window=(-300.0, 1400.0))
        buffer = io.BytesIO()
        save_dicom(ds, buffer, syntax)
        out.append(buffer.getvalue())
    return out


def _baseline(data: bytes, size: int) -> np.ndarray:
    """The plain pydicom way: LUTs applied to the whole image in floating point (unsigned stored values, a
    monotone VOI, as these files have)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from mura_ray.data.images import resize_pad

    ds = pydicom.dcmread(io.BytesIO(data))
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    # the output range: the same (monotone) functions at the two ends of the stored range
    lo, hi = apply_voi_lut(apply_modality_lut(np.array([[0, (1 << ds.BitsStored) - 1]]), ds), ds)[0]
    grey = np.round((values - lo) * (255.0 / max(hi - lo, 1e-9))).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        grey = 255 - grey
    return np.asarray(resize_pad(grey, size), dtype=np.uint8)


def _rate(fn, files: list[bytes], size: int) -> tuple[float, float]:
    """(images per second of wall time, images per CPU second of this process)."""
    started, cpu = time.perf_counter(), time.process_time()
    for data in files:
        fn(data, size)
    return len(files) / (time.perf_counter() - started), len(files) / (time.process_time() - cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=4, help="distinct synthetic radiographs per syntax")
    p.add_argument("--side", type=int, default=1024, help="longer side of each radiograph in pixels")
    p.add_argument("--image-size", type=int, default=320, help="model input side")
    p.add_argument("--rounds", type=int, default=3, help="timed passes over the files, per side")
    args = p.parse_args()
    setup_logging()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core: per-core figures, both sides alike
    from pydicom.uid import JPEG2000Lossless

    from mura_ray.data.images import load_pixels

    load_start = time.perf_counter(), load_1m()
    results = {}
    for name, syntax in (("uncompressed", None), ("jpeg2000", JPEG2000Lossless)):
        files = _files(args.files, args.side, syntax)
        # same model input from both (the window's values round alike in both)
        assert all(np.abs(load_pixels(f, args.image_size).astype(int)
                          - _baseline(f, args.image_size)).max() <= 1 for f in files[:2])
        ours, base = [], []
        for _ in range(args.rounds):
            ours.append(_rate(load_pixels, files, args.image_size))
            base.append(_rate(_baseline, files, args.image_size))
        wall, cpu = (median([r[0] for r in ours]), median([r[0] for r in base])), \
            (median([r[1] for r in ours]), median([r[1] for r in base]))
        results[name] = {"ours_img_s": round(wall[0], 2), "baseline_img_s": round(wall[1], 2),
                         "ratio": round(wall[0] / wall[1], 3), "ours_img_per_cpu_s": round(cpu[0], 2),
                         "baseline_img_per_cpu_s": round(cpu[1], 2), "cpu_ratio": round(cpu[0] / cpu[1], 3),
                         "file_kb": round(sum(map(len, files)) / len(files) / 1024, 1)}
        logger.info("%s: ours %.1f img/s, baseline %.1f img/s", name, wall[0], wall[1])
    emit({"name": "dicom_decode", "cores": 1, "side": args.side, "image_size": args.image_size,
          "files": args.files, "rounds": args.rounds, **results,
          "seconds": round(time.perf_counter() - load_start[0], 1), "load_1m_start": load_start[1],
          "load_1m_end": load_1m()})


if __name__ == "__main__":
    main()
