"""What an archive holds, before anything is decoded: one record per candidate image with its labels, split,
patient and study from MURA's CSVs and folder names (or from nothing, for raw trees), and the files ignored with
reasons. Cheap driver work: folders are walked only for the sources without CSVs."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from mura_ray import storage
from mura_ray.config import IngestConfig, UserError
from mura_ray.data.images import IMAGE_SUFFIXES
from mura_ray.labels import BODY_PARTS, parse_body_part, parse_class_folder, parse_split_folder

logger = logging.getLogger(__name__)

MURA_DIR = "MURA-v1.1"
MURA_CSVS: tuple[str, ...] = (
    "train_image_paths.csv",
    "train_labeled_studies.csv",
    "valid_image_paths.csv",
    "valid_labeled_studies.csv",
)

_MURA_IMAGE = re.compile(
    r"^MURA-v1\.1/(?P<mura_split>train|valid)/XR_(?P<part>[A-Z]+)/(?P<patient>patient\d+)/"
    r"(?P<study>study\d+)_(?P<label>positive|negative)/(?P<file>[^/]+)$"
)
_MURA_STUDY = re.compile(
    r"^(?P<study_path>MURA-v1\.1/(?:train|valid)/XR_[A-Z]+/patient\d+/study\d+_(?:positive|negative))/$"
)


@dataclass(frozen=True)
class Listing:
    """What a source holds: one record per candidate image, files ignored before decoding (with reasons), and the
    folder the images are read from (`archive`: --root, or for MURA its MURA-v1.1 folder), which --out must keep
    clear of."""

    records: pd.DataFrame
    ignored: list[dict[str, str]]
    archive: str


def image_id_for(rel_path: str) -> str:
    """Stable id of an image: a hash of its path relative to the archive root."""
    return hashlib.sha1(rel_path.encode("utf-8")).hexdigest()[:20]


def val_assignment(patient_ids: pd.Series, val_fraction: float, seed: int) -> pd.Series:
    """True for patients moved to `val`: a seeded hash of the patient id, so the split is reproducible."""

    def _unit(pid: str) -> float:
        digest = hashlib.sha256(f"{seed}:{pid}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    unique = pd.Series(patient_ids.unique())
    to_val = {pid: _unit(pid) < val_fraction for pid in unique}
    return patient_ids.map(to_val)


def _read_csv_rows(text: str, name: str, columns: int) -> list[list[str]]:
    rows = []
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != columns:
            raise UserError(f"{name} line {lineno}: expected {columns} comma-separated field(s), got {row!r}")
        rows.append([c.strip() for c in row])
    return rows


def _find_mura_base(root: str) -> str:
    """The folder that contains MURA-v1.1 (CSV paths are relative to it), from MURA-v1.1 or its parent."""
    if storage.exists(storage.join(root, MURA_DIR, MURA_CSVS[0])):
        return root.rstrip("/")
    if root.rstrip("/").endswith(MURA_DIR) and storage.exists(storage.join(root, MURA_CSVS[0])):
        return root.rstrip("/")[: -len(MURA_DIR)].rstrip("/") or "/"
    raise UserError(
        f"--root {root}: not a MURA-v1.1 dataset; expected the MURA-v1.1 folder or its parent, "
        f"with {', '.join(MURA_CSVS)}"
    )


def list_mura(root: str, val_fraction: float, seed: int) -> Listing:
    """Records from MURA's four CSVs: `valid` becomes `test`; `train` is split into train/val by patient."""
    if not storage.exists(root):
        raise UserError(f"--root {root}: no such folder")
    base = _find_mura_base(root)
    csv_dir = storage.join(base, MURA_DIR)
    for name in MURA_CSVS:
        if not storage.exists(storage.join(csv_dir, name)):
            raise UserError(f"--root {root}: {MURA_DIR}/{name} is missing; a MURA-v1.1 copy has all of {MURA_CSVS}")
    records: list[dict[str, Any]] = []
    ignored: list[dict[str, str]] = []
    for mura_split in ("train", "valid"):
        studies_name = f"{mura_split}_labeled_studies.csv"
        labels: dict[str, int] = {}
        for lineno, (study_path, label) in enumerate(
            _read_csv_rows(storage.read_bytes(storage.join(csv_dir, studies_name)).decode(), studies_name, 2), 1
        ):
            match = _MURA_STUDY.match(study_path)
            if not match or label not in ("0", "1"):
                raise UserError(
                    f"{studies_name} row {lineno}: expected 'MURA-v1.1/{mura_split}/XR_<PART>/patient<ID>/"
                    f"study<N>_<positive|negative>/,<0|1>', got {study_path!r},{label!r}"
                )
            labels[match["study_path"]] = int(label)
        images_name = f"{mura_split}_image_paths.csv"
        for lineno, (path,) in enumerate(
            _read_csv_rows(storage.read_bytes(storage.join(csv_dir, images_name)).decode(), images_name, 1), 1
        ):
            match = _MURA_IMAGE.match(path)
            if not match or match["mura_split"] != mura_split:
                raise UserError(
                    f"{images_name} row {lineno}: expected 'MURA-v1.1/{mura_split}/XR_<PART>/patient<ID>/"
                    f"study<N>_<positive|negative>/<image>', got {path!r}"
                )
            study_path = path.rsplit("/", 1)[0]
            if study_path not in labels:
                ignored.append({"path": path, "reason": f"study not listed in {studies_name}"})
                continue
            try:
                body_part = parse_body_part(match["part"])
            except ValueError as e:
                raise UserError(f"{images_name} row {lineno}: {e}") from None
            records.append(
                {
                    "path": path,
                    "patient_id": match["patient"],
                    # (split, body part, patient, study): the same patient id appears under several body parts.
                    "study_id": study_path.removeprefix(MURA_DIR + "/"),
                    "body_part": body_part,
                    "label": labels[study_path],
                    "split": "test" if mura_split == "valid" else "train",
                }
            )
    if not records:
        raise UserError(f"--root {root}: the MURA CSVs list no images")
    df = pd.DataFrame.from_records(records)
    is_train = df["split"] == "train"
    moved = val_assignment(df.loc[is_train, "patient_id"], val_fraction, seed)
    df.loc[moved[moved].index, "split"] = "val"
    df["source"] = "mura"
    return Listing(_with_ids(df, base), ignored, storage.join(base, MURA_DIR))


def _walk(root: str) -> tuple[str, list[str]]:
    """Every file under root as paths relative to it (sorted), after checking root is a folder."""
    fs, base = storage.resolve(root)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"--root {root}: no such folder")
    if info.type != pafs.FileType.Directory:
        raise UserError(f"--root {root}: expected a folder of images")
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    rel = sorted(i.path[len(base) :].lstrip("/") for i in infos if i.type == pafs.FileType.File)
    return base, rel


def _skip_reason(rel: str) -> str | None:
    name = rel.rsplit("/", 1)[-1]
    if name.startswith(".") or any(part.startswith(".") for part in rel.split("/")[:-1]):
        return "hidden file"
    if not name.lower().endswith(IMAGE_SUFFIXES):
        return f"not an image file name (expected {', '.join(IMAGE_SUFFIXES)})"
    return None


def list_folder(root: str, body_part: str | None) -> Listing:
    """ImageFolder-style sets: `.../{train,val|valid,test}/{class}/image`, classes mapped by name, never by order."""
    _, files = _walk(root)
    records, ignored = [], []
    part = parse_body_part(body_part) if body_part else None
    for rel in files:
        reason = _skip_reason(rel)
        if reason:
            ignored.append({"path": rel, "reason": reason})
            continue
        parts = rel.split("/")
        if len(parts) < 2:
            ignored.append({"path": rel, "reason": "not inside a class folder"})
            continue
        class_folder = parts[-2]
        split = parse_split_folder(parts[-3]) if len(parts) >= 3 else None
        try:
            label = parse_class_folder(class_folder)
        except ValueError as e:
            raise UserError(f"--root {root}: folder {'/'.join(parts[:-1])!r}: {e}") from None
        records.append(
            {
                "path": rel,
                "patient_id": None,
                "study_id": None,
                "body_part": part,
                "label": label,
                "split": split,
                "source": "folder",
            }
        )
    if not records:
        raise UserError(f"--root {root}: no images in class folders (e.g. train/fractured/*.png) found")
    outside = sum(r["split"] is None for r in records)
    if outside:
        # Not an error: a set without split folders is a test set. But `--root set/train` is a likely slip (the
        # folder of one split given instead of the set's): say where its images went.
        logger.warning(
            "--root %s: %d of %d images are not in a train/, val/ (valid/) or test/ folder; they go to the test "
            "split. To keep a set's splits, give the folder that holds its train/, val/ and test/ folders",
            root, outside, len(records))
    for r in records:
        r["split"] = r["split"] or "test"
    return Listing(_with_ids(pd.DataFrame.from_records(records), root), ignored, root)


def list_images(root: str, source: str = "images") -> Listing:
    """Any tree of radiographs for bulk scoring: no labels, split `test`; body part from an `XR_<PART>` folder.
    `dicom`: every file that is not hidden, whatever its name (DICOM is recognised by content, and its body part,
    study and patient come from its header, `dicom.inspect_dicom`)."""
    _, files = _walk(root)
    records, ignored = [], []
    for rel in files:
        reason = _skip_reason(rel)
        if source == "dicom" and reason and reason != "hidden file":
            reason = None
        if reason:
            ignored.append({"path": rel, "reason": reason})
            continue
        part = next(
            (p.removeprefix("XR_") for p in rel.split("/")[:-1] if p.startswith("XR_") and p[3:] in BODY_PARTS),
            None,
        )
        records.append(
            {"path": rel, "patient_id": None, "study_id": None, "body_part": part, "label": None,
             "split": "test", "source": source}
        )
    if not records:
        raise UserError(f"--root {root}: no {'files' if source == 'dicom' else 'PNG or JPEG images'} found")
    return Listing(_with_ids(pd.DataFrame.from_records(records), root), ignored, root)


def _with_ids(df: pd.DataFrame, base: str) -> pd.DataFrame:
    df = df.copy()
    df["image_id"] = df["path"].map(image_id_for)
    df["uri"] = df["path"].map(lambda p: storage.join(base, p))
    return df


def list_source(cfg: IngestConfig) -> Listing:
    if cfg.source == "mura":
        return list_mura(cfg.root, cfg.val_fraction, cfg.seed)
    if cfg.source == "folder":
        return list_folder(cfg.root, cfg.body_part)
    return list_images(cfg.root, cfg.source)
