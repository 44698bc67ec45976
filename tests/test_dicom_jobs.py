"""DICOM through the jobs: `ingest --source dicom` and scoring a raw DICOM folder, end to end through their CLIs,
and no patient identifier of the archive in anything they write or log."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ingest as ingest_job
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import score as score_job
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from mura_ray import predictions
from mura_ray.data import dicom
from mura_ray.data.film import render
from mura_ray.data.images import load_pixels
from mura_ray.data.synthetic import dicom_radiograph, save_dicom

IDENTITY = {
    "PatientName": "Zyxwardson^Quillimena", "PatientID": "PID-4471-XQ", "PatientBirthDate": "19431107",
    "AccessionNumber": "ACC99173355", "InstitutionName": "Saint Oswyth Infirmary",
    "ReferringPhysicianName": "Brackenfold^Ormund", "PerformingPhysicianName": "Thistlewood^Amarante",
}
"""Identifiers written into the archive's headers; none may reach an output or a log."""
STUDY_HAND, STUDY_WRIST = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"


def _pacs_export(root: Path) -> dict[str, str]:
    """A PACS-like export: extensionless and UID-named files, two studies of one patient (HAND in
    BodyPartExamined, WRIST only in the series description), MONOCHROME1 and compressed views, pydicom's CR files,
    objects without pixels, a truncated file, a second copy of one instance and a text file. Returns
    {relative path: what it is}."""
    rng = np.random.default_rng(7)
    files = {}
    for i, (study, part, mono1, syntax) in enumerate([
        (STUDY_HAND, {"BodyPartExamined": "HAND"}, False, None),
        (STUDY_HAND, {"BodyPartExamined": "HAND"}, True, RLELossless),
        (STUDY_WRIST, {"SeriesDescription": "XR WRIST PA"}, True, JPEG2000Lossless),
    ]):
        body = "HAND" if "BodyPartExamined" in part else "WRIST"
        ds = dicom_radiograph(render(body, None, 72, rng), monochrome1=mono1,
                              header={**IDENTITY, **part, "StudyInstanceUID": study})
        rel = f"export/s1/IM{i:04d}" if i < 2 else f"export/{ds.SOPInstanceUID}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        save_dicom(ds, root / rel, syntax)
        files[rel] = "image"
    (root / "export/z_copy").mkdir()
    shutil.copy(root / "export/s1/IM0000", root / "export/z_copy/IM0000")
    files["export/z_copy/IM0000"] = "copy"
    for name, kind in (("dicomdirtests/77654033/CR1/6154", "image"), ("rtplan.dcm", "skip"),
                       ("test-SR.dcm", "skip"), ("MR_truncated.dcm", "error")):
        rel = "other/" + name.replace("/", "_")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(name, download=False), root / rel)
        files[rel] = kind
    (root / "export" / "README.txt").write_text("exported by the PACS\n")
    files["export/README.txt"] = "skip"
    return files


def _assert_no_identifiers(paths: list[Path], texts: list[str]) -> None:
    needles = [v.encode() for v in IDENTITY.values()] + [v.split("^")[0].encode() for v in IDENTITY.values()]
    for path in paths:
        data = path.read_bytes()
        if path.suffix == ".parquet":  # compressed pages: search the values
            data += str(pq.read_table(path).drop_columns(
                [c for c in ("image",) if c in pq.read_schema(path).names]).to_pylist()).encode()
        for needle in needles:
            assert needle not in data, f"{needle!r} in {path}"
    for text in texts:
        for needle in needles:
            assert needle.decode() not in text


def _written(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _ray_logs() -> list[Path]:
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())  # where worker logs go
    return [p for p in (session / "logs").rglob("*") if p.is_file() and p.suffix in (".out", ".err", ".log")]


@pytest.mark.slow
def test_ingest_and_score_a_dicom_export(ray_cluster, exported_model, tmp_path, monkeypatch, capfd, caplog):
    archive = tmp_path / "pacs"
    files = _pacs_export(archive)
    out, scored = tmp_path / "dataset", tmp_path / "scored"
    monkeypatch.delenv(dicom.PATIENT_KEY_ENV, raising=False)
    monkeypatch.delenv(dicom.PATIENT_KEY_FILE_ENV, raising=False)

    # Without a key: refused, one line, nothing written.
    assert ingest_job.main(["--source", "dicom", "--root", str(archive), "--out", str(out)]) == 2
    logs = [capfd.readouterr()]
    assert "--no-patient-key" in logs[-1].err and not out.exists()

    (tmp_path / "key").write_text("a-secret-key\n")
    monkeypatch.setenv(dicom.PATIENT_KEY_FILE_ENV, str(tmp_path / "key"))
    assert ingest_job.main(["--source", "dicom", "--root", str(archive), "--out", str(out),
                            "--max-error-rate", "0.3"]) == 0
    logs.append(capfd.readouterr())
    rows = pq.read_table(out / "test").to_pandas()
    summary = json.loads((out / "ingest_summary.json").read_text())
    images = sorted(p for p, kind in files.items() if kind == "image")
    assert sorted(rows["path"]) == images and summary["n_images"] == len(images)
    assert set(rows["source"]) == {"dicom"} and set(rows["split"]) == {"test"} and rows["label"].isna().all()
    by_path = rows.set_index("path")
    assert by_path.loc["export/s1/IM0000", "study_id"] == STUDY_HAND
    assert by_path.loc["export/s1/IM0000", "body_part"] == "HAND"
    wrist = next(p for p in images if p.startswith("export/1."))
    assert by_path.loc[wrist, "body_part"] == "WRIST" and by_path.loc[wrist, "study_id"] == STUDY_WRIST
    assert pd.isna(by_path.loc["other/dicomdirtests_77654033_CR1_6154", "body_part"])  # CSPINE: not MURA's
    assert by_path.loc[wrist, "image_id"] == wrist.rsplit("/", 1)[1] + "-1"  # SOPInstanceUID and frame
    expected = dicom.hash_patient(IDENTITY["PatientID"], b"a-secret-key")
    assert set(rows.loc[rows["path"].str.startswith("export/"), "patient_id"]) == {expected}
    # Stored as the decoded 8-bit image in PNG: the model input of the DICOM file itself, and the same for the
    # MONOCHROME1 (RLE) and MONOCHROME2 views of one hand.
    for path in images:
        stored = by_path.loc[path, "image"]
        assert stored.startswith(b"\x89PNG")
        assert np.array_equal(load_pixels(stored, 32), load_pixels((archive / path).read_bytes(), 32))
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    reasons = {e["path"]: e for e in errors}
    assert reasons["other/MR_truncated.dcm"]["reason"].startswith("cannot decode the pixel data")
    assert "ignored" not in reasons["other/MR_truncated.dcm"]
    assert reasons["other/rtplan.dcm"]["reason"].startswith("DICOM object without pixel data (RT Plan Storage)")
    assert reasons["other/test-SR.dcm"]["ignored"] and reasons["export/README.txt"]["reason"] == "not a DICOM file"
    assert reasons["export/z_copy/IM0000"]["reason"] == "the same SOPInstanceUID as export/s1/IM0000"
    assert (summary["n_errors"], summary["n_ignored"]) == (1, 4)

    # Scoring the raw folder: every candidate file gets a row (error rows with reasons), studies by
    # StudyInstanceUID; a re-run scores nothing twice.
    model = str(exported_model)
    assert score_job.main(["--model", model, "--input", str(archive), "--out", str(scored), "--gpu", "no",
                           "--chunk-size", "4"]) == 0
    df = predictions.read_predictions(str(scored))
    candidates = sorted(p for p in files if p != "export/README.txt")
    assert len(df) == len(candidates) - 1  # the copy of IM0000 is the same instance: scored once
    assert df["image_id"].is_unique
    ok = df[df["error"].isna()].set_index("path")
    assert sorted(ok.index) == images
    assert ok.loc["export/s1/IM0000", "study_id"] == STUDY_HAND and ok.loc[wrist, "study_id"] == STUDY_WRIST
    assert ok.loc["export/s1/IM0000", "body_part"] == "HAND"
    assert ok.loc[wrist, "image_id"] == by_path.loc[wrist, "image_id"]  # the ids ingest gives
    failed = df[df["error"].notna()].set_index("path")["error"]
    assert failed["other/MR_truncated.dcm"].startswith("cannot decode the pixel data")
    assert failed["other/rtplan.dcm"].startswith("DICOM object without pixel data")
    logs.append(capfd.readouterr())
    assert score_job.main(["--model", model, "--input", str(archive), "--out", str(scored), "--gpu", "no"]) == 0
    logs.append(capfd.readouterr())
    assert "scored 0 images" in logs[-1].out
    assert len(predictions.read_predictions(str(scored))) == len(df)
    # A new copy of an instance scored last night, under a new path: read, and dropped as the same instance.
    shutil.copytree(archive / "export/s1", archive / "export/s1_again")
    assert score_job.main(["--model", model, "--input", str(archive), "--out", str(scored), "--gpu", "no"]) == 0
    logs.append(capfd.readouterr())
    # (the copy in z_copy, never committed under its own path, is read and dropped again each run)
    assert "scored 0 images" in logs[-1].out and "and 3 repeated in the input" in logs[-1].out
    assert len(predictions.read_predictions(str(scored))) == len(df)

    logs.append(capfd.readouterr())
    assert len(_written(out)) >= 3 and len(_ray_logs()) > 3
    _assert_no_identifiers(_written(out) + _written(scored) + _ray_logs(),
                           [t for c in logs for t in (c.out, c.err)] + [caplog.text])
