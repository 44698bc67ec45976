"""Drift: PSI and KS logic, sample-size-aware flags, and three synthetic archives scored by a real Predictor (held
out, inverted, one body part), plus the scoring job's report, history and --fail-on-drift end to end."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import report as report_job
import score as score_job
from PIL import Image
from scipy.stats import chi2

from mura_ray import drift
from mura_ray.data.images import decode_radiograph, load_pixels, load_pixels_and_stats
from mura_ray.labels import BODY_PARTS
from mura_ray.score import Predictor

# ------------------------------------------------------------------------------------------------- pure functions


def _rows(n: int, rng: np.random.Generator, *, mean: float = 0.4, parts: list[str] | None = None) -> pd.DataFrame:
    part = rng.choice(parts or list(BODY_PARTS), n)
    return pd.DataFrame({
        "prob_abnormal": rng.beta(2, 3, n), "pred_abnormal": rng.integers(0, 2, n),
        "image_mean": rng.normal(mean, 0.05, n), "image_contrast": rng.normal(0.2, 0.03, n),
        "image_height": np.full(n, 48), "image_width": rng.integers(30, 49, n),
        "body_part": part, "body_part_pred": part, "error": [None] * n,
    })


def test_psi_of_exact_small_cases():
    assert drift.psi(np.array([50, 50]), np.array([50, 50])) == pytest.approx(0.0)
    p, q = np.array([90.5, 10.5]) / 101, np.array([50.5, 50.5]) / 101  # half a count added to each bin
    assert drift.psi(np.array([50, 50]), np.array([90, 10])) == pytest.approx(np.sum((p - q) * np.log(p / q)))
    # Symmetric, and an empty bin stays finite.
    assert drift.psi(np.array([90, 10]), np.array([50, 50])) == pytest.approx(drift.psi(np.array([50, 50]),
                                                                                         np.array([90, 10])))
    assert np.isfinite(drift.psi(np.array([100, 0]), np.array([0, 100])))


def test_psi_threshold_follows_the_sample_sizes():
    small = drift.psi_threshold(1000, 50, 10)
    assert small == pytest.approx(chi2.ppf(1 - drift.ALPHA, 9) * (1 / 1000 + 1 / 50))
    assert small > drift.psi_threshold(1000, 100, 10) > drift.PSI_ALARM
    assert drift.psi_threshold(100_000, 1_000_000, 10) == drift.PSI_ALARM  # large samples: the usual alarm


def test_in_distribution_samples_rarely_flag_and_shifts_do():
    rng = np.random.default_rng(0)
    reference = drift.build_reference(_rows(2000, rng))
    flags = [drift.compare(reference, _rows(n, rng))["flagged"] for n in (60, 300, 1000) for _ in range(100)]
    assert sum(flags) <= 2  # 7 quantities at alpha 0.001 each: about 0.7% of runs at most
    shifted = drift.compare(reference, _rows(300, rng, mean=0.55))
    assert shifted["flagged"] and [r.split(" ")[0] for r in shifted["reasons"]] == ["image_mean"]
    assert shifted["quantities"]["image_mean"]["ks"] > 0.5 and shifted["quantities"]["image_mean"]["ks_pvalue"] < 1e-6


def test_reference_profile_is_json_with_bins_and_a_capped_sample():
    rng = np.random.default_rng(1)
    reference = json.loads(json.dumps(drift.build_reference(_rows(3000, rng))))
    q = reference["quantities"]
    assert reference["n_images"] == 3000 and set(q) == set(drift.QUANTITIES)
    assert len(q["prob_abnormal"]["edges"]) == 9 and sum(q["prob_abnormal"]["counts"]) == 3000
    assert len(q["prob_abnormal"]["sample"]) == drift.SAMPLE_SIZE
    assert q["image_size"]["edges"] == [48.0] and q["image_size"]["counts"] == [3000, 0]  # all alike: two bins
    assert q["body_part"]["categories"] == list(BODY_PARTS)
    assert q["body_part_disagreement"]["counts"] == [3000, 0] and q["body_part"]["n"] == 3000  # one study each


def test_body_part_is_counted_per_study_and_falls_back_to_the_head():
    df = pd.DataFrame({"prob_abnormal": [0.1, 0.2, 0.3, None, 0.5, 0.6],
                       "study_id": [None, None, None, None, "s1", "s1"],
                       "path": ["a/1.png", "b/1.png", "c/1.png", "d/1.png", "e/1.png", "e/2.png"],
                       "body_part": ["HAND", None, "WRIST", "HAND", "ELBOW", "ELBOW"],
                       "body_part_pred": ["HAND", "ELBOW", "HAND", None, "ELBOW", "HAND"],
                       "error": [None, None, None, "bad", None, None]})
    values = drift.profile_values(df)
    assert list(values["body_part"]) == ["HAND", "ELBOW", "WRIST", "ELBOW"]  # study s1 once
    assert list(values["body_part_disagreement"]) == ["agrees", "disagrees", "agrees", "disagrees"]
    # Without study ids, a folder is a study.
    folders = drift.profile_values(df.assign(study_id=None, path=["a/1.png", "a/2.png", "c/1.png", "d/1.png",
                                                                 "e/1.png", "e/2.png"]))
    assert list(folders["body_part"]) == ["HAND", "WRIST", "ELBOW"]
    assert len(values["image_mean"]) == 0  # predictions without image statistics: those quantities are left out


def test_small_runs_and_small_references_are_not_judged():
    rng = np.random.default_rng(2)
    reference = drift.build_reference(_rows(500, rng))
    small = drift.compare(reference, _rows(drift.MIN_IMAGES - 1, rng, mean=0.9))
    assert small["status"] == "too_few_images" and not small["flagged"]
    assert "too few images to judge" in small["note"]
    tiny_reference = drift.compare(drift.build_reference(_rows(20, rng)), _rows(500, rng, mean=0.9))
    assert tiny_reference["status"] == "reference_too_small" and not tiny_reference["flagged"]


def test_history_line():
    rng = np.random.default_rng(3)
    rows = _rows(200, rng)
    rows.loc[0, "error"], rows.loc[0, "prob_abnormal"] = "cannot decode", None
    result = drift.compare(drift.build_reference(_rows(500, rng)), rows)
    line = drift.history_line(rows, result, pd.Timestamp("2026-01-02T03:04:05Z").to_pydatetime())
    assert line["images"] == 199 and line["failed"] == 1 and line["run_at"].startswith("2026-01-02T03:04:05")
    assert line["mean_prob_abnormal"] == pytest.approx(rows["prob_abnormal"].mean())
    assert line["drift_flagged"] is False and set(line["psi"]) == set(drift.QUANTITIES)


def test_image_stats_are_of_the_stored_image():
    pixels = np.add.outer(np.linspace(20, 80, 300), np.linspace(0, 100, 400)).astype(np.uint8)  # smooth, as
    # radiographs are: the draft's averaging changes neither mean nor contrast much
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    model_input, stats = load_pixels_and_stats(buf.getvalue(), 32)  # decoded at reduced scale (JPEG draft)
    assert (stats.height, stats.width) == (300, 400)
    assert np.array_equal(model_input, load_pixels(buf.getvalue(), 32))
    assert stats.mean == pytest.approx(pixels.mean() / 255, abs=0.01)
    assert stats.contrast == pytest.approx(pixels.std() / 255, abs=0.01)


# ------------------------------------------------------------------------------- synthetic archives, real model


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def archives(tmp_path_factory, exported_model) -> dict[str, pd.DataFrame]:
    """A synthetic MURA tree split by patient: the reference half scored (as export profiles the validation split),
    and the held-out half's images, as they are and inverted."""
    from mura_ray.data.synthetic import generate_mura

    root = generate_mura(tmp_path_factory.mktemp("drift"), n_images=900, image_size=48, seed=7)
    files = sorted(root.rglob("*.png"))
    rows = pd.DataFrame({
        "path": [str(f.relative_to(root)) for f in files],
        "patient": [f.parent.parent.name for f in files],
        "body_part": [f.parent.parent.parent.name.removeprefix("XR_") for f in files],
        "image": [f.read_bytes() for f in files],
    })
    held_out = rows["patient"].str.removeprefix("patient").astype(int) % 2 == 1
    inverted = rows[held_out].assign(image=[_png(255 - decode_radiograph(b)) for b in rows.loc[held_out, "image"]])
    return {"reference": _score(exported_model, rows[~held_out]), "held_out": rows[held_out],
            "inverted": inverted}


def _score(model: Path, rows: pd.DataFrame) -> pd.DataFrame:
    batch = pd.DataFrame({"image_id": rows["path"], "path": rows["path"], "study_id": None,
                          "body_part": rows["body_part"], "label": None, "image": rows["image"]})
    return Predictor([str(model)], use_gpu=False, tta=False, threshold=None)(batch).to_pandas()


def test_three_archives(archives, exported_model):
    reference = drift.build_reference(archives["reference"])
    assert reference["n_images"] > 300

    held_out = drift.compare(reference, _score(exported_model, archives["held_out"]))
    assert held_out["status"] == "ok" and not held_out["flagged"], held_out["reasons"]
    assert set(held_out["quantities"]) == set(drift.QUANTITIES)

    inverted = drift.compare(reference, _score(exported_model, archives["inverted"]))
    assert inverted["flagged"] and any(r.startswith("image_mean") for r in inverted["reasons"])

    part = archives["held_out"]["body_part"].value_counts().index[0]
    one_part = archives["held_out"][archives["held_out"]["body_part"] == part]
    assert len(one_part) >= drift.MIN_IMAGES
    single = drift.compare(reference, _score(exported_model, one_part))
    assert single["flagged"] and any(r.startswith("body_part ") for r in single["reasons"])

    few = drift.compare(reference, _score(exported_model, archives["inverted"].head(20)))
    assert few["status"] == "too_few_images" and not few["flagged"]


@pytest.mark.slow
def test_scoring_job_reports_drift_history_and_fails_on_drift(ray_cluster, archives, exported_model, tmp_path,
                                                             capsys):
    """An unlabelled raw folder of inverted images: report.json with counts and drift (no metrics), a history line
    per run, exit code 3 with --fail-on-drift and 0 without; jobs/report.py --history draws the runs."""
    model = tmp_path / "model"
    shutil.copytree(exported_model, model)
    card = json.loads((model / "model_card.json").read_text())
    card["drift_reference"] = drift.build_reference(archives["reference"])
    (model / "model_card.json").write_text(json.dumps(card))
    archive = tmp_path / "archive"
    inverted = archives["inverted"]
    half = len(inverted) // 2
    for path, data in zip(inverted["path"][:half], inverted["image"][:half], strict=True):
        (archive / path).parent.mkdir(parents=True, exist_ok=True)
        (archive / path).write_bytes(data)
    out = tmp_path / "scored"
    args = ["--model", str(model), "--input", str(archive), "--out", str(out)]

    assert score_job.main([*args, "--fail-on-drift"]) == score_job.DRIFT_EXIT_CODE
    printed = capsys.readouterr().out
    assert "drift: FLAGGED (" in printed and "image_mean (mean intensity" in printed
    assert (out / "manifest.json").exists() and json.loads((out / "manifest.json").read_text())["n_rows"] == half
    report = json.loads((out / "report" / "report.json").read_text())
    assert "image_level" not in report and report["n_images"] == half and report["drift"]["flagged"]
    assert report["drift"]["reference_model"] == card["model_id"]
    page = (out / "report" / "report.html").read_text()
    assert "Drift from the model" in page and "data:image/png;base64" in page
    assert (out / "report" / "figures" / "drift.png").exists()

    for path, data in zip(inverted["path"][half:], inverted["image"][half:], strict=True):  # the next night's
        (archive / path).parent.mkdir(parents=True, exist_ok=True)
        (archive / path).write_bytes(data)
    assert score_job.main(args) == 0  # flagged, but without --fail-on-drift
    runs = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["images"] for r in runs] == [half, len(inverted) - half]
    assert all(r["drift_flagged"] and r["psi"]["image_mean"] > 0.2 for r in runs)

    dest = tmp_path / "trend"
    assert report_job.main(["--history", str(out), "--out", str(dest)]) == 0
    table = (dest / "history.md").read_text().splitlines()
    assert sum(line.startswith("| 20") for line in table) == 2  # one row per run
    assert "data:image/png;base64" in (dest / "history.html").read_text()


def test_fail_on_drift_needs_the_report(exported_model, tmp_path, capsys):
    assert score_job.main(["--model", str(exported_model), "--input", str(tmp_path), "--out", str(tmp_path / "o"),
                           "--fail-on-drift", "--no-report"]) == 2
    assert "--fail-on-drift needs the report" in capsys.readouterr().err


def test_history_of_an_output_without_runs_is_a_one_line_error(tmp_path, capsys):
    assert report_job.main(["--history", str(tmp_path), "--out", str(tmp_path / "trend")]) == 2
    assert "no history.jsonl" in capsys.readouterr().err
