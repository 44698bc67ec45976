"""Synthetic radiographs laid out exactly like MURA-v1.1, so demos and tests run the real ingest path offline.

Each body part has its own bone-like anatomy (`anatomy`); abnormal studies show fractures, displaced fragments or
hardware (`lesions`); `film` renders one view as a radiograph. This module plans patients and studies, writes the
PNGs and MURA's CSVs, and caches the demo set.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pathlib
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from mura_ray.data.film import render
from mura_ray.data.lesions import LESION_KINDS, Lesion
from mura_ray.labels import BODY_PARTS

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
"""Bumped whenever the images change, so cached demo sets are rebuilt rather than silently reused."""

DATASET_DIR = "MURA-v1.1"

# Share of studies per body part, close to MURA-v1.1's train split (wrist and shoulder most common).
_BODY_PART_WEIGHTS: dict[str, float] = {
    "ELBOW": 0.13,
    "FINGER": 0.14,
    "FOREARM": 0.06,
    "HAND": 0.15,
    "HUMERUS": 0.05,
    "SHOULDER": 0.22,
    "WRIST": 0.25,
}
_ABNORMAL_RATE = 0.4
_VISIBLE_RATE = 0.8  # share of an abnormal study's images that show the abnormality
_PARTS_PER_PATIENT = (0.78, 0.18, 0.04)  # P(1, 2, 3 body parts)
_STUDIES_PER_PART = (0.85, 0.12, 0.03)  # P(1, 2, 3 studies of one body part)
_VIEWS_PER_STUDY = (0.08, 0.37, 0.40, 0.15)  # P(1, 2, 3, 4 images)
_RGB_RATE = 0.1
_UINT16_RATE = 0.1
_LESION_WEIGHTS = (0.45, 0.14, 0.06, 0.35)  # of LESION_KINDS, in order
assert set(_BODY_PART_WEIGHTS) == set(BODY_PARTS) and len(_LESION_WEIGHTS) == len(LESION_KINDS)


@dataclass(frozen=True)
class _Study:
    """One study of the plan; its views draw from generators seeded by `seed` and the view number."""

    split: Literal["train", "valid"]
    patient: int
    body_part: str
    number: int
    abnormal: bool
    n_views: int
    seed: int

    @property
    def path(self) -> str:
        """Relative to the folder containing MURA-v1.1, with MURA's trailing slash."""
        outcome = "positive" if self.abnormal else "negative"
        return f"{DATASET_DIR}/{self.split}/XR_{self.body_part}/patient{self.patient:05d}/study{self.number}_{outcome}/"


def _plan(n_images: int, seed: int, valid_fraction: float) -> list[_Study]:
    """Patients, their studies and splits; the first patients cover every body part and one spans two."""
    rng = np.random.default_rng(seed)
    weights = np.array([_BODY_PART_WEIGHTS[p] for p in BODY_PARTS])
    weights /= weights.sum()
    patients: list[list[tuple[str, int, bool, int, int]]] = []
    total = 0
    while total < n_images or len(patients) < len(BODY_PARTS):
        index = len(patients)
        n_parts = 1 + int(rng.choice(3, p=_PARTS_PER_PATIENT))
        if index == 0:
            n_parts = max(n_parts, 2)
        parts = [str(p) for p in rng.choice(BODY_PARTS, size=n_parts, replace=False, p=weights)]
        if index < len(BODY_PARTS):
            forced = BODY_PARTS[index]
            parts = [forced, *(p for p in parts if p != forced)][:n_parts]
        studies = []
        for part in parts:
            for number in range(1, 2 + int(rng.choice(3, p=_STUDIES_PER_PART))):
                n_views = 1 + int(rng.choice(4, p=_VIEWS_PER_STUDY))
                abnormal = bool(rng.random() < _ABNORMAL_RATE)
                studies.append((part, number, abnormal, n_views, int(rng.integers(2**62))))
                total += n_views
        patients.append(studies)

    valid: set[int] = set()
    n_valid = 0
    for index in rng.permutation(np.arange(len(BODY_PARTS), len(patients))):
        if n_valid >= valid_fraction * total:
            break
        valid.add(int(index))
        n_valid += sum(s[3] for s in patients[index])
    order = [i for i in range(len(patients)) if i not in valid] + sorted(valid)
    if len(order) > 99_999:
        raise ValueError(f"{len(order)} patients do not fit MURA's 5-digit patient ids; ask for fewer images")
    plan = []
    for patient, index in enumerate(order, start=1):
        split: Literal["train", "valid"] = "valid" if index in valid else "train"
        plan += [_Study(split, patient, *study) for study in patients[index]]
    return plan


def _study_lesions(study: _Study) -> list[Lesion | None]:
    """What each view of the study shows: most views of an abnormal study show its lesion, at least one does."""
    if not study.abnormal:
        return [None] * study.n_views
    rng = np.random.default_rng([study.seed, 0])
    lesion = Lesion(LESION_KINDS[rng.choice(len(LESION_KINDS), p=_LESION_WEIGHTS)], rng.random(), rng.random())
    visible = rng.random(study.n_views) < _VISIBLE_RATE
    if not visible.any():
        visible[rng.integers(study.n_views)] = True
    return [lesion if v else None for v in visible]


def _encode(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """8-bit grey mostly, with a share of RGB and full-range 16-bit files, as MURA mixes them."""
    draw = rng.random()
    if draw < _UINT16_RATE:
        low, high = float(image.min()), float(image.max())
        scaled = (image - low) / max(high - low, 1e-6) * 65535.0
        return Image.fromarray(np.round(scaled).astype(np.uint16))
    grey = np.round(image * 255.0).astype(np.uint8)
    if draw < _UINT16_RATE + _RGB_RATE:
        tint = rng.uniform(0.94, 1.0, 3)
        rgb = np.round(grey[..., None] * tint).astype(np.uint8)
        return Image.fromarray(rgb)
    return Image.fromarray(grey)


def _write_studies(root: str, studies: list[_Study], image_size: int) -> None:
    """Render and save every view of some studies (a unit of work for the process pool)."""
    for study in studies:
        folder = pathlib.Path(root) / study.path
        folder.mkdir(parents=True)
        for view, lesion in enumerate(_study_lesions(study), start=1):
            rng = np.random.default_rng([study.seed, view])
            image = render(study.body_part, lesion, image_size, rng)
            _encode(image, rng).save(folder / f"image{view}.png")


def generate_mura(
    root: str | os.PathLike,
    *,
    n_images: int = 2000,
    image_size: int = 256,
    seed: int = 0,
    valid_fraction: float = 0.15,
    workers: int = 1,
) -> pathlib.Path:
    """Write a synthetic MURA-v1.1 tree under root; returns root/'MURA-v1.1'.

    Deterministic by seed (same seed → byte-identical files, whatever `workers`: every image draws from its own
    generator, seeded by its study and view). `n_images` is met to within a few images, except that the first
    patients always cover all seven body parts. `workers` > 1 renders studies in that many processes.
    """
    problems = []
    if n_images < 1:
        problems.append(f"n_images must be at least 1, got {n_images}")
    if image_size < 16:
        problems.append(f"image_size must be at least 16 pixels, got {image_size}")
    if not 0.0 <= valid_fraction < 1.0:
        problems.append(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if problems:
        raise ValueError("; ".join(problems))
    dataset = pathlib.Path(root) / DATASET_DIR
    if dataset.exists():
        raise FileExistsError(f"{dataset} already exists; delete it or pass another root")

    started = time.perf_counter()
    plan = _plan(n_images, seed, valid_fraction)
    n_total = sum(s.n_views for s in plan)
    logger.info("Writing %d synthetic images in %d studies to %s", n_total, len(plan), dataset)
    image_lines: dict[str, list[str]] = {"train": [], "valid": []}
    study_lines: dict[str, list[str]] = {"train": [], "valid": []}
    for study in plan:
        study_lines[study.split].append(f"{study.path},{int(study.abnormal)}\n")
        image_lines[study.split] += [f"{study.path}image{view}.png\n" for view in range(1, study.n_views + 1)]
    batches = [plan[i : i + 16] for i in range(0, len(plan), 16)]
    if workers > 1 and len(batches) > 1:
        # Spawned, not forked: the caller may hold threads (a Ray driver does).
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(batches)), mp_context=context) as pool:
            for _ in pool.map(_write_studies, [str(root)] * len(batches), batches, [image_size] * len(batches)):
                pass
    else:
        for batch in batches:
            _write_studies(str(root), batch, image_size)
    for split in ("train", "valid"):
        (dataset / f"{split}_image_paths.csv").write_text("".join(image_lines[split]))
        (dataset / f"{split}_labeled_studies.csv").write_text("".join(study_lines[split]))
    logger.info("Wrote %d images in %.1f s", n_total, time.perf_counter() - started)
    return dataset


def _cache_dir() -> pathlib.Path:
    if env := os.environ.get("MURA_RAY_CACHE"):
        return pathlib.Path(env)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(xdg) / "mura_ray"
    return pathlib.Path.home() / ".cache" / "mura_ray"


def demo_dataset_root(n_images: int = 2000, image_size: int = 256, seed: int = 0) -> pathlib.Path:
    """Build once and cache; return the folder that contains MURA-v1.1 (what a user passes as --root).

    The cache is $MURA_RAY_CACHE, else $XDG_CACHE_HOME/mura_ray, else ~/.cache/mura_ray. The set is built in a
    temporary sibling and renamed into place, so an interrupted build never looks complete and concurrent
    builders never mix their files.
    """
    cache = _cache_dir()
    final = cache / f"synthetic-mura-v{GENERATOR_VERSION}-n{n_images}-px{image_size}-seed{seed}"
    if final.is_dir():
        logger.info("Using cached synthetic MURA at %s", final)
        return final
    cache.mkdir(parents=True, exist_ok=True)
    building = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache))
    try:
        generate_mura(building, n_images=n_images, image_size=image_size, seed=seed, workers=os.cpu_count() or 1)
        try:
            os.replace(building, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another builder: a real failure
                raise
            logger.info("Another process finished %s first; using its copy", final)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return final


def dicom_radiograph(image: np.ndarray, *, bits: int = 12, monochrome1: bool = False, slope: float = 1.0,
                     intercept: float = 0.0, window: tuple[float, float] | None = None,
                     header: dict[str, str] | None = None) -> Any:
    """A synthetic radiograph (`film.render`'s floats in [0, 1]) as a single-frame DX pydicom Dataset, as a PACS
    exports one: `bits` stored bits (MONOCHROME1 stores the inverted values), RescaleSlope/Intercept and an
    optional window (centre, width in rescaled units); `header` sets other attributes (PatientName,
    StudyInstanceUID, BodyPartExamined, ...). Save it with `save_dicom`."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    top = (1 << bits) - 1
    stored = np.round(np.clip(image, 0.0, 1.0) * top).astype(np.uint8 if bits <= 8 else np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_pixel_data(top - stored if monochrome1 else stored, "MONOCHROME1" if monochrome1 else "MONOCHROME2",
                      bits)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "DX"
    if (slope, intercept) != (1.0, 0.0):
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    for name, value in (header or {}).items():
        setattr(ds, name, value)
    return ds


def save_dicom(ds: Any, path: str | os.PathLike, transfer_syntax: str | None = None) -> None:
    """Write a Dataset as a DICOM file (preamble and file meta), compressed to `transfer_syntax` when given:
    pydicom encodes RLE, JPEG-LS (pyjpegls) and JPEG 2000 (pylibjpeg-openjpeg); deflate is the whole dataset's."""
    from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

    if transfer_syntax is not None and UID(transfer_syntax).is_compressed:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    elif transfer_syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
