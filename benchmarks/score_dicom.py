"""Bulk scoring of a DICOM folder: `jobs/score.py --input` on a PACS-like export (one DICOM file per view, studies
by StudyInstanceUID) against the same images as a folder of 8-bit PNGs, scored by the same job in the same way.

The images are synthetic radiographs (longer side `--source-size`), written as 12-bit MONOCHROME1 DX with rescale
and a window, uncompressed or JPEG 2000 (`--syntax`), and as the PNGs of their decoded 8-bit pixels (what ingest
stores of a DICOM view). Each run is a fresh `python jobs/score.py ... --no-report --gpu no` process with its own
local Ray, timed from its start to its exit; the two inputs alternate, `--repeats` runs each, medians reported.
Images/s per input and their ratio (DICOM / PNG) show what reading DICOM costs the nightly job. Prints one JSON line.

    .venv/bin/python benchmarks/score_dicom.py                          # 1,000 views of 512 px, uncompressed
    .venv/bin/python benchmarks/score_dicom.py --syntax jpeg2000
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import cores, emit, export_random_model, load_1m, median, setup_logging

logger = logging.getLogger("benchmarks.score_dicom")

REPO = Path(__file__).resolve().parents[1]
SYNTAXES = {"uncompressed": None, "jpeg2000": "1.2.840.10008.1.2.4.90"}  # JPEG 2000 lossless


def write_archive(root: Path, n: int, side: int, syntax: str) -> tuple[Path, Path]:
    """`n` views as DICOM files (studies of 3 views) and as PNGs of their decoded pixels."""
    from mura_ray.data import dicom
    from mura_ray.data.film import render
    from mura_ray.data.images import decode_radiograph
    from mura_ray.data.synthetic import dicom_radiograph, save_dicom

    dicoms, pngs = root / "dicom", root / "png"
    for i in range(n):
        part = ("WRIST", "HAND", "ELBOW", "SHOULDER")[i % 4]
        image = render(part, None, side, np.random.default_rng(i))
        ds = dicom_radiograph(image, bits=12, monochrome1=True, slope=0.5, intercept=-1024.0,
                              window=(-300.0, 1400.0),
                              header={"StudyInstanceUID": f"1.2.826.0.1.3680043.10.1.{i // 3}",
                                      "BodyPartExamined": part})
        study = dicoms / f"study{i // 3:05d}"
        study.mkdir(parents=True, exist_ok=True)
        save_dicom(ds, study / f"IM{i:05d}", SYNTAXES[syntax])
        png = pngs / f"study{i // 3:05d}"
        png.mkdir(parents=True, exist_ok=True)
        (png / f"{i:05d}.png").write_bytes(dicom.encode_png(decode_radiograph((study / f"IM{i:05d}").read_bytes())))
    return dicoms, pngs


def run_job(model: str, src: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    from mura_ray.predictions import read_predictions

    cmd = [sys.executable, str(REPO / "jobs" / "score.py"), "--model", model, "--input", str(src), "--out", str(out),
           "--no-report", "--gpu", "no", "--concurrency", str(args.concurrency)]
    started = time.perf_counter()
    with out.with_suffix(".log").open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"jobs/score.py failed ({proc.returncode}); see {out.with_suffix('.log')}")
    rows = read_predictions(str(out), columns=["prob_abnormal", "error"])
    scored = int(rows["prob_abnormal"].notna().sum())
    if scored != args.images or rows["error"].notna().any():
        raise RuntimeError(f"{src}: {scored} of {args.images} images scored")
    return {"seconds": round(seconds, 2), "images_per_s": round(scored / seconds, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--source-size", type=int, default=512)
    p.add_argument("--syntax", choices=tuple(SYNTAXES), default="uncompressed")
    p.add_argument("--backbone", default="efficientnet_b0")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--concurrency", type=int, default=cores())
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    setup_logging()
    load_start = load_1m()
    with tempfile.TemporaryDirectory(prefix="bench-score-dicom-") as tmp:
        root = Path(tmp)
        dicoms, pngs = write_archive(root, args.images, args.source_size, args.syntax)
        model = export_random_model(str(root / "model"), args.backbone, args.image_size)
        runs: dict[str, list[dict[str, float]]] = {"dicom": [], "png": []}
        for i in range(args.repeats):
            for name, src in (("png", pngs), ("dicom", dicoms)):
                runs[name].append(run_job(model, src, root / f"{name}-{i}", args))
                logger.info("%s run %d: %s", name, i, runs[name][-1])
    dicom_rate = median([r["images_per_s"] for r in runs["dicom"]])
    png_rate = median([r["images_per_s"] for r in runs["png"]])
    emit({"name": "score_dicom", "images": args.images, "syntax": args.syntax, "source_px": args.source_size,
          "image_size": args.image_size, "dicom_images_per_s": dicom_rate, "png_images_per_s": png_rate,
          "ratio": round(dicom_rate / png_rate, 3), "runs": runs, "load_1m_start": load_start,
          "load_1m_end": load_1m()})


if __name__ == "__main__":
    main()
