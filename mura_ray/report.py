"""Predictions → report.json, report.md, a self-contained report.html and PNG figures (`jobs/report.py`).

Metric math lives in `mura_ray.metrics`, figures in `mura_ray.figures`, Markdown/HTML in `mura_ray.render`, model
comparisons in `mura_ray.compare`; this module prepares the rows, chooses the threshold and writes the files. All
I/O goes through `mura_ray.storage`, so every input and output may be a local path or an `s3://` URI.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import pandas as pd

from mura_ray import storage
from mura_ray.compare import write_comparison
from mura_ray.config import UserError
from mura_ray.figures import build_figures, history_figure
from mura_ray.labels import BODY_PARTS
from mura_ray.metrics import (
    CalibrationLevel,
    OperatingPoint,
    aggregate_studies,
    choose_threshold,
    compute_binary_metrics,
    compute_body_part_metrics,
)
from mura_ray.predictions import HISTORY, find_scoring_output, load_predictions, read_predictions
from mura_ray.render import render_history_html, render_history_markdown, render_html, render_markdown

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
DEFAULT_BOOTSTRAP = 200
"""Bootstrap resamples for the AUC and kappa CIs (image and study level); cost does not grow with n."""

_REQUIRED = ("image_id", "prob_abnormal", "label")


@dataclass(frozen=True)
class ReportConfig:
    """What `jobs/report.py` asks for: one report from predictions, or a comparison of finished reports."""

    out: str
    """Output directory, local or s3://: report.json/.md/.html and figures/, comparison.md/.json, or
    history.md/.html."""
    predictions: str | None = None
    """Predictions Parquet dataset from the scoring job (local dir/file or s3://); it must have a `label` column."""
    compare: tuple[str, ...] = ()
    """Instead of --predictions: run directories (report/report.json + model/model_card.json) or report directories
    (report.json) to compare in one table."""
    history: str | None = None
    """Instead of --predictions: a scoring output (jobs/score.py's --out) whose history.jsonl to draw over runs:
    history.md (a table) and history.html (a figure and the table) under --out."""
    threshold: float | None = None
    """Call an image or study abnormal when its probability >= T; not with --calibrate-on. Without either: the
    threshold the predictions were scored at, from the scoring output's manifest.json, else 0.5."""
    calibrate_on: str | None = None
    """Validation predictions of the same model (and --tta setting) on which to choose the threshold; see
    --operating-point and --calibrate-level."""
    operating_point: OperatingPoint | None = None
    """With --calibrate-on: `youden` (the default) maximises sensitivity + specificity, `kappa` Cohen's kappa;
    `sensitivity` takes the highest threshold whose validation sensitivity reaches --target-sensitivity."""
    target_sensitivity: float | None = None
    """With --operating-point sensitivity: the validation sensitivity to reach, in (0, 1]; without it, 0.9."""
    calibrate_level: CalibrationLevel | None = None
    """With --calibrate-on: choose the threshold on validation image probabilities (`image`, the default) or on
    study probabilities (`study`: the mean of a study's images); validation metrics are reported at both levels."""
    bootstrap: int = DEFAULT_BOOTSTRAP
    """Bootstrap resamples for 95% CIs of ROC AUC and kappa, drawing whole studies at both levels; 0 disables."""
    seed: int = 0
    """Seed of the bootstrap."""
    explain: int = 0
    """Grad-CAM heatmaps of the N most confident true positives, false negatives and false positives in
    report.html, from the models and images the scoring output's manifest names (needs mura_ray[explain]); 0: none."""

    def validate(self) -> ReportConfig:
        """Raise one UserError naming every bad flag; returns self so jobs can chain it."""
        problems = []
        if not self.out:
            problems.append("--out is required")
        if [bool(self.predictions), bool(self.compare), bool(self.history)].count(True) != 1:
            problems.append("pass exactly one of --predictions PRED, --compare DIR [DIR ...] or --history OUT")
        if (self.compare or self.history) and (self.threshold is not None or self.calibrate_on):
            problems.append("--threshold and --calibrate-on do not apply to --compare or --history")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            problems.append(f"--threshold must be a probability in [0, 1]; got {self.threshold}")
        if self.threshold is not None and self.calibrate_on:
            problems.append("--threshold and --calibrate-on both set the threshold; pass only one")
        if self.operating_point is not None and self.operating_point not in get_args(OperatingPoint):
            allowed = ", ".join(get_args(OperatingPoint))
            problems.append(f"--operating-point must be one of {allowed}; got {self.operating_point!r}")
        if self.operating_point is not None and not self.calibrate_on:
            problems.append("--operating-point needs --calibrate-on VAL_PRED")
        if self.calibrate_level is not None:
            if self.calibrate_level not in get_args(CalibrationLevel):
                allowed = ", ".join(get_args(CalibrationLevel))
                problems.append(f"--calibrate-level must be one of {allowed}; got {self.calibrate_level!r}")
            if not self.calibrate_on:
                problems.append("--calibrate-level needs --calibrate-on VAL_PRED")
        if self.target_sensitivity is not None:
            if self.operating_point != "sensitivity":
                problems.append("--target-sensitivity needs --operating-point sensitivity")
            if not 0.0 < self.target_sensitivity <= 1.0:
                problems.append(f"--target-sensitivity must be in (0, 1]; got {self.target_sensitivity}")
        if self.bootstrap < 0:
            problems.append(f"--bootstrap must be >= 0 (0 disables); got {self.bootstrap}")
        if self.explain < 0:
            problems.append(f"--explain must be >= 0 (0 disables); got {self.explain}")
        if self.explain and (self.compare or self.history):
            problems.append("--explain does not apply to --compare or --history")
        if problems:
            raise UserError("; ".join(problems))
        return self


def run(cfg: ReportConfig) -> dict[str, Any]:
    """Build and write the report (or the comparison) that `cfg` describes; returns what was written as JSON."""
    cfg.validate()
    if cfg.compare:
        _, comparison = write_comparison(cfg.compare, cfg.out)
        storage.write_json(storage.join(cfg.out, "report_config.json"), dataclasses.asdict(cfg))
        return comparison
    if cfg.history:
        return write_history(cfg.history, cfg.out)
    assert cfg.predictions is not None  # guaranteed by ReportConfig.validate
    df = _load_labelled(cfg.predictions, "--predictions")
    scored_at = _scoring_threshold(cfg.predictions)
    if cfg.threshold is not None:
        threshold, source = cfg.threshold, "cli"
    elif scored_at is not None:
        # The operating point the predictions' `pred_abnormal` was decided at: the model's own, or --threshold.
        threshold, source = scored_at, "manifest"
    else:
        threshold, source = DEFAULT_THRESHOLD, "default"
    operating_point = None
    if cfg.calibrate_on:
        method = cfg.operating_point or "youden"
        target = 0.9 if cfg.target_sensitivity is None else cfg.target_sensitivity
        val_df = _load_labelled(cfg.calibrate_on, "--calibrate-on")
        same_model = _check_same_model(cfg.predictions, df, cfg.calibrate_on, val_df)
        operating_point = calibrate_threshold(val_df, method, target, level=cfg.calibrate_level or "image")
        operating_point["calibrated_on"] = cfg.calibrate_on
        operating_point.update(same_model)
        threshold, source = operating_point["threshold"], method
    # Before the report's bootstrap: a --predictions without a scoring manifest fails in seconds.
    explanations = _explanations(cfg.predictions, cfg.explain, threshold) if cfg.explain else None
    report = build_report(df, threshold=threshold, threshold_source=source, bootstrap=cfg.bootstrap, seed=cfg.seed)
    report["predictions"] = cfg.predictions
    if operating_point is not None:
        report["operating_point"] = operating_point
    write_report(report, df, cfg.out, explanations=explanations)
    storage.write_json(storage.join(cfg.out, "report_config.json"), dataclasses.asdict(cfg))
    return report


def write_history(scoring_out: str, out_uri: str) -> dict[str, Any]:
    """Draw a scoring output's runs (its history.jsonl): history.md and history.html under `out_uri`."""
    uri = storage.join(scoring_out, HISTORY)
    if not storage.exists(uri):
        raise UserError(f"--history {scoring_out}: no {HISTORY} there; pass the --out of a scoring job that has "
                        "run at least once")
    runs = []
    for number, line in enumerate(storage.read_bytes(uri).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            run = json.loads(line)
            missing = [k for k in ("run_at", "images", "failed", "positive_rate", "mean_prob_abnormal",
                                   "drift_status", "drift_flagged", "psi") if k not in run]
        except (ValueError, TypeError):
            missing = ["(not a JSON object)"]
        if missing:
            raise UserError(f"{uri} line {number} is not a scoring run's line (lacks {', '.join(missing)})")
        runs.append(run)
    if not runs:
        raise UserError(f"{uri} holds no runs")
    runs.sort(key=lambda r: r["run_at"])
    storage.write_bytes(storage.join(out_uri, "history.md"), render_history_markdown(runs).encode("utf-8"))
    storage.write_bytes(storage.join(out_uri, "history.html"),
                        render_history_html(runs, history_figure(runs)).encode("utf-8"))
    logger.info("Wrote the trend of %d scoring runs to %s", len(runs), out_uri)
    return {"runs": runs}


def _explanations(predictions: str, n: int, threshold: float) -> list[tuple[str, bytes]]:
    """Grad-CAM for the report's examples, with the models and the input the scoring output's manifest names."""
    found = find_scoring_output(predictions)
    if found is None or not found[1].get("models") or not found[1].get("input"):
        raise UserError(f"--explain: --predictions {predictions} is not a scoring output (no manifest.json naming "
                        "its models and input); pass the scoring job's --out or its predictions/")
    dest, manifest = found
    from mura_ray.explain import explain_report_examples  # the optional extra's (grad-cam's) import, when asked

    return explain_report_examples(read_predictions(dest), manifest["input"], list(manifest["models"]), n,
                                   threshold)


def _load_labelled(uri: str, flag: str) -> pd.DataFrame:
    df = load_predictions(uri)
    if "label" not in df:
        raise UserError(f"{flag} {uri} has no 'label' column; the report needs ground truth: score a labelled split")
    return df


def _model_ids(df: pd.DataFrame) -> list[str]:
    return sorted(map(str, pd.unique(df["model_id"].dropna()))) if "model_id" in df else []


def _check_same_model(pred_uri: str, df: pd.DataFrame, val_uri: str, val_df: pd.DataFrame) -> dict[str, Any]:
    """Refuse validation predictions of another model than the test predictions (a threshold does not carry over
    between models), or, where both are scoring outputs, scored with another --tta setting. Returns what was
    checked, for the operating point entry."""
    test_ids, val_ids = _model_ids(df), _model_ids(val_df)
    if test_ids and val_ids and test_ids != val_ids:
        raise UserError(f"--calibrate-on {val_uri} holds predictions of model_id {', '.join(val_ids)}, but "
                        f"--predictions {pred_uri} of model_id {', '.join(test_ids)}; a threshold chosen on another "
                        "model's probabilities does not apply: calibrate on the same model's validation predictions")
    checked: dict[str, Any] = {"model_id": None if not val_ids else val_ids[0] if len(val_ids) == 1 else val_ids}
    if test_ids and val_ids:
        checked["model_check"] = "same model_id as --predictions"
    else:
        lacking = " and ".join(flag for flag, ids in (("--predictions", test_ids), ("--calibrate-on", val_ids))
                               if not ids)
        checked["model_check"] = f"not checked: {lacking} name(s) no model_id"
        logger.warning("--calibrate-on: cannot check that it is the model of --predictions (%s)",
                       checked["model_check"])
    test_found, val_found = find_scoring_output(pred_uri), find_scoring_output(val_uri)
    if test_found and val_found:
        test_tta, val_tta = bool(test_found[1].get("tta", False)), bool(val_found[1].get("tta", False))
        if test_tta != val_tta:
            def how(tta: bool) -> str:
                return "with" if tta else "without"

            raise UserError(f"--calibrate-on {val_uri} was scored {how(val_tta)} --tta, but --predictions "
                            f"{pred_uri} {how(test_tta)} it; the probabilities differ: score both alike")
        checked["tta"] = val_tta
    return checked


def _scoring_threshold(uri: str) -> float | None:
    """The threshold a scoring output was scored at (recorded in its manifest), or None: not a scoring output,
    or one written before manifests recorded it."""
    found = find_scoring_output(uri)
    threshold = found[1].get("threshold") if found else None
    return float(threshold) if isinstance(threshold, int | float) else None


def calibrate_threshold(
    val_df: pd.DataFrame,
    method: OperatingPoint = "youden",
    target_sensitivity: float = 0.9,
    *,
    level: CalibrationLevel = "image",
) -> dict[str, Any]:
    """Choose the threshold on validation predictions, on image or study probabilities (`level`; a study's is
    the mean of its images', as in the report); returns it with the validation metrics at both levels.

    `val_sensitivity` and `val_specificity` are those at `level`, the one the threshold was chosen on;
    `validation` holds both levels.
    """
    if level not in get_args(CalibrationLevel):
        raise ValueError(f"level must be one of {', '.join(get_args(CalibrationLevel))}; got {level!r}")
    prep = _prepare(val_df)
    images, studies = prep.images, prep.studies
    if images.empty:
        raise ValueError("the --calibrate-on predictions have no labelled, error-free rows")
    chosen_on = images if level == "image" else studies
    threshold = choose_threshold(chosen_on["label"].to_numpy(), chosen_on["prob_abnormal"].to_numpy(), method,
                                 target_sensitivity)
    validation = {}
    for name, rows in (("image_level", images), ("study_level", studies)):
        m = compute_binary_metrics(rows["label"].to_numpy(), rows["prob_abnormal"].to_numpy(), threshold)
        validation[name] = {key: m[key] for key in ("n", "n_abnormal", "sensitivity", "specificity", "accuracy",
                                                    "cohen_kappa")}
    point: dict[str, Any] = {"method": method, "level": level, "threshold": threshold}
    if method == "sensitivity":
        point["target_sensitivity"] = target_sensitivity
    at = validation[f"{level}_level"]
    point.update(n_images=len(images), n_studies=len(studies), val_sensitivity=at["sensitivity"],
                 val_specificity=at["specificity"], validation=validation)
    return point


def build_report(
    df: pd.DataFrame,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    threshold_source: str = "default",
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics for one predictions table, as the JSON-ready dict that `write_report` renders.

    Rows with an `error` are excluded and counted as `n_errors`; rows without a label as `n_unlabelled`. The
    scoring job's `pred_abnormal` is ignored: decisions are `prob_abnormal >= threshold` at both levels.
    """
    prep = _prepare(df)
    images, studies = prep.images, prep.studies
    if images.empty:
        raise ValueError(
            f"no rows to report on: {prep.n_rows} rows, {prep.n_errors} with errors, "
            f"{prep.n_unlabelled} without a label"
        )
    n_mixed = int(studies["mixed_labels"].sum())
    report: dict[str, Any] = {
        "n_rows": prep.n_rows,
        "n_images": len(images),
        "n_studies": len(studies),
        "n_errors": prep.n_errors,
        "n_unlabelled": prep.n_unlabelled,
        "n_studies_mixed_labels": n_mixed,
        "threshold": float(threshold),
        "threshold_source": threshold_source,
        "model_id": prep.model_id,
        # Both levels resample studies: at image level each drawn study brings all its images (they are
        # correlated; drawing images one by one would make the intervals too narrow).
        "image_level": compute_binary_metrics(
            images["label"], images["prob_abnormal"], threshold, bootstrap=bootstrap, seed=seed,
            groups=images["study_key"], unit="study",
        ),
        "study_level": compute_binary_metrics(
            studies["label"], studies["prob_abnormal"], threshold, bootstrap=bootstrap, seed=seed, unit="study"
        ),
    }
    if n_mixed:
        report["notes"] = {"n_studies_mixed_labels": (
            f"{n_mixed} of {len(studies)} studies have normal and abnormal images; each is labelled abnormal at "
            "study level (the max of its images' labels, MURA's protocol)")}
    if "body_part" in images and images["body_part"].notna().any():
        report["per_body_part"] = _per_body_part(images, threshold)
        if "body_part_pred" in images:
            known = images[images["body_part"].notna() & images["body_part_pred"].notna()]
            if not known.empty:
                report["body_part"] = compute_body_part_metrics(known["body_part"], known["body_part_pred"])
    return report


def build_counts(df: pd.DataFrame, *, threshold: float, threshold_source: str) -> dict[str, Any]:
    """What the report of predictions without labels holds instead of metrics: counts, the share called abnormal
    at `threshold` and the mean probability."""
    failed = df["prob_abnormal"].isna()
    if "error" in df:
        failed |= df["error"].notna()
    prob = df.loc[~failed, "prob_abnormal"].astype(np.float64)
    model_ids = _model_ids(df)
    return {
        "n_rows": len(df), "n_images": len(prob), "n_errors": int(failed.sum()),
        "n_unlabelled": int((~failed & df["label"].isna()).sum()) if "label" in df else len(prob),
        "threshold": float(threshold), "threshold_source": threshold_source,
        "model_id": None if not model_ids else model_ids[0] if len(model_ids) == 1 else model_ids,
        "positive_rate": float((prob >= threshold).mean()) if len(prob) else None,
        "mean_prob_abnormal": float(prob.mean()) if len(prob) else None,
    }


def write_report(
    report: dict[str, Any],
    df: pd.DataFrame,
    out_uri: str,
    *,
    explanations: Sequence[tuple[str, bytes]] | None = None,
) -> None:
    """Write report.json, report.md, report.html and figures/*.png under `out_uri`.

    `df` is the predictions table the report was built from (the curves need the probabilities); a report of
    `build_counts` has no metric figures, one with `drift` a figure of its distributions.
    `explanations` are (caption, PNG bytes) pairs, e.g. Grad-CAM heatmaps, shown under their own heading.
    """
    if "image_level" in report:
        prep = _prepare(df)
        figures = build_figures(report, prep.images, prep.studies)
    else:
        figures = build_figures(report)
    for name, png in figures.items():
        storage.write_bytes(storage.join(out_uri, "figures", name), png)
    storage.write_json(storage.join(out_uri, "report.json"), report)
    storage.write_bytes(storage.join(out_uri, "report.md"), render_markdown(report).encode("utf-8"))
    page = render_html(report, figures, explanations=explanations)
    storage.write_bytes(storage.join(out_uri, "report.html"), page.encode("utf-8"))
    logger.info("Wrote report (%d images) to %s", report["n_images"], out_uri)


# ---------------------------------------------------------------------------------------------------------------
# Preparation


@dataclass(frozen=True)
class _Prepared:
    images: pd.DataFrame  # labelled, error-free rows with a `study_key`
    studies: pd.DataFrame  # aggregate_studies(...) of `images`
    n_rows: int
    n_errors: int
    n_unlabelled: int
    model_id: str | list[str] | None


def _prepare(df: pd.DataFrame) -> _Prepared:
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        hint = " The report needs ground truth: score a labelled split." if "label" in missing else ""
        raise ValueError(f"predictions have no {', '.join(map(repr, missing))} column.{hint}")
    ids = df["image_id"].dropna()
    repeated = ids[ids.duplicated(keep=False)]
    if not repeated.empty:
        # Counting an image twice would weigh it double in every metric (e.g. two scoring outputs in one folder).
        names = sorted(map(str, pd.unique(repeated)))
        raise UserError(
            f"the predictions hold {len(names)} image_id(s) more than once ({len(repeated)} rows), e.g. "
            f"{', '.join(names[:3])}; each image must appear once: are two scoring outputs under one folder?"
        )
    failed = df["error"].notna() if "error" in df else pd.Series(False, index=df.index)
    failed |= df["prob_abnormal"].isna()
    labelled = df["label"].notna()
    keep = ~failed & labelled
    images = df.loc[keep].copy()
    bad_labels = ~images["label"].isin([0, 1])
    if bad_labels.any():
        values = sorted(map(str, pd.unique(images.loc[bad_labels, "label"])))[:5]
        raise ValueError(f"label must be 0 (normal) or 1 (abnormal); found {', '.join(values)}")
    images["label"] = images["label"].astype(np.int8)
    images["prob_abnormal"] = images["prob_abnormal"].astype(np.float64)
    # A row without a study (null or blank study_id) is its own study; the prefix keeps it from colliding with a
    # real study id.
    own_study = "image:" + images["image_id"].astype(str)
    if "study_id" in images:
        study_id = images["study_id"].astype(object)
        blank = study_id.isna() | (study_id.fillna("?").astype(str).str.strip() == "")
        images["study_key"] = study_id.where(~blank, own_study)
    else:
        images["study_key"] = own_study
    for column in ("body_part", "body_part_pred"):
        if column in images:
            unknown = images[column].notna() & ~images[column].isin(BODY_PARTS)
            if unknown.any():
                values = sorted(map(str, pd.unique(images.loc[unknown, column])))[:5]
                raise ValueError(f"{column} has unknown parts {values}; expected one of {', '.join(BODY_PARTS)}")
    studies = aggregate_studies(images["study_key"], images["prob_abnormal"], images["label"])
    model_ids = sorted(map(str, pd.unique(df["model_id"].dropna()))) if "model_id" in df else []
    return _Prepared(
        images=images,
        studies=studies,
        n_rows=len(df),
        n_errors=int(failed.sum()),
        n_unlabelled=int((~failed & ~labelled).sum()),
        model_id=None if not model_ids else model_ids[0] if len(model_ids) == 1 else model_ids,
    )


def _per_body_part(images: pd.DataFrame, threshold: float) -> dict[str, Any]:
    # A part's studies are formed from that part's images only, so every part with images has studies.
    by_part = {part: g for part, g in images.groupby("body_part", sort=False)}
    out = {}
    for part in BODY_PARTS:
        if part not in by_part:
            continue
        img = by_part[part]
        studies = aggregate_studies(img["study_key"], img["prob_abnormal"], img["label"])
        out[part] = {
            "image_level": compute_binary_metrics(img["label"], img["prob_abnormal"], threshold),
            "study_level": compute_binary_metrics(studies["label"], studies["prob_abnormal"], threshold),
        }
    return out
