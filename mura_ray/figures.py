"""The report's PNG figures: ROC and precision-recall curves, confusion matrices, calibration, per body part,
drift distributions, and the trend over scoring runs."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve, roc_curve

from mura_ray.drift import PSI_ALARM
from mura_ray.labels import ABNORMAL_NAMES

_MAX_CURVE_POINTS = 2000  # plotted points per curve; a million-point ROC line adds nothing visible


def build_figures(report: dict[str, Any], images: pd.DataFrame | None = None,
                  studies: pd.DataFrame | None = None) -> dict[str, bytes]:
    """PNG bytes keyed by file name: ROC, precision-recall, confusion matrices, calibration, per body part (a
    report with metrics), and the drift distributions (a report with `drift` to show).

    `images` and `studies` are the rows the metrics were computed on (`label`, `prob_abnormal` columns).
    """
    figures = {}
    if "image_level" in report:
        assert images is not None and studies is not None
        levels = {
            "Image": (images["label"].to_numpy(), images["prob_abnormal"].to_numpy(), report["image_level"]),
            "Study": (studies["label"].to_numpy(), studies["prob_abnormal"].to_numpy(), report["study_level"]),
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
    shown = {name: q for name, q in report.get("drift", {}).get("quantities", {}).items() if "share" in q}
    if shown:
        figures["drift.png"] = _drift_figure(shown)
    return figures


def _drift_figure(quantities: dict[str, Any]) -> bytes:
    """Per quantity, the reference's and this run's shares per bin (the reference's deciles, or categories)."""
    cols = min(len(quantities), 4)
    rows = -(-len(quantities) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (name, q) in zip(axes, quantities.items(), strict=False):
        x = np.arange(len(q["bins"]))
        ax.bar(x - 0.2, q["reference_share"], width=0.4, label="reference (validation)", color="grey")
        ax.bar(x + 0.2, q["share"], width=0.4, label="this run", color="tab:red" if q["flagged"] else "tab:blue")
        ax.set_xticks(x, [b.title() if name == "body_part" else b for b in q["bins"]], rotation=45, ha="right",
                      fontsize=7)
        ax.set(title=f"{name}: PSI {q['psi']:.3f}" + (" (flagged)" if q["flagged"] else ""), ylabel="Share")
        ax.legend(fontsize=7)
    for ax in axes[len(quantities):]:
        ax.set_visible(False)
    return _png(fig)


def history_figure(runs: list[dict[str, Any]]) -> bytes:
    """The trend over scoring runs (OUT/history.jsonl): images, positive rate and mean probability, and the
    largest PSI of each run against the alarm, flagged runs marked."""
    when = pd.to_datetime([r["run_at"] for r in runs], utc=True)
    fig = Figure(figsize=(10, 8), layout="constrained")
    count, rate, psi = fig.subplots(3, 1, sharex=True)
    count.plot(when, [r["images"] for r in runs], "o-")
    count.set(ylabel="Images scored", title="Scoring runs")
    for key, label in (("positive_rate", "Positive rate"), ("mean_prob_abnormal", "Mean probability")):
        rate.plot(when, [np.nan if r[key] is None else r[key] for r in runs], "o-", label=label)
    rate.set(ylabel="Share / probability", ylim=(0, 1))
    rate.legend(loc="upper left")
    top = [max(r["psi"].values(), default=np.nan) for r in runs]
    psi.plot(when, top, "o-", label="largest PSI of the run")
    flagged = [r["drift_flagged"] for r in runs]
    psi.plot(when[flagged], np.asarray(top)[flagged], "o", color="tab:red", label="drift flagged")
    psi.axhline(PSI_ALARM, linestyle="--", color="grey", linewidth=1, label=f"PSI {PSI_ALARM}")
    psi.set(ylabel="PSI", xlabel="Run (UTC)")
    psi.legend(loc="upper left")
    fig.autofmt_xdate()
    return _png(fig)


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
