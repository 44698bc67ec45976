"""Pure metric functions for the abnormality and body-part tasks, at image and study level.

Everything takes arrays and returns plain JSON-ready dicts (floats, ints, `None`); scikit-learn does the metric
math. A metric that is undefined for the data (AUC with one class, kappa when labels and predictions are one and
the same class, precision with nothing predicted) is `None` with the reason under `notes`, never NaN or a warning.
Macro and weighted averages follow scikit-learn's `classification_report`: an undefined per-class value counts as 0
there (and a note says so), rather than dropping that class from the average.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from mura_ray.labels import BODY_PARTS

OperatingPoint = Literal["kappa", "youden", "sensitivity"]
CalibrationLevel = Literal["image", "study"]

_BINARY = [0, 1]


def compute_binary_metrics(
    y_true: np.ndarray | Sequence[int],
    prob: np.ndarray | Sequence[float],
    threshold: float,
    *,
    bootstrap: int = 0,
    seed: int = 0,
    groups: np.ndarray | Sequence[Any] | pd.Series | None = None,
    unit: str | None = None,
) -> dict[str, Any]:
    """Abnormality metrics at `threshold` (`prob >= threshold` is abnormal) plus threshold-free ROC AUC.

    Returns accuracy, roc_auc, cohen_kappa, average_precision, brier_score, confusion_matrix
    `[[tn, fp], [fn, tp]]`, per_class / macro_avg / weighted_avg precision, recall and F1, counts, and with
    `bootstrap > 0` percentile 95% CIs for AUC and kappa (`roc_auc_ci95`, `cohen_kappa_ci95`) and a `bootstrap`
    entry saying how they were drawn. `groups` (one id per row) makes the bootstrap draw groups, e.g. the studies
    of images, with all their rows (see `bootstrap_ci`); `unit` names what one resampled unit is in that entry
    (default "group" with `groups`, else "row").
    """
    y = np.asarray(y_true).astype(np.int8, copy=False)
    p = np.asarray(prob, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"y_true and prob must be 1-D and the same length; got {y.shape} and {p.shape}")
    if y.size == 0:
        raise ValueError("cannot compute metrics on zero predictions")
    y_pred = (p >= threshold).astype(np.int8)
    notes: dict[str, str] = {}

    cm = confusion_matrix(y, y_pred, labels=_BINARY)
    n_pos = int(cm[1].sum())
    one_class = n_pos == 0 or n_pos == y.size

    precision, recall, f1, support = precision_recall_fscore_support(
        y, y_pred, labels=_BINARY, zero_division=np.nan
    )
    per_class = {
        str(c): {
            "precision": _num(precision[c]),
            "recall": _num(recall[c]),
            "f1": _num(f1[c]),
            "support": int(support[c]),
        }
        for c in _BINARY
    }
    for c in _BINARY:
        if np.isnan(precision[c]):
            notes[f"per_class.{c}.precision"] = f"no predictions of class {c}"
        if np.isnan(recall[c]):
            notes[f"per_class.{c}.recall"] = f"no true examples of class {c}"
    averages = _averages(y, y_pred, _BINARY, [f"class {c}" for c in _BINARY], (precision, recall, f1, support),
                          notes)

    if one_class:
        roc_auc = None
        notes["roc_auc"] = f"only one class present (all {'abnormal' if n_pos else 'normal'})"
    else:
        roc_auc = float(roc_auc_score(y, p))
    if n_pos == 0:
        average_precision = None
        notes["average_precision"] = "no abnormal examples"
    else:
        average_precision = float(average_precision_score(y, p))
    kappa = _kappa(y, y_pred)
    if kappa is None:
        notes["cohen_kappa"] = "labels and predictions are all the same single class (chance agreement is 1)"

    out: dict[str, Any] = {
        "n": int(y.size),
        "n_abnormal": n_pos,
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(y, y_pred)),
        "roc_auc": roc_auc,
        "cohen_kappa": kappa,
        "average_precision": average_precision,
        "brier_score": float(brier_score_loss(y, p, labels=_BINARY)),
        "confusion_matrix": cm.tolist(),
        "sensitivity": per_class["1"]["recall"],
        "specificity": per_class["0"]["recall"],
        "per_class": per_class,
        **averages,
    }
    if bootstrap > 0:
        ci = bootstrap_ci(y, p, y_pred, n_resamples=bootstrap, seed=seed, groups=groups)
        out["roc_auc_ci95"], out["cohen_kappa_ci95"] = ci["roc_auc_ci95"], ci["cohen_kappa_ci95"]
        used = ci["n_resamples_used"]
        out["bootstrap"] = {
            "n_resamples": int(bootstrap),
            "seed": int(seed),
            "unit": unit or ("group" if groups is not None else "row"),
            "n_units": ci["n_units"],
            "n_resamples_used": used,
        }
        why = {"roc_auc": "had one class only (no AUC)", "cohen_kappa": "had kappa undefined (labels and "
               "predictions all one and the same class)"}
        for metric in ("roc_auc", "cohen_kappa"):
            if used[metric] == 0:
                notes[f"{metric}_ci95"] = f"no usable bootstrap resample: all {bootstrap} {why[metric]}"
            elif used[metric] < bootstrap:
                notes[f"{metric}_ci95"] = (f"from {used[metric]} of {bootstrap} bootstrap resamples; the other "
                                           f"{bootstrap - used[metric]} {why[metric]} and were skipped")
    out["notes"] = notes
    return out


def bootstrap_ci(
    y_true: np.ndarray,
    prob: np.ndarray,
    y_pred: np.ndarray,
    *,
    n_resamples: int,
    seed: int = 0,
    groups: np.ndarray | Sequence[Any] | pd.Series | None = None,
) -> dict[str, Any]:
    """Percentile 95% bootstrap intervals for ROC AUC and Cohen's kappa, resampling groups (clusters) of rows.

    With `groups` (one id per row, no missing ids), a resample draws as many groups as there are, with
    replacement, each with all its rows: the images of one study are correlated, and resampling them one by one
    would give intervals that are too narrow. Without `groups`, every row is its own group. A resample is a weight
    per row (how often its group was drawn); the rows are sorted by score once, so each resample's exact AUC is a
    weighted sum over runs of tied scores, O(rows) (1,000,000 rows, 200 resamples: seconds, docs/benchmarks.md).

    A resample with one class only has no AUC, and one whose labels and predictions are all the same class has no
    kappa; each is skipped for that metric only. Returns `roc_auc_ci95` and `cohen_kappa_ci95` (None when no
    resample was usable), `n_resamples_used` per metric and `n_units` (the number of groups).
    """
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(prob, dtype=np.float64)
    unit = _group_codes(groups, y.size)
    n_units = int(unit.max()) + 1 if y.size else 0
    order = np.argsort(p, kind="stable")
    label_sorted, unit_sorted = y[order], unit[order]
    ties = np.flatnonzero(np.r_[True, np.diff(p[order]) != 0])  # where each run of equal scores starts
    cell = y * 2 + np.asarray(y_pred).astype(np.int64)  # the 2x2 table's cell of each row
    rng = np.random.default_rng(seed)
    aucs: list[float] = []
    kappas: list[float] = []
    for _ in range(n_resamples):
        drawn = np.bincount(rng.integers(0, n_units, n_units), minlength=n_units).astype(np.float64)
        weight = drawn[unit_sorted]
        pos = np.add.reduceat(weight * label_sorted, ties)
        neg = np.add.reduceat(weight * (1 - label_sorted), ties)
        if pos.sum() > 0 and neg.sum() > 0:  # a resample with one class has no AUC; skipping it is the convention
            # Each positive outranks the negatives of lower scores, and half of those tied with it.
            aucs.append(float((pos * (np.cumsum(neg) - 0.5 * neg)).sum() / (pos.sum() * neg.sum())))
        table = np.bincount(cell, weights=drawn[unit], minlength=4)
        if table[0] < table.sum() and table[3] < table.sum():  # otherwise chance agreement is 1: kappa is undefined
            kappas.append(cohen_kappa_score([0, 0, 1, 1], [0, 1, 0, 1], labels=_BINARY, sample_weight=table))
    return {
        "roc_auc_ci95": _percentile_ci(np.array(aucs)),
        "cohen_kappa_ci95": _percentile_ci(np.array(kappas)),
        "n_resamples_used": {"roc_auc": len(aucs), "cohen_kappa": len(kappas)},
        "n_units": n_units,
    }


def _group_codes(groups: np.ndarray | Sequence[Any] | pd.Series | None, n: int) -> np.ndarray:
    """Integer codes 0..k-1 of the groups of `n` rows; every row its own group without `groups`."""
    if groups is None:
        return np.arange(n, dtype=np.int64)
    codes, _ = pd.factorize(pd.Series(np.asarray(groups, dtype=object)), use_na_sentinel=True)
    if codes.size != n:
        raise ValueError(f"groups must have one id per row; got {codes.size} ids for {n} rows")
    if (codes < 0).any():
        raise ValueError(f"groups has {int((codes < 0).sum())} missing ids; give each such row its own group")
    return codes.astype(np.int64)


def aggregate_studies(
    study_ids: np.ndarray | Sequence[str] | pd.Series,
    probs: np.ndarray | Sequence[float] | pd.Series,
    labels: np.ndarray | Sequence[int] | pd.Series,
) -> pd.DataFrame:
    """One row per study, MURA's protocol: probability = mean of its images', label = max of its images'.

    Returns a DataFrame indexed by `study_id` (sorted) with columns `prob_abnormal`, `label`, `n_images` and
    `mixed_labels` (its images have both labels; the max makes it abnormal). Every row needs a study id: give a
    row without one its own (a missing id would otherwise drop the row from every study).
    """
    frame = pd.DataFrame(
        {
            "study_id": np.asarray(study_ids, dtype=object),
            "prob_abnormal": np.asarray(probs, dtype=np.float64),
            "label": np.asarray(labels).astype(np.int8),
        }
    )
    missing = frame["study_id"].isna() | (frame["study_id"] == "")
    if missing.any():
        raise ValueError(f"{int(missing.sum())} rows have no study id; give each its own study")
    studies = frame.groupby("study_id", sort=True).agg(
        prob_abnormal=("prob_abnormal", "mean"), label=("label", "max"), n_images=("label", "size"),
        min_label=("label", "min"),
    )
    studies["mixed_labels"] = studies["min_label"] != studies["label"]
    return studies.drop(columns="min_label")


def validation_metrics(
    labels: np.ndarray, probs: np.ndarray, study_ids: np.ndarray | Sequence[Any] | pd.Series, threshold: float
) -> dict[str, float | None]:
    """AUC and Cohen's kappa (at `threshold`) per image and per study (`aggregate_studies`): the validation metrics
    that select checkpoints and that every model card records. None where undefined (one class)."""
    image = compute_binary_metrics(labels, probs, threshold)
    studies = aggregate_studies(study_ids, probs, labels)
    study = compute_binary_metrics(studies["label"].to_numpy(), studies["prob_abnormal"].to_numpy(), threshold)
    return {"val_auc": image["roc_auc"], "val_kappa": image["cohen_kappa"], "val_study_auc": study["roc_auc"],
            "val_study_kappa": study["cohen_kappa"]}


def compute_body_part_metrics(
    y_true_names: np.ndarray | Sequence[str], y_pred_names: np.ndarray | Sequence[str]
) -> dict[str, Any]:
    """Body-part task: accuracy, macro F1, per-part precision/recall/F1/support and the confusion matrix.

    Parts are reported in `BODY_PARTS` order, restricted to those seen in either labels or predictions.
    """
    y = _encode_body_parts(y_true_names, "y_true_names")
    y_pred = _encode_body_parts(y_pred_names, "y_pred_names")
    if y.size != y_pred.size:
        raise ValueError(f"y_true_names and y_pred_names differ in length: {y.size} vs {y_pred.size}")
    if y.size == 0:
        raise ValueError("cannot compute body-part metrics on zero predictions")
    present = np.union1d(np.unique(y), np.unique(y_pred)).tolist()
    names = [BODY_PARTS[i] for i in present]
    precision, recall, f1, support = precision_recall_fscore_support(
        y, y_pred, labels=present, zero_division=np.nan
    )
    notes: dict[str, str] = {}
    per_class = {}
    for i, name in enumerate(names):
        per_class[name] = {
            "precision": _num(precision[i]),
            "recall": _num(recall[i]),
            "f1": _num(f1[i]),
            "support": int(support[i]),
        }
        if np.isnan(precision[i]):
            notes[f"per_class.{name}.precision"] = f"{name} never predicted"
        if np.isnan(recall[i]):
            notes[f"per_class.{name}.recall"] = f"no true {name} images"
    averages = _averages(y, y_pred, present, names, (precision, recall, f1, support), notes)
    return {
        "n": int(y.size),
        "accuracy": float(accuracy_score(y, y_pred)),
        "macro_f1": float(f1_score(y, y_pred, labels=present, average="macro", zero_division=0)),
        "per_class": per_class,
        **averages,
        "confusion_matrix": {"labels": names, "matrix": confusion_matrix(y, y_pred, labels=present).tolist()},
        "notes": notes,
    }


def choose_threshold(
    y_true: np.ndarray | Sequence[int],
    prob: np.ndarray | Sequence[float],
    method: OperatingPoint = "youden",
    target_sensitivity: float = 0.9,
) -> float:
    """Pick an operating point on validation predictions; `prob >= threshold` is then called abnormal.

    `kappa` maximises Cohen's kappa (MURA's measure), `youden` sensitivity + specificity - 1 (Youden's J).
    `sensitivity` takes the highest threshold whose sensitivity reaches `target_sensitivity`, i.e. the most specific
    point that meets the target.
    """
    y = np.asarray(y_true).astype(np.int8, copy=False)
    p = np.asarray(prob, dtype=np.float64)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(
            f"cannot choose a threshold: the validation predictions have only one class "
            f"({y.size} predictions, {n_pos} abnormal); calibrate on a split with normal and abnormal images"
        )
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1]; got {target_sensitivity}")
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    if method == "kappa":
        # Kappa of the 2x2 table at each of the curve's thresholds: 2 (TP TN - FN FP) / (row and column products).
        tp, fp = tpr * n_pos, fpr * (y.size - n_pos)
        fn, tn = n_pos - tp, (y.size - n_pos) - fp
        denominator = (tp + fp) * (fp + tn) + (tp + fn) * (fn + tn)
        kappa = np.divide(2 * (tp * tn - fn * fp), denominator, out=np.full_like(tp, -np.inf), where=denominator > 0)
        best = int(np.argmax(kappa))
    elif method == "youden":
        best = int(np.argmax(tpr - fpr))
    elif method == "sensitivity":
        # tpr is non-decreasing as the threshold falls, so the first index reaching the target is the highest one.
        best = int(np.argmax(tpr >= target_sensitivity - 1e-12))
    else:
        raise ValueError(f"Unknown operating point method {method!r}; expected 'kappa', 'youden' or 'sensitivity'")
    threshold = float(thresholds[best])
    if not np.isfinite(threshold):
        # roc_curve's first threshold is +inf ("nothing abnormal"); keep that meaning with a finite number.
        threshold = float(np.nextafter(p.max(), np.inf))
    return threshold


def _averages(
    y: np.ndarray,
    y_pred: np.ndarray,
    labels: list[int],
    names: list[str],
    per_class: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    notes: dict[str, str],
) -> dict[str, dict[str, float]]:
    """Macro and weighted averages as `classification_report` computes them: a per-class precision, recall or F1
    that is undefined counts as 0 (dropping it would raise, e.g., the macro precision of an all-normal prediction
    of a balanced set from 0.25 to 0.5). `notes` says which values counted as 0 where they moved an average (a
    class without support has no weight in the weighted average)."""
    precision, recall, f1, support = per_class
    undefined = [
        (f"{metric} of {name}", n)
        for metric, values in (("precision", precision), ("recall", recall), ("F1", f1))
        for name, value, n in zip(names, values, support, strict=True)
        if np.isnan(value)
    ]
    averages = {}
    for average in ("macro", "weighted"):
        pr, rc, f, _ = precision_recall_fscore_support(y, y_pred, labels=labels, average=average, zero_division=0)
        averages[f"{average}_avg"] = {"precision": float(pr), "recall": float(rc), "f1": float(f)}
        counted = [what for what, n in undefined if average == "macro" or n > 0]
        if counted:
            notes[f"{average}_avg"] = (
                f"undefined {', '.join(counted)} counted as 0 (scikit-learn's classification_report convention)"
            )
    return averages


def _kappa(y: np.ndarray, y_pred: np.ndarray) -> float | None:
    with warnings.catch_warnings():
        # Undefined kappa comes back as NaN; the caller records why instead of warning.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        value = cohen_kappa_score(y, y_pred, labels=_BINARY, replace_undefined_by=np.nan)
    return _num(value)


def _percentile_ci(values: np.ndarray) -> list[float] | None:
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _encode_body_parts(names: np.ndarray | Sequence[str], arg: str) -> np.ndarray:
    values = np.asarray(names, dtype=object)
    codes = pd.Index(BODY_PARTS).get_indexer(values)
    if (codes < 0).any():
        bad = sorted(map(str, pd.unique(values[codes < 0])))
        raise ValueError(f"{arg} has unknown body parts {bad[:5]}; expected one of {', '.join(BODY_PARTS)}")
    return codes.astype(np.int64)


def _num(value: float | np.floating) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value
