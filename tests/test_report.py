"""Report building, rendering and the `jobs/report.py` entry point, on tiny hand-made predictions."""

from __future__ import annotations

import datetime as dt
import importlib.util
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mura_ray import storage
from mura_ray.compare import compare_reports
from mura_ray.config import UserError
from mura_ray.labels import BODY_PARTS
from mura_ray.predictions import load_predictions
from mura_ray.render import render_markdown
from mura_ray.report import ReportConfig, build_report, write_report

JOB = Path(__file__).resolve().parents[1] / "jobs" / "report.py"

# Seven scored images and one failed one. At threshold 0.5:
#   images: a1 TP, a2 FN, a3 FN, b1 FP, b2 TP, c FP, d TN              -> [[1, 2], [2, 2]]
#   studies: A mean 0.4667 label 1 -> FN; B mean 0.7 label max(0, 1) = 1 -> TP;
#            c and d have no study_id, so each is its own study: c FP, d TN -> [[1, 1], [1, 1]]
ROWS = [
    # image_id, study_id, body_part, body_part_pred, prob_abnormal, label, error
    ("a1", "A", "ELBOW", "ELBOW", 0.9, 1, None),
    ("a2", "A", "ELBOW", "ELBOW", 0.2, 1, None),
    ("a3", "A", "ELBOW", "HAND", 0.3, 1, None),
    ("b1", "B", "HAND", "HAND", 0.6, 0, None),
    ("b2", "B", "HAND", "HAND", 0.8, 1, None),
    ("c", None, "WRIST", "WRIST", 0.7, 0, None),
    ("d", None, "WRIST", "WRIST", 0.1, 0, None),
    ("e", "E", "WRIST", None, None, 1, "cannot decode image"),
]


def predictions_table(rows: list[tuple] = ROWS, model_id: str = "resnet18-test") -> pa.Table:
    """The scoring job's schema, filled from `rows`."""
    n = len(rows)
    image_id, study_id, part, part_pred, prob, label, error = (list(c) for c in zip(*rows, strict=True))
    probs = [None if p is None else [1.0 / len(BODY_PARTS)] * len(BODY_PARTS) for p in prob]
    return pa.table(
        {
            "image_id": pa.array(image_id, pa.string()),
            "path": pa.array([f"/data/{i}.png" for i in image_id], pa.string()),
            "study_id": pa.array(study_id, pa.string()),
            "body_part": pa.array(part, pa.string()),
            "body_part_pred": pa.array(part_pred, pa.string()),
            "body_part_probs": pa.array(probs, pa.list_(pa.float32(), len(BODY_PARTS))),
            "prob_abnormal": pa.array(prob, pa.float32()),
            "pred_abnormal": pa.array([None if p is None else int(p >= 0.5) for p in prob], pa.int8()),
            "label": pa.array(label, pa.int8()),
            "model_id": pa.array([model_id] * n, pa.string()),
            "scored_at": pa.array([dt.datetime(2026, 1, 1)] * n, pa.timestamp("us")),
            "error": pa.array(error, pa.string()),
        }
    )


def write_predictions(directory: Path, rows: list[tuple] = ROWS, model_id: str = "resnet18-test") -> Path:
    """A Parquet dataset directory of two files, like a Ray Data write."""
    directory.mkdir(parents=True)
    table = predictions_table(rows, model_id)
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), directory / "part-0.parquet")
    pq.write_table(table.slice(half), directory / "part-1.parquet")
    return directory


@pytest.fixture
def df() -> pd.DataFrame:
    return predictions_table().to_pandas()


def load_job():
    spec = importlib.util.spec_from_file_location("report_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# build_report


def test_build_report_counts_and_levels(df):
    r = build_report(df, bootstrap=0)
    assert (r["n_rows"], r["n_images"], r["n_studies"], r["n_errors"]) == (8, 7, 4, 1)
    assert r["threshold"] == 0.5 and r["threshold_source"] == "default"
    assert r["model_id"] == "resnet18-test"
    assert r["image_level"]["confusion_matrix"] == [[1, 2], [2, 2]]
    assert r["study_level"]["confusion_matrix"] == [[1, 1], [1, 1]]
    for level in ("image_level", "study_level"):
        m = r[level]
        for key in ("accuracy", "roc_auc", "cohen_kappa", "confusion_matrix", "per_class", "macro_avg",
                    "weighted_avg"):
            assert key in m
        assert set(m["per_class"]) == {"0", "1"}
        assert set(m["per_class"]["1"]) == {"precision", "recall", "f1", "support"}
    json.dumps(r, allow_nan=False)  # strictly JSON: no NaN anywhere


def test_build_report_body_parts(df):
    r = build_report(df, bootstrap=0)
    assert list(r["per_body_part"]) == ["ELBOW", "HAND", "WRIST"]
    elbow = r["per_body_part"]["ELBOW"]
    assert elbow["image_level"]["n"] == 3 and elbow["study_level"]["n"] == 1
    # ELBOW has only abnormal images: AUC undefined, said so, no crash.
    assert elbow["image_level"]["roc_auc"] is None and "roc_auc" in elbow["image_level"]["notes"]
    assert r["per_body_part"]["WRIST"]["study_level"]["n"] == 2  # c and d are their own studies
    bp = r["body_part"]
    assert bp["accuracy"] == pytest.approx(6 / 7)  # a3 is predicted HAND; e failed and is excluded
    assert set(bp["per_class"]) == {"ELBOW", "HAND", "WRIST"}
    assert {"accuracy", "macro_f1", "per_class"} <= set(bp)


def test_build_report_without_body_parts(df):
    df["body_part"] = None
    r = build_report(df, bootstrap=0)
    assert "per_body_part" not in r and "body_part" not in r
    assert r["n_images"] == 7


def test_build_report_bootstrap_ci(df):
    r = build_report(df, bootstrap=30, seed=1)
    lo, hi = r["image_level"]["roc_auc_ci95"]
    assert 0.0 <= lo <= hi <= 1.0
    assert "cohen_kappa_ci95" in r["study_level"]


def test_unlabelled_predictions_load_but_do_not_report(tmp_path):
    # The scoring job loads its predictions and reports only when they carry labels.
    pq.write_table(predictions_table().drop_columns(["label"]), tmp_path / "p.parquet")
    df = load_predictions(str(tmp_path / "p.parquet"))
    assert "label" not in df and len(df) == 8 and "body_part_probs" not in df
    with pytest.raises(ValueError, match="ground truth"):
        build_report(df)


def test_load_predictions_reads_only_committed_parts(tmp_path):
    # Scoring output: DEST/manifest.json commits part-0; part-1 is a stray file from an interrupted run.
    write_predictions(tmp_path / "dest" / "predictions")
    storage.write_json(str(tmp_path / "dest" / "manifest.json"), {"parts": {"part-0.parquet": {"chunk": 0}}})
    for uri in (tmp_path / "dest", tmp_path / "dest" / "predictions"):
        assert load_predictions(str(uri))["image_id"].tolist() == ["a1", "a2", "a3", "b1"]
    assert len(load_predictions(str(tmp_path / "dest" / "predictions" / "part-1.parquet"))) == 4


def test_build_report_rejects_bad_labels(df):
    df.loc[0, "label"] = 2
    with pytest.raises(ValueError, match="label must be 0"):
        build_report(df, bootstrap=0)


def test_build_report_needs_usable_rows(df):
    df["error"] = "boom"
    with pytest.raises(ValueError, match="no rows to report on"):
        build_report(df, bootstrap=0)


# ---------------------------------------------------------------------------------------------------------------
# write_report


def test_write_report_outputs(df, tmp_path):
    r = build_report(df, bootstrap=10)
    out = tmp_path / "out"
    write_report(r, df, str(out), explanations=[("a1: abnormal <0.90>", b"\x89PNG fake heatmap")])
    assert json.loads((out / "report.json").read_text())["n_images"] == 7
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"roc.png", "precision_recall.png", "confusion_matrix.png", "calibration.png",
            "per_body_part.png", "body_part_confusion.png"} <= figures
    assert all((out / "figures" / f).read_bytes().startswith(b"\x89PNG") for f in figures)

    md = (out / "report.md").read_text()
    assert "| Class        | Precision | Recall | F1-score | Support |" in md
    assert "| Accuracy     |           |        | 0.4286   | 7       |" in md  # 3 of 7 images right
    assert "ROC AUC Score:" in md and "Cohen's Kappa Score:" in md
    assert "| Elbow " in md and "Body part classification" in md

    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    assert page.count('src="data:image/png;base64,') == len(figures) + 1  # + the Grad-CAM image
    assert "Grad-CAM" in page and "a1: abnormal &lt;0.90&gt;" in page


def test_write_report_without_body_parts_or_second_class(tmp_path):
    rows = [(f"i{k}", f"s{k // 2}", None, None, p, 0, None) for k, p in enumerate([0.1, 0.2, 0.7, 0.4])]
    df = predictions_table(rows).to_pandas()
    r = build_report(df, bootstrap=10)
    assert r["image_level"]["roc_auc"] is None
    write_report(r, df, str(tmp_path / "out"))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "ROC AUC Score: -" in md and "only one class present" in md
    assert not (tmp_path / "out" / "figures" / "per_body_part.png").exists()


def test_write_report_to_s3(df, s3_server):
    # conftest's s3_server only (its s3_bucket fixture also starts Ray, which reports do not need).
    boto3 = pytest.importorskip("boto3")
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="reports")
    r = build_report(df, bootstrap=0)
    write_report(r, df, "s3://reports/run1")
    assert storage.read_json("s3://reports/run1/report.json")["n_studies"] == 4
    assert storage.exists("s3://reports/run1/figures/roc.png")
    assert storage.read_bytes("s3://reports/run1/report.html").startswith(b"<!DOCTYPE html>")


# ---------------------------------------------------------------------------------------------------------------
# jobs/report.py


def test_job_end_to_end(tmp_path, capsys):
    pred = write_predictions(tmp_path / "pred")
    out = tmp_path / "report"
    assert load_job().main(["--predictions", str(pred), "--out", str(out), "--bootstrap", "20"]) == 0
    for name in ("report.json", "report.md", "report.html", "report_config.json", "figures/roc.png"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["n_errors"] == 1 and report["predictions"] == str(pred)
    assert capsys.readouterr().err.count("error:") == 0


def test_job_with_refused_s3_credentials_is_one_line(s3_auth_server, tmp_path, capsys, monkeypatch):
    srv = s3_auth_server
    srv.use(monkeypatch, srv.access_key, "x" * 40)  # a wrong secret
    pred = f"s3://{srv.bucket}/scored"
    assert load_job().main(["--predictions", pred, "--out", str(tmp_path / "r"), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {pred}") and ": access denied (check AWS_ACCESS_KEY_ID/" in err, err
    assert not (tmp_path / "r").exists()


def test_job_threshold_flag(tmp_path):
    pred = write_predictions(tmp_path / "pred")
    out = tmp_path / "report"
    assert load_job().main(["--predictions", str(pred), "--out", str(out), "--threshold", "0.25",
                            "--bootstrap", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["threshold"], report["threshold_source"]) == (0.25, "cli")
    # At 0.25 only a2 (0.2) of the abnormal images is missed; a3 (0.3) is now caught.
    assert report["image_level"]["confusion_matrix"] == [[1, 2], [1, 3]]


def test_job_uses_the_threshold_the_predictions_were_scored_at(tmp_path):
    # A scoring output (DEST/manifest.json + DEST/predictions/) scored at the model's operating threshold 0.25.
    write_predictions(tmp_path / "dest" / "predictions")
    parts = {"part-0.parquet": {"chunk": 0}, "part-1.parquet": {"chunk": 0}}
    storage.write_json(str(tmp_path / "dest" / "manifest.json"),
                       {"parts": parts, "threshold": 0.25, "threshold_source": "model", "tta": False})
    job = load_job()
    for i, pred in enumerate((tmp_path / "dest" / "predictions", tmp_path / "dest")):
        assert job.main(["--predictions", str(pred), "--out", str(tmp_path / f"r{i}"), "--bootstrap", "0"]) == 0
        report = json.loads((tmp_path / f"r{i}" / "report.json").read_text())
        assert (report["threshold"], report["threshold_source"]) == (0.25, "manifest")
        assert report["image_level"]["confusion_matrix"] == [[1, 2], [1, 3]]  # as in test_job_threshold_flag
    # --threshold still wins.
    assert job.main(["--predictions", str(tmp_path / "dest"), "--out", str(tmp_path / "cli"), "--threshold", "0.5",
                     "--bootstrap", "0"]) == 0
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert (report["threshold"], report["threshold_source"]) == (0.5, "cli")
    # A manifest written before thresholds were recorded: the 0.5 default, as before.
    storage.write_json(str(tmp_path / "dest" / "manifest.json"), {"parts": parts})
    assert job.main(["--predictions", str(tmp_path / "dest"), "--out", str(tmp_path / "old"), "--bootstrap", "0"]) == 0
    report = json.loads((tmp_path / "old" / "report.json").read_text())
    assert (report["threshold"], report["threshold_source"]) == (0.5, "default")


def test_job_calibrate_on(tmp_path):
    pred = write_predictions(tmp_path / "pred")
    # Validation: negatives 0.1, 0.55, 0.6; positives 0.5, 0.7, 0.9 -> Youden picks 0.7, sensitivity 0.9 picks 0.5.
    val_rows = [(f"v{k}", f"v{k}", "HAND", "HAND", p, y, None)
                for k, (p, y) in enumerate(zip([0.1, 0.55, 0.6, 0.5, 0.7, 0.9], [0, 0, 0, 1, 1, 1], strict=True))]
    val = write_predictions(tmp_path / "val", val_rows)
    job = load_job()
    assert job.main(["--predictions", str(pred), "--out", str(tmp_path / "y"), "--calibrate-on", str(val),
                     "--bootstrap", "0"]) == 0
    report = json.loads((tmp_path / "y" / "report.json").read_text())
    assert report["threshold"] == pytest.approx(0.7) and report["threshold_source"] == "youden"
    assert report["operating_point"]["calibrated_on"] == str(val)
    assert report["operating_point"]["val_sensitivity"] == pytest.approx(2 / 3)
    assert "Youden" in (tmp_path / "y" / "report.md").read_text()

    assert job.main(["--predictions", str(pred), "--out", str(tmp_path / "s"), "--calibrate-on", str(val),
                     "--operating-point", "sensitivity", "--target-sensitivity", "0.9", "--bootstrap", "0"]) == 0
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["threshold"] == pytest.approx(0.5) and report["threshold_source"] == "sensitivity"
    assert report["operating_point"]["target_sensitivity"] == 0.9


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--predictions", "{tmp}/missing"], "no predictions at"),
        (["--predictions", "{tmp}/nolabel"], "no 'label' column"),
        (["--predictions", "{tmp}/pred", "--threshold", "abc"], "invalid float value"),
        (["--predictions", "{tmp}/pred", "--threshold", "1.5"], "--threshold must be"),
        (["--predictions", "{tmp}/pred", "--operating-point", "youden"], "needs --calibrate-on"),
        (["--predictions", "{tmp}/pred", "--operating-point", "f1"], "invalid choice"),
        (["--predictions", "{tmp}/pred", "--calibrate-on", "{tmp}/pred", "--threshold", "0.3"], "pass only one"),
        (["--predictions", "{tmp}/pred", "--bootstrap", "-1"], "--bootstrap must be"),
        (["--compare", "{tmp}/pred"], "neither a report directory"),
        ([], "pass exactly one of"),
    ],
)
def test_job_user_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    write_predictions(tmp_path / "pred")
    (tmp_path / "nolabel").mkdir()
    pq.write_table(predictions_table().drop_columns(["label"]), tmp_path / "nolabel" / "part-0.parquet")
    argv = [a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out")]
    assert load_job().main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_job_help_explains_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_job().main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--predictions", "--compare", "--out", "--threshold", "--calibrate-on", "--operating-point",
                 "--target-sensitivity", "--bootstrap", "--seed"):
        assert flag in out


def test_job_compare(tmp_path):
    job = load_job()
    pred = write_predictions(tmp_path / "pred")
    # A run directory (report/ + model/model_card.json) and a bare report directory.
    assert job.main(["--predictions", str(pred), "--out", str(tmp_path / "run1" / "report"), "--bootstrap", "0"]) == 0
    storage.write_json(str(tmp_path / "run1" / "model" / "model_card.json"), {"backbone": "efficientnet_b0"})
    assert job.main(["--predictions", str(pred), "--out", str(tmp_path / "densenet"), "--threshold", "0.25",
                     "--bootstrap", "0"]) == 0
    out = tmp_path / "cmp"
    assert job.main(["--compare", str(tmp_path / "run1"), str(tmp_path / "densenet"), "--out", str(out)]) == 0
    md = (out / "comparison.md").read_text()
    assert "| Model" in md and "Cohen's Kappa" in md and "Study ROC AUC" in md
    assert "| efficientnet_b0 |" in md and "| densenet " in md
    assert "| 42.86%   |" in md  # image accuracy of run1: 3 of 7
    data = json.loads((out / "comparison.json").read_text())
    assert [m["name"] for m in data["models"]] == ["efficientnet_b0", "densenet"]
    assert data["models"][0]["body_part"]["accuracy"] == pytest.approx(6 / 7)


def test_compare_names_duplicate_backbones_by_source(tmp_path, df):
    r = build_report(df, bootstrap=0)
    for run in ("a", "b"):
        storage.write_json(str(tmp_path / run / "report" / "report.json"), r)
        storage.write_json(str(tmp_path / run / "model" / "model_card.json"), {"backbone": "resnet50"})
    _, data = compare_reports([str(tmp_path / "a"), str(tmp_path / "b")])
    assert [m["name"] for m in data["models"]] == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_config_collects_every_problem():
    with pytest.raises(UserError) as info:
        ReportConfig(out="x", predictions="p", threshold=2.0, bootstrap=-1, target_sensitivity=0.5).validate()
    message = str(info.value)
    assert "--threshold" in message and "--bootstrap" in message and "--target-sensitivity" in message


def test_study_level_single_image_studies_match_image_level():
    rng = np.random.default_rng(0)
    rows = [(f"i{k}", None, None, None, float(p), int(y), None)
            for k, (p, y) in enumerate(zip(rng.random(50), rng.integers(0, 2, 50), strict=True))]
    r = build_report(predictions_table(rows).to_pandas(), bootstrap=0)
    assert r["n_studies"] == 50
    assert r["study_level"]["roc_auc"] == pytest.approx(r["image_level"]["roc_auc"])


# ---------------------------------------------------------------------------------------------------------------
# Audit fixes: what is read, what is refused, what is recorded


def _scoring_output(dest: Path, rows: list[tuple] = ROWS, *, committed: bool = True, tta: bool = False,
                    model_id: str = "resnet18-test") -> Path:
    """A scoring output as mura_ray.score leaves it: committed parts in predictions/ listed by manifest.json, or
    (committed=False) a run that has staged its first chunk in _staging/ but committed nothing yet (no
    predictions/ folder, a manifest with no parts)."""
    if committed:
        write_predictions(dest / "predictions", rows, model_id)
        parts = {"part-0.parquet": {"chunk": 0}, "part-1.parquet": {"chunk": 0}}
    else:
        write_predictions(dest / "_staging" / "0123abcd", rows, model_id)
        parts = {}
    storage.write_json(str(dest / "manifest.json"), {"version": 1, "model_ids": [model_id], "threshold": 0.5,
                                                      "tta": tta, "parts": parts})
    return dest


def test_scoring_output_with_nothing_committed_is_refused_not_read_from_staging(tmp_path, capsys):
    dest = _scoring_output(tmp_path / "dest", committed=False)
    with pytest.raises(UserError, match="nothing committed yet"):
        load_predictions(str(dest))
    assert load_job().main(["--predictions", str(dest), "--out", str(tmp_path / "r"), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing committed yet" in err[0], err
    # Once predictions/ exists (the first commit made it) but the manifest still lists nothing: the same.
    write_predictions(dest / "predictions", ROWS[:2])
    for uri in (dest, dest / "predictions"):
        with pytest.raises(UserError, match="nothing committed yet"):
            load_predictions(str(uri))


def test_scoring_output_reads_committed_parts_never_staged_ones(tmp_path):
    dest = _scoring_output(tmp_path / "dest")
    write_predictions(dest / "_staging" / "0123abcd", [("z1", "Z", None, None, 0.5, 1, None)])
    assert sorted(load_predictions(str(dest))["image_id"]) == sorted(r[0] for r in ROWS)


def test_plain_folder_skips_underscore_and_dot_folders(tmp_path):
    pred = write_predictions(tmp_path / "pred")
    stray = [("z1", "Z", None, None, 0.5, 1, None)]
    write_predictions(pred / "_staging" / "abc", stray)
    write_predictions(pred / ".hidden", stray)
    pq.write_table(predictions_table(stray), pred / "_tmp.parquet")
    write_predictions(pred / "more", [("m1", "M", None, None, 0.4, 0, None)])  # a visible subfolder is read
    assert sorted(load_predictions(str(pred))["image_id"]) == sorted([r[0] for r in ROWS] + ["m1"])


def test_a_foreign_manifest_is_refused(tmp_path):
    pred = write_predictions(tmp_path / "pred")
    storage.write_json(str(pred / "manifest.json"), {"files": ["part-0.parquet"]})
    with pytest.raises(UserError, match="not a scoring manifest"):
        load_predictions(str(pred))


def test_duplicate_image_ids_are_refused(df, tmp_path, capsys):
    twice = pd.concat([df, df.iloc[:3]], ignore_index=True)
    with pytest.raises(UserError, match=r"3 image_id\(s\) more than once \(6 rows\), e\.g\. a1, a2, a3"):
        build_report(twice, bootstrap=0)
    # Two scoring outputs' predictions under one folder.
    write_predictions(tmp_path / "both" / "run1")
    write_predictions(tmp_path / "both" / "run2")
    assert load_job().main(["--predictions", str(tmp_path / "both"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "8 image_id(s) more than once (16 rows)" in err[0], err


def test_blank_study_id_is_its_own_study_and_mixed_labels_are_counted(df):
    r = build_report(df, bootstrap=0)
    # Study B holds b1 (normal) and b2 (abnormal): labelled abnormal, and counted.
    assert r["n_studies_mixed_labels"] == 1 and "1 of 4 studies" in r["notes"]["n_studies_mixed_labels"]
    df.loc[df["image_id"].isin(["c", "d"]), "study_id"] = ["", "  "]
    r = build_report(df, bootstrap=0)
    assert r["n_studies"] == 4  # c and d are still two studies of their own, not one study ""
    assert r["study_level"]["confusion_matrix"] == [[1, 1], [1, 1]]
    df.loc[df["image_id"] == "a3", "label"] = 0
    r = build_report(df, bootstrap=0)
    assert r["n_studies_mixed_labels"] == 2
    md = render_markdown(r)
    assert "2 studies have normal and abnormal images" in md and "2 of 4 studies have normal and abnormal" in md


def test_report_bootstraps_studies_at_both_levels(df, tmp_path):
    r = build_report(df, bootstrap=40, seed=2)
    for level in ("image_level", "study_level"):
        boot = r[level]["bootstrap"]
        assert boot["unit"] == "study" and boot["n_units"] == 4 and boot["seed"] == 2
        assert set(boot["n_resamples_used"]) == {"roc_auc", "cohen_kappa"}
        assert 0 < boot["n_resamples_used"]["roc_auc"] <= 40
    write_report(r, df, str(tmp_path / "out"))
    assert "drawn by study at both levels" in (tmp_path / "out" / "report.md").read_text()


def test_calibrate_on_refuses_another_models_validation_predictions(tmp_path, capsys):
    pred = write_predictions(tmp_path / "pred")
    val = write_predictions(tmp_path / "val", model_id="densenet121-other")
    argv = ["--predictions", str(pred), "--calibrate-on", str(val), "--out", str(tmp_path / "r"), "--bootstrap", "0"]
    assert load_job().main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "densenet121-other" in err[0] and "resnet18-test" in err[0], err
    assert not (tmp_path / "r" / "report.json").exists()


def test_calibrate_on_refuses_another_tta_setting(tmp_path, capsys):
    pred = _scoring_output(tmp_path / "test_scored", tta=True)
    val = _scoring_output(tmp_path / "val_scored", tta=False)
    job = load_job()
    argv = ["--predictions", str(pred), "--calibrate-on", str(val), "--out", str(tmp_path / "r"), "--bootstrap", "0"]
    assert job.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tta" in err[0] and str(val) in err[0] and str(pred) in err[0], err
    # Alike: accepted, and what was checked is recorded.
    storage.write_json(str(val / "manifest.json"), {**storage.read_json(str(val / "manifest.json")), "tta": True})
    assert job.main(argv) == 0
    point = json.loads((tmp_path / "r" / "report.json").read_text())["operating_point"]
    assert point["model_id"] == "resnet18-test" and point["model_check"].startswith("same model_id")
    assert point["tta"] is True


def test_calibrate_level_study(tmp_path):
    pred = write_predictions(tmp_path / "pred")
    # Validation studies: N1 (normal) images 0.1, 0.9 -> mean 0.5; N2 0.2, 0.2 -> 0.2;
    #                     A1 (abnormal) 0.6, 0.6 -> 0.6;   A2 0.7, 0.8 -> 0.75.
    # Images: Youden's J is best at 0.6 (all 4 abnormal, 3 of 4 normal: J = 0.75).
    # Studies: 0.6 catches both abnormal studies and neither normal one: J = 1.
    val_rows = [(f"v{k}", study, "HAND", "HAND", p, y, None) for k, (study, p, y) in enumerate(
        [("N1", 0.1, 0), ("N1", 0.9, 0), ("N2", 0.2, 0), ("N2", 0.2, 0),
         ("A1", 0.6, 1), ("A1", 0.6, 1), ("A2", 0.7, 1), ("A2", 0.8, 1)])]
    val = write_predictions(tmp_path / "val", val_rows)
    job = load_job()
    at_image, at_study = (1.0, 0.75), (1.0, 1.0)  # (sensitivity, specificity) at 0.6
    for level in ("image", "study"):
        out = tmp_path / level
        assert job.main(["--predictions", str(pred), "--calibrate-on", str(val), "--calibrate-level", level,
                         "--out", str(out), "--bootstrap", "0"]) == 0
        point = json.loads((out / "report.json").read_text())["operating_point"]
        assert point["level"] == level and point["threshold"] == pytest.approx(0.6)
        v = point["validation"]
        assert (v["image_level"]["n"], v["study_level"]["n"]) == (8, 4)
        assert (v["image_level"]["sensitivity"], v["image_level"]["specificity"]) == pytest.approx(at_image)
        assert (v["study_level"]["sensitivity"], v["study_level"]["specificity"]) == pytest.approx(at_study)
        assert (point["val_sensitivity"], point["val_specificity"]) == pytest.approx(
            at_image if level == "image" else at_study)
        md = (out / "report.md").read_text()
        assert f"on the {level}-level probabilities of {val}" in md
        assert "8 images, sensitivity 1.0000, specificity 0.7500; 4 studies" in md


def test_calibrate_level_changes_the_threshold(tmp_path):
    pred = write_predictions(tmp_path / "pred")
    # Sensitivity target 1.0. Images: the lowest abnormal image is 0.3 -> threshold 0.3. Studies: A's mean is
    # (0.3 + 0.9) / 2 = 0.6 and B's 0.8 -> threshold 0.6; normal study N: (0.1 + 0.5) / 2 = 0.3.
    val_rows = [(f"v{k}", study, None, None, p, y, None) for k, (study, p, y) in enumerate(
        [("N", 0.1, 0), ("N", 0.5, 0), ("A", 0.3, 1), ("A", 0.9, 1), ("B", 0.8, 1)])]
    val = write_predictions(tmp_path / "val", val_rows)
    job = load_job()
    thresholds = {}
    for level in ("image", "study"):
        out = tmp_path / level
        assert job.main(["--predictions", str(pred), "--calibrate-on", str(val), "--operating-point", "sensitivity",
                         "--target-sensitivity", "1.0", "--calibrate-level", level, "--out", str(out),
                         "--bootstrap", "0"]) == 0
        thresholds[level] = json.loads((out / "report.json").read_text())["threshold"]
    assert thresholds == pytest.approx({"image": 0.3, "study": 0.6})


def test_calibrate_level_needs_calibrate_on(tmp_path, capsys):
    write_predictions(tmp_path / "pred")
    assert load_job().main(["--predictions", str(tmp_path / "pred"), "--calibrate-level", "study",
                            "--out", str(tmp_path / "r")]) == 2
    assert "--calibrate-level needs --calibrate-on" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"n_images": 3}', "no valid n_studies"),
        ("[]", "a JSON list, not an object"),
        ('{"n_images": 3, "n_studies": 2, "threshold": 0.5, "image_level": {}, "study_level": []}',
         "no valid image_level.accuracy"),
        ("{not json", "not valid JSON"),
    ],
)
def test_compare_refuses_a_malformed_report(tmp_path, capsys, content, problem):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text(content)
    assert load_job().main(["--compare", str(tmp_path / "bad"), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'bad' / 'report.json'} is not" in err[0] and problem in err[0], err


def test_compare_shows_threshold_and_test_set_size(tmp_path, df):
    full = build_report(df, bootstrap=0, threshold=0.25)
    fewer = build_report(df[df["image_id"] != "d"], bootstrap=0)
    storage.write_json(str(tmp_path / "full" / "report.json"), full)
    storage.write_json(str(tmp_path / "fewer" / "report.json"), fewer)
    md, data = compare_reports([str(tmp_path / "full"), str(tmp_path / "full")])
    assert "| Model " in md and "| Threshold | Images | Studies |" in md
    assert "| 0.2500    | 7      | 4       |" in md
    assert data["notes"] == [] and "Note:" not in md
    md, data = compare_reports([str(tmp_path / "full"), str(tmp_path / "fewer")])
    assert "| 0.5000    | 6      | 3       |" in md
    fewer_entry = data["models"][1]
    assert (fewer_entry["n_images"], fewer_entry["n_studies"], fewer_entry["threshold"]) == (6, 3, 0.5)
    assert len(data["notes"]) == 1 and "not on the same test set" in data["notes"][0]
    assert "full 7 images / 4 studies, fewer 6 images / 3 studies" in md


def test_load_predictions_from_s3_skips_staging(s3_server):
    boto3 = pytest.importorskip("boto3")
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="preds")

    def put(key: str, rows: list[tuple]) -> None:
        buf = io.BytesIO()
        pq.write_table(predictions_table(rows), buf)
        storage.write_bytes(f"s3://preds/{key}", buf.getvalue())

    put("plain/part-0.parquet", ROWS)
    put("plain/_staging/abc/part-0.parquet", [("z1", "Z", None, None, 0.5, 1, None)])
    assert sorted(load_predictions("s3://preds/plain")["image_id"]) == sorted(r[0] for r in ROWS)
    # A scoring output whose run has staged but not committed anything.
    put("dest/_staging/abc/part-0.parquet", ROWS)
    storage.write_json("s3://preds/dest/manifest.json", {"parts": {}, "tta": False})
    with pytest.raises(UserError, match="nothing committed yet"):
        load_predictions("s3://preds/dest")
