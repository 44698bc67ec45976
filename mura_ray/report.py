"""Predictions → report.json, report.md, a self-contained report.html and PNG figures; plus model comparisons.

The tables follow the reference MURA report (its Tables 6-9): a classification report with 4-decimal numbers,
ROC AUC and Cohen's kappa lines, a body-part table, and per-model comparison tables. Metric math lives in
`mura_ray.metrics`; this module only prepares rows, calls it, and renders. All I/O goes through `mura_ray.storage`,
so every input and output may be a local path or an `s3://` URI.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import logging
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve, roc_curve

from mura_ray import storage
from mura_ray.config import UserError
from mura_ray.labels import ABNORMAL_NAMES, BODY_PARTS
from mura_ray.metrics import (
    CalibrationLevel,
    OperatingPoint,
    aggregate_studies,
    choose_threshold,
    compute_binary_metrics,
    compute_body_part_metrics,
)

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
DEFAULT_BOOTSTRAP = 200
"""Bootstrap resamples for the AUC and kappa CIs (image and study level); cost does not grow with n."""

_COLUMNS = ("image_id", "study_id", "body_part", "body_part_pred", "prob_abnormal", "label", "model_id", "error")
_REQUIRED = ("image_id", "prob_abnormal", "label")  # for metrics; load_predictions needs all but `label`
_MANIFEST, _PREDICTIONS = "manifest.json", "predictions"  # the scoring job's output layout (mura_ray.score)
_MAX_CURVE_POINTS = 2000  # plotted points per curve; a million-point ROC line adds nothing visible


@dataclass(frozen=True)
class ReportConfig:
    """What `jobs/report.py` asks for: one report from predictions, or a comparison of finished reports."""

    out: str
    """Output directory (local path or s3:// URI)."""
    predictions: str | None = None
    """Predictions Parquet dataset written by the scoring job (needs a `label` column)."""
    compare: tuple[str, ...] = ()
    """Run or report directories to compare instead of building a report."""
    threshold: float | None = None
    """Probability at or above which an image/study is abnormal; None: calibrated, else the threshold the scoring
    job used (its manifest.json), else 0.5."""
    calibrate_on: str | None = None
    """Validation predictions on which to choose the threshold."""
    operating_point: OperatingPoint | None = None
    """How to choose the threshold on `calibrate_on`: 'youden' (default) or 'sensitivity'."""
    target_sensitivity: float | None = None
    """Sensitivity to reach with operating_point='sensitivity' (default 0.9)."""
    calibrate_level: CalibrationLevel | None = None
    """Probabilities the threshold is chosen on: 'image' (default) or 'study' (mean of a study's images)."""
    bootstrap: int = DEFAULT_BOOTSTRAP
    """Bootstrap resamples for 95% CIs of AUC and kappa; 0 disables."""
    seed: int = 0
    """Seed of the bootstrap."""
    explain: int = 0
    """Grad-CAM heatmaps per category (needs mura_ray[explain] and a scoring output, whose manifest names the
    models and the input); 0 disables."""

    def validate(self) -> ReportConfig:
        """Raise one UserError naming every bad flag; returns self so jobs can chain it."""
        problems = []
        if not self.out:
            problems.append("--out is required")
        if bool(self.predictions) == bool(self.compare):
            problems.append("pass exactly one of --predictions PRED or --compare DIR [DIR ...]")
        if self.compare and (self.threshold is not None or self.calibrate_on):
            problems.append("--threshold and --calibrate-on do not apply to --compare")
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
        if self.explain and self.compare:
            problems.append("--explain does not apply to --compare")
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


def _explanations(predictions: str, n: int, threshold: float) -> list[tuple[str, bytes]]:
    """Grad-CAM for the report's examples, with the models and the input the scoring output's manifest names."""
    found = _scoring_manifest(predictions)
    if found is None or not found[1].get("models") or not found[1].get("input"):
        raise UserError(f"--explain: --predictions {predictions} is not a scoring output (no manifest.json naming "
                        "its models and input); pass the scoring job's --out or its predictions/")
    dest, manifest = found
    from mura_ray.explain import explain_report_examples
    from mura_ray.score import read_predictions

    return explain_report_examples(read_predictions(dest), manifest["input"], list(manifest["models"]), n,
                                   threshold)


def _load_labelled(uri: str, flag: str) -> pd.DataFrame:
    df = load_predictions(uri)
    if "label" not in df:
        raise UserError(f"{flag} {uri} has no 'label' column; the report needs ground truth: score a labelled split")
    return df


def load_predictions(uri: str) -> pd.DataFrame:
    """Read the scoring job's predictions, only the columns the report uses.

    `uri` is a Parquet file, a directory of them, or a scoring output (a folder holding the scoring job's
    manifest.json, or its predictions/ folder), in which case only the parts the manifest commits are read: a
    running or interrupted run has uncommitted parts in `_staging/` and may leave stray files; a scoring output
    with nothing committed yet is refused. In a plain directory, files under a folder whose name starts with `_` or
    `.` (staging, hidden) are not read. A missing `label` column is fine here (unlabelled predictions load);
    `build_report` needs it.
    """
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no predictions at {uri}; pass the scoring job's output (a Parquet dataset)")
    files = _committed_parts(uri) if info.type == pafs.FileType.Directory else None
    if files is None and info.type == pafs.FileType.Directory:
        files = _visible_parquet_files(uri)
        if not files:
            raise FileNotFoundError(f"no .parquet files under {uri}; pass the scoring job's output directory")
    source = path if files is None else [storage.resolve(f)[1] for f in files]
    dataset = pq.ParquetDataset(source, filesystem=fs)
    names = dataset.schema.names
    missing = [c for c in _REQUIRED if c not in names and c != "label"]
    if missing:
        raise ValueError(f"predictions at {uri} have no {', '.join(map(repr, missing))} column; is it scoring output?")
    return dataset.read(columns=[c for c in _COLUMNS if c in names]).to_pandas()


def _visible_parquet_files(uri: str) -> list[str]:
    """The .parquet files under `uri`, except those under a folder (or named) `_…` or `.…`, relative to `uri`:
    a scoring run stages uncommitted parts in `_staging/`, and hidden folders are not data. Says what it skipped."""
    _, root = storage.resolve(uri)
    root = root.rstrip("/")
    visible, skipped = [], []
    for f in storage.list_files(uri, ".parquet"):
        relative = storage.resolve(f)[1][len(root):].lstrip("/")
        hidden = any(part.startswith(("_", ".")) for part in relative.split("/"))
        (skipped if hidden else visible).append(f)
    if skipped:
        logger.warning("%s: not reading %d .parquet file(s) under folders starting with '_' or '.' (uncommitted "
                       "or hidden), e.g. %s", uri, len(skipped), skipped[0])
    return visible


def _scoring_manifest(uri: str) -> tuple[str, dict[str, Any]] | None:
    """(DEST, manifest) when `uri` is a scoring output DEST (a folder holding the scoring job's manifest.json,
    whether or not anything is committed yet) or its DEST/predictions; None otherwise. A manifest.json that is not
    a scoring manifest (a JSON object with `parts`, as `mura_ray.score.read_manifest` reads it) is refused."""
    base = uri.rstrip("/")
    if storage.exists(storage.join(base, _MANIFEST)):
        dest = base
    elif posixpath.basename(base) == _PREDICTIONS and storage.exists(storage.join(posixpath.dirname(base), _MANIFEST)):
        dest = posixpath.dirname(base)
    else:
        return None
    manifest_uri = storage.join(dest, _MANIFEST)
    try:
        manifest = storage.read_json(manifest_uri)
    except ValueError as e:
        raise UserError(f"{manifest_uri} is not valid JSON ({e}); pass a scoring output or a folder of Parquet "
                        "predictions") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("parts"), dict | list):
        raise UserError(f"{manifest_uri} is not a scoring manifest (no 'parts'); pass a scoring output or a folder "
                        "of Parquet predictions")
    return dest, manifest


def _committed_parts(uri: str) -> list[str] | None:
    """The part files a scoring manifest commits, or None when `uri` is not a scoring output."""
    found = _scoring_manifest(uri)
    if found is None:
        return None
    dest, manifest = found
    if not manifest["parts"]:
        raise UserError(f"{uri} is a scoring output with nothing committed yet ({storage.join(dest, _MANIFEST)} "
                        "lists no parts): wait for its scoring run to commit a chunk, or re-run it")
    return [storage.join(dest, _PREDICTIONS, name) for name in sorted(manifest["parts"])]


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
    test_found, val_found = _scoring_manifest(pred_uri), _scoring_manifest(val_uri)
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
    found = _scoring_manifest(uri)
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


def write_report(
    report: dict[str, Any],
    df: pd.DataFrame,
    out_uri: str,
    *,
    explanations: Sequence[tuple[str, bytes]] | None = None,
) -> None:
    """Write report.json, report.md, report.html and figures/*.png under `out_uri`.

    `df` is the predictions table the report was built from (the curves need the probabilities).
    `explanations` are (caption, PNG bytes) pairs, e.g. Grad-CAM heatmaps, shown under their own heading.
    """
    figures = build_figures(report, df)
    for name, png in figures.items():
        storage.write_bytes(storage.join(out_uri, "figures", name), png)
    storage.write_json(storage.join(out_uri, "report.json"), report)
    storage.write_bytes(storage.join(out_uri, "report.md"), render_markdown(report).encode("utf-8"))
    page = render_html(report, figures, explanations=explanations)
    storage.write_bytes(storage.join(out_uri, "report.html"), page.encode("utf-8"))
    logger.info("Wrote report (%d images, %d studies) to %s", report["n_images"], report["n_studies"], out_uri)


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


# ---------------------------------------------------------------------------------------------------------------
# Figures


def build_figures(report: dict[str, Any], df: pd.DataFrame) -> dict[str, bytes]:
    """PNG bytes keyed by file name: ROC, precision-recall, confusion matrices, calibration, per body part."""
    prep = _prepare(df)
    levels = {
        "Image": (prep.images["label"].to_numpy(), prep.images["prob_abnormal"].to_numpy(), report["image_level"]),
        "Study": (prep.studies["label"].to_numpy(), prep.studies["prob_abnormal"].to_numpy(), report["study_level"]),
    }
    figures = {
        "roc.png": _roc_figure(levels),
        "precision_recall.png": _pr_figure(levels),
        "confusion_matrix.png": _confusion_figure(levels),
        "calibration.png": _calibration_figure(levels),
    }
    if report.get("per_body_part"):
        figures["per_body_part.png"] = _per_body_part_figure(report["per_body_part"])
    if report.get("body_part"):
        figures["body_part_confusion.png"] = _body_part_confusion_figure(report["body_part"])
    return figures


_Levels = dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]]


def _roc_figure(levels: _Levels) -> bytes:
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="Chance")
    for name, (y, p, metrics) in levels.items():
        if metrics["roc_auc"] is None:
            continue  # one class only: no curve to draw (the report notes why)
        fpr, tpr, _ = roc_curve(y, p)
        idx = _decimate(fpr.size)
        line = ax.plot(fpr[idx], tpr[idx], label=f"{name} (AUC {metrics['roc_auc']:.4f})")[0]
        if metrics["sensitivity"] is not None and metrics["specificity"] is not None:
            ax.plot(1 - metrics["specificity"], metrics["sensitivity"], "o", color=line.get_color())
    ax.set(xlabel="False positive rate (1 - specificity)", ylabel="True positive rate (sensitivity)",
           title="ROC curve (dot: threshold in use)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return _png(fig)


def _pr_figure(levels: _Levels) -> bytes:
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    for name, (y, p, metrics) in levels.items():
        if metrics["roc_auc"] is None:
            continue
        precision, recall, _ = precision_recall_curve(y, p, drop_intermediate=True)
        idx = _decimate(recall.size)
        line = ax.plot(recall[idx], precision[idx], label=f"{name} (AP {metrics['average_precision']:.4f})")[0]
        ax.axhline(y.mean(), linestyle=":", linewidth=1, color=line.get_color())
    ax.set(xlabel="Recall (sensitivity)", ylabel="Precision", title="Precision-recall curve (dotted: prevalence)",
           xlim=(0, 1), ylim=(0, 1.01))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left")
    else:
        ax.text(0.5, 0.5, "undefined: only one class present", ha="center", va="center")
    return _png(fig)


def _confusion_figure(levels: _Levels) -> bytes:
    fig = Figure(figsize=(9, 4), layout="constrained")
    axes = fig.subplots(1, len(levels))
    for ax, (name, (_, _, metrics)) in zip(axes, levels.items(), strict=True):
        _draw_matrix(ax, np.array(metrics["confusion_matrix"]), list(ABNORMAL_NAMES))
        ax.set_title(f"{name} level (threshold {metrics['threshold']:.4f})")
    return _png(fig)


def _calibration_figure(levels: _Levels) -> bytes:
    fig = Figure(figsize=(5.5, 7), layout="constrained")
    ax, hist = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="Perfectly calibrated")
    for name, (y, p, metrics) in levels.items():
        frac_pos, mean_pred = calibration_curve(y, np.clip(p, 0.0, 1.0), n_bins=10, strategy="uniform")
        line = ax.plot(mean_pred, frac_pos, "o-", label=f"{name} (Brier {metrics['brier_score']:.4f})")[0]
        counts, edges = np.histogram(np.clip(p, 0.0, 1.0), bins=20, range=(0, 1))
        hist.stairs(counts / max(counts.sum(), 1), edges, color=line.get_color(), label=name)
    ax.set(ylabel="Fraction abnormal", title="Calibration", ylim=(0, 1.01))
    ax.legend(loc="upper left")
    hist.set(xlabel="Mean predicted probability of abnormal", ylabel="Share", xlim=(0, 1))
    return _png(fig)


def _per_body_part_figure(per_part: dict[str, Any]) -> bytes:
    parts = list(per_part)
    x = np.arange(len(parts))
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (key, title) in zip(axes, [("roc_auc", "ROC AUC"), ("cohen_kappa", "Cohen's kappa")], strict=True):
        for offset, level in [(-0.2, "image_level"), (0.2, "study_level")]:
            values = [np.nan if per_part[p][level][key] is None else per_part[p][level][key] for p in parts]
            ax.bar(x + offset, values, width=0.4, label=level.replace("_level", ""))
        ax.set_xticks(x, [p.title() for p in parts], rotation=30)
        ax.set(title=f"{title} per body part", ylim=(min(0, ax.get_ylim()[0]), 1.15))
        ax.axhline(1, color="grey", linewidth=0.5)
        ax.legend(loc="upper right", ncols=2)
    return _png(fig)


def _body_part_confusion_figure(body_part: dict[str, Any]) -> bytes:
    names = [n.title() for n in body_part["confusion_matrix"]["labels"]]
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.subplots()
    _draw_matrix(ax, np.array(body_part["confusion_matrix"]["matrix"]), names)
    ax.set_title(f"Body part (accuracy {body_part['accuracy']:.4f})")
    return _png(fig)


def _draw_matrix(ax: Any, matrix: np.ndarray, names: list[str]) -> None:
    ax.imshow(matrix, cmap="Blues")
    high = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:,}", ha="center", va="center", color="white" if value > high else "black")
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=30 if len(names) > 2 else 0)
    ax.set_yticks(ticks, names)
    ax.set(xlabel="Predicted", ylabel="True")


def _decimate(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, _MAX_CURVE_POINTS)).round().astype(np.int64))


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Rendering: one list of blocks, rendered to Markdown and to HTML so the two never drift apart.


@dataclass(frozen=True)
class _Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str


_Block = tuple[str, str] | _Table | list[str]  # ("h1" | "h2" | "p" | "figure:<file>", text), table, bullet list


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables in the reference report's format (figures linked from figures/)."""
    lines: list[str] = []
    for block in _blocks(report):
        if isinstance(block, _Table):
            lines += [*_markdown_table(block.headers, block.rows), "", block.caption, ""]
            continue
        if isinstance(block, list):
            lines += [*(f"- {item}" for item in block), ""]
            continue
        kind, text = block
        if kind == "h1":
            lines += [f"# {text}", ""]
        elif kind == "h2":
            lines += [f"## {text}", ""]
        elif kind.startswith("figure:"):
            lines += [f"![{text}](figures/{kind.removeprefix('figure:')})", ""]
        else:
            lines += [text, ""]
    return "\n".join(lines).rstrip() + "\n"


def render_html(
    report: dict[str, Any],
    figures: dict[str, bytes],
    *,
    explanations: Sequence[tuple[str, bytes]] | None = None,
) -> str:
    """One self-contained page: inline CSS, tables, figures embedded as base64 PNG data URIs."""
    body: list[str] = []
    for block in _blocks(report):
        if isinstance(block, _Table):
            body.append(_html_table(block))
            continue
        if isinstance(block, list):
            body.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block) + "</ul>")
            continue
        kind, text = block
        if kind.startswith("figure:"):
            name = kind.removeprefix("figure:")
            if name in figures:
                body.append(_html_figure(figures[name], text))
        elif kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(text)}</{kind}>")
        else:
            body.append(f"<p>{html.escape(text)}</p>")
    if explanations:
        body.append("<h2>Grad-CAM</h2>")
        body += [_html_figure(png, caption) for caption, png in explanations]
    title = html.escape(_title(report))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;"
    "padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}"
    "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}"
    "caption{caption-side:bottom;font-style:italic;padding-top:.4em;text-align:left}"
    "figure{display:inline-block;margin:1em 1em 1em 0;vertical-align:top}img{max-width:100%}"
    "figcaption{font-style:italic}"
)


def _blocks(report: dict[str, Any]) -> list[_Block]:
    blocks: list[_Block] = [("h1", _title(report))]
    blocks += [("p", line) for line in _summary_lines(report)]
    n = 0

    def table(headers: list[str], rows: list[list[str]], caption: str) -> _Table:
        nonlocal n
        n += 1
        return _Table(headers, rows, f"Table {n}: {caption}")

    for level, name, unit in [("image_level", "Image", "images"), ("study_level", "Study", "studies")]:
        m = report[level]
        blocks.append(("h2", f"Abnormality classification: {name.lower()} level"))
        blocks.append(table(*_classification_rows(m), f"{name}-level abnormality classification report "
                                                        f"(class 1 = abnormal, {m['n']} {unit})"))
        blocks.append(("p", f"ROC AUC Score: {_fmt(m['roc_auc'])}{_ci(m.get('roc_auc_ci95'))}"))
        blocks.append(("p", f"Cohen's Kappa Score: {_fmt(m['cohen_kappa'])}{_ci(m.get('cohen_kappa_ci95'))}"))
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        blocks.append(table(["", "Predicted 0", "Predicted 1"], [["True 0", str(tn), str(fp)],
                                                                  ["True 1", str(fn), str(tp)]],
                            f"{name}-level confusion matrix at threshold {m['threshold']:.4f}"))
    blocks += [("figure:roc.png", "ROC curves"), ("figure:precision_recall.png", "Precision-recall curves"),
               ("figure:confusion_matrix.png", "Confusion matrices"), ("figure:calibration.png", "Calibration")]

    if report.get("per_body_part"):
        blocks.append(("h2", "Abnormality classification per body part"))
        blocks.append(table(*_per_body_part_rows(report["per_body_part"]),
                            "Abnormality classification per body part (image and study level)"))
        blocks.append(("figure:per_body_part.png", "ROC AUC and Cohen's kappa per body part"))
    if report.get("body_part"):
        blocks.append(("h2", "Body part classification"))
        blocks.append(table(*_body_part_rows(report["body_part"]), "Body part classification report"))
        blocks.append(("figure:body_part_confusion.png", "Body part confusion matrix"))

    notes = _collect_notes(report)
    if notes:
        blocks.append(("h2", "Notes: undefined metrics, bootstrap, study labels"))
        blocks.append([f"{where}: {reason}" for where, reason in notes])
    return blocks


def _title(report: dict[str, Any]) -> str:
    model = report.get("model_id")
    model_name = ", ".join(model) if isinstance(model, list) else model
    return f"MURA abnormality report: {model_name}" if model_name else "MURA abnormality report"


def _summary_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    if report.get("predictions"):
        lines.append(f"Predictions: {report['predictions']}")
    lines.append(
        f"Images: {report['n_images']} · Studies: {report['n_studies']} · "
        f"Excluded: {report['n_errors']} with scoring errors, {report.get('n_unlabelled', 0)} unlabelled"
    )
    threshold = f"Threshold: {report['threshold']:.4f} ({report['threshold_source']})"
    point = report.get("operating_point")
    if point:
        chosen = (
            "Youden's J" if point["method"] == "youden"
            else f"highest threshold with sensitivity >= {point['target_sensitivity']}"
        )
        level = point.get("level", "image")
        threshold += (
            f", chosen by {chosen} on the {level}-level probabilities of "
            f"{point.get('calibrated_on', 'validation predictions')}"
        )
        validation = point.get("validation")
        if validation:
            threshold += " (validation: " + "; ".join(
                f"{validation[key]['n']} {unit}, sensitivity {_fmt(validation[key]['sensitivity'])}, "
                f"specificity {_fmt(validation[key]['specificity'])}"
                for key, unit in (("image_level", "images"), ("study_level", "studies"))
            ) + ")"
        else:  # a report written before both levels were recorded
            threshold += (f" ({point['n_images']} images; sensitivity {_fmt(point['val_sensitivity'])}, "
                          f"specificity {_fmt(point['val_specificity'])})")
    lines.append(threshold + "; an image or study is abnormal when its probability is at or above it.")
    mixed = report.get("n_studies_mixed_labels")
    lines.append("Study probability = mean of its images' probabilities, study label = max of its images' labels "
                 "(MURA's protocol)" + (f"; {mixed} studies have normal and abnormal images." if mixed else "."))
    boot = report["image_level"].get("bootstrap")
    if boot:
        lines.append(f"95% CIs: percentile bootstrap, {boot['n_resamples']} resamples (seed {boot['seed']}) drawn "
                     f"by {boot.get('unit', 'row')} at both levels (at image level, a drawn study brings all its "
                     "images).")
    return lines


def _classification_rows(m: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["Class", "Precision", "Recall", "F1-score", "Support"]
    rows = [[c, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), str(v["support"])]
            for c, v in m["per_class"].items()]
    total = str(m["n"])
    rows.append(["Accuracy", "", "", _fmt(m["accuracy"]), total])
    for key, label in [("macro_avg", "Macro Avg"), ("weighted_avg", "Weighted Avg")]:
        a = m[key]
        rows.append([label, _fmt(a["precision"]), _fmt(a["recall"]), _fmt(a["f1"]), total])
    return headers, rows


def _per_body_part_rows(per_part: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["Body part", "Images", "Abnormal", "Accuracy", "ROC AUC", "Cohen's Kappa",
               "Studies", "Study Accuracy", "Study ROC AUC", "Study Cohen's Kappa"]
    rows = []
    for part, levels in per_part.items():
        im, st = levels["image_level"], levels["study_level"]
        rows.append([part.title(), str(im["n"]), str(im["n_abnormal"]), _fmt(im["accuracy"]), _fmt(im["roc_auc"]),
                     _fmt(im["cohen_kappa"]), str(st["n"]), _fmt(st["accuracy"]), _fmt(st["roc_auc"]),
                     _fmt(st["cohen_kappa"])])
    return headers, rows


def _body_part_rows(body_part: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["Class", "Precision", "Recall", "F1-score", "Support"]
    rows = [[name.title(), _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), str(v["support"])]
            for name, v in body_part["per_class"].items()]
    total = str(body_part["n"])
    rows.append(["Accuracy", "", "", _fmt(body_part["accuracy"]), total])
    for key, label in [("macro_avg", "Macro Avg"), ("weighted_avg", "Weighted Avg")]:
        a = body_part[key]
        rows.append([label, _fmt(a["precision"]), _fmt(a["recall"]), _fmt(a["f1"]), total])
    return headers, rows


def _collect_notes(report: dict[str, Any]) -> list[tuple[str, str]]:
    notes = list(report.get("notes", {}).items())
    for level in ("image_level", "study_level"):
        notes += [(f"{level}.{k}", v) for k, v in report[level].get("notes", {}).items()]
    for part, levels in report.get("per_body_part", {}).items():
        for level, m in levels.items():
            notes += [(f"per_body_part.{part}.{level}.{k}", v) for k, v in m.get("notes", {}).items()]
    notes += [(f"body_part.{k}", v) for k, v in report.get("body_part", {}).get("notes", {}).items()]
    return notes


def _markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def _html_table(t: _Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t.rows)
    return f"<table><caption>{html.escape(t.caption)}</caption><tr>{head}</tr>{rows}</table>"


def _html_figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    alt = html.escape(caption, quote=True)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})"


# ---------------------------------------------------------------------------------------------------------------
# Model comparison (the reference report's Tables 8 and 9, plus study-level columns)


def compare_reports(dirs: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """Markdown comparison tables and their data for finished runs or report directories.

    A run directory holds `report/report.json` and `model/model_card.json` (the model is named by the card's
    `backbone`); a report directory holds `report.json` and is named after itself.
    """
    if not dirs:
        raise ValueError("nothing to compare; pass one or more run or report directories to --compare")
    models = [_load_for_comparison(d) for d in dirs]
    names = [m["name"] for m in models]
    for m in models:
        if names.count(m["name"]) > 1:
            m["name"] = m["source"]  # two runs of one backbone: tell them apart by where they came from

    abnormal_headers = ["Model", "Threshold", "Images", "Studies", "Accuracy", "Macro F1", "ROC AUC",
                        "Cohen's Kappa", "Study Accuracy", "Study Macro F1", "Study ROC AUC", "Study Cohen's Kappa"]
    abnormal_rows = []
    for m in models:
        row = [m["name"], _fmt(m["threshold"]), str(m["n_images"]), str(m["n_studies"])]
        for level in ("image_level", "study_level"):
            s = m[level]
            row += [_pct(s["accuracy"]), _pct(s["macro_f1"]), _fmt(s["roc_auc"]), _fmt(s["cohen_kappa"])]
        abnormal_rows.append(row)
    notes = []
    if len({(m["n_images"], m["n_studies"]) for m in models}) > 1:
        sizes = ", ".join(f"{m['name']} {m['n_images']} images / {m['n_studies']} studies" for m in models)
        notes.append(f"Note: the reports are not on the same test set ({sizes}); their numbers are not directly "
                     "comparable.")
    lines = ["# Model comparison", "", *_markdown_table(abnormal_headers, abnormal_rows), "",
             "Table 1: Abnormality Classification – Model Comparison (image level, then study level; each at its "
             "own threshold)", ""]
    for note in notes:
        lines += [note, ""]
    with_parts = [m for m in models if m["body_part"] is not None]
    if with_parts:
        rows = [[m["name"], _pct(m["body_part"]["accuracy"]), _pct(m["body_part"]["macro_f1"])] for m in with_parts]
        lines += [*_markdown_table(["Model", "Accuracy", "Macro F1"], rows), "",
                  "Table 2: Body Part Classification – Model Comparison", ""]
    return "\n".join(lines).rstrip() + "\n", {"models": models, "notes": notes}


def write_comparison(dirs: Sequence[str], out_uri: str) -> tuple[str, dict[str, Any]]:
    """Write comparison.md and comparison.json under `out_uri`; returns what `compare_reports` returned."""
    markdown, data = compare_reports(dirs)
    storage.write_bytes(storage.join(out_uri, "comparison.md"), markdown.encode("utf-8"))
    storage.write_json(storage.join(out_uri, "comparison.json"), data)
    logger.info("Wrote comparison of %d models to %s", len(data["models"]), out_uri)
    return markdown, data


def _load_for_comparison(uri: str) -> dict[str, Any]:
    name = posixpath.basename(uri.rstrip("/")) or uri
    if storage.exists(storage.join(uri, "report.json")):
        report_uri = storage.join(uri, "report.json")
    elif storage.exists(storage.join(uri, "report", "report.json")):
        report_uri = storage.join(uri, "report", "report.json")
        card_uri = storage.join(uri, "model", "model_card.json")
        if storage.exists(card_uri):
            card = _read_json_or_refuse(card_uri, "a model card")
            backbone = card.get("backbone") if isinstance(card, dict) else None
            name = backbone if isinstance(backbone, str) and backbone else name
    else:
        raise FileNotFoundError(
            f"{uri} is neither a report directory (report.json) nor a run directory (report/report.json)"
        )
    report = _read_json_or_refuse(report_uri, "a jobs/report.py report")
    _check_comparable(report, report_uri)
    entry: dict[str, Any] = {"name": name, "source": uri, "threshold": report["threshold"],
                             "n_images": report["n_images"], "n_studies": report["n_studies"]}
    for level in ("image_level", "study_level"):
        m = report[level]
        entry[level] = {
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_avg"]["f1"],
            "roc_auc": m["roc_auc"],
            "cohen_kappa": m["cohen_kappa"],
        }
    body_part = report.get("body_part")
    entry["body_part"] = (
        {"accuracy": body_part["accuracy"], "macro_f1": body_part["macro_f1"]} if body_part else None
    )
    return entry


def _read_json_or_refuse(uri: str, what: str) -> Any:
    try:
        return storage.read_json(uri)
    except ValueError as e:
        raise UserError(f"{uri} is not {what}: not valid JSON ({e})") from None


def _check_comparable(report: Any, uri: str) -> None:
    """Refuse a report.json without what the comparison reads (written by something else, or damaged)."""

    def number(value: Any, nullable: bool = False) -> bool:
        return (value is None and nullable) or (isinstance(value, int | float) and not isinstance(value, bool))

    if not isinstance(report, dict):
        problems = [f"a JSON {type(report).__name__}, not an object"]
    else:
        problems = [key for key in ("n_images", "n_studies", "threshold") if not number(report.get(key))]
        for level in ("image_level", "study_level"):
            m = report.get(level)
            if not isinstance(m, dict):
                problems.append(level)
                continue
            problems += [f"{level}.{key}" for key, nullable in (("accuracy", False), ("roc_auc", True),
                                                                 ("cohen_kappa", True))
                         if not number(m.get(key), nullable)]
            avg = m.get("macro_avg")
            if not isinstance(avg, dict) or not number(avg.get("f1")):
                problems.append(f"{level}.macro_avg.f1")
        body_part = report.get("body_part")
        if body_part is not None and (not isinstance(body_part, dict) or not all(
                number(body_part.get(key)) for key in ("accuracy", "macro_f1"))):
            problems.append("body_part")
        problems = [f"no valid {p}" for p in problems]
    if problems:
        raise UserError(f"{uri} is not a jobs/report.py report ({', '.join(problems[:6])}); pass report or run "
                        "directories written by jobs/report.py, score or train")
