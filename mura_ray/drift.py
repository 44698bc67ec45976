"""Drift: how far the images a scoring run scored are from the model's validation split, quantity by quantity.

At export, the validation split's predictions give the model card a reference profile (`build_reference`). Every
scoring run profiles what it scored and compares (`compare`): the population stability index (PSI) over the
reference's bins for every quantity, and the two-sample Kolmogorov-Smirnov statistic for the continuous ones. A
quantity is flagged when its PSI passes both the usual alarm (0.2) and what sampling alone makes likely at these
sample sizes (`psi_threshold`), so a few hundred images of the training distribution do not raise it. Pure
functions: prediction rows in, JSON-ready dicts out (docs/operations.md, "Drift").
"""

from __future__ import annotations

import posixpath
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import chi2, entropy, ks_2samp

from mura_ray.labels import BODY_PARTS

QUANTITIES: dict[str, str] = {
    "prob_abnormal": "probability of abnormal",
    "image_mean": "mean intensity (0-1)",
    "image_contrast": "contrast: standard deviation of intensities (0-1)",
    "image_size": "size: longer side (pixels)",
    "image_aspect": "aspect ratio (width / height)",
    "body_part": "body-part mix of the studies (the known part, else the body-part head's)",
    "body_part_disagreement": "body-part head disagreeing with the known part",
}
"""Every quantity profiled, with what it means."""
CONTINUOUS = ("prob_abnormal", "image_mean", "image_contrast", "image_size", "image_aspect")
_CATEGORIES = {"body_part": BODY_PARTS, "body_part_disagreement": ("agrees", "disagrees")}

N_BINS = 10
"""Continuous quantities are binned at the reference's deciles (fewer bins where values tie)."""
PSI_ALARM = 0.2
"""The usual PSI alarm: above it a population has shifted by conventional standards."""
ALPHA = 0.001
"""Significance level of `psi_threshold` per quantity (seven quantities: at most ~0.7% false alarms a run)."""
MIN_IMAGES = 50
"""Fewer images than this (in the run, or in the reference) are too few to judge: reported, never flagged."""
MIN_VALUES = 20
"""A quantity with fewer values than this (studies, for the body-part mix) is not judged."""
SAMPLE_SIZE = 1000
"""Reference values kept per continuous quantity for the KS statistic (a random sample, seed 0)."""
COLUMNS = ("study_id", "path", "body_part", "body_part_pred", "prob_abnormal", "pred_abnormal", "image_mean",
           "image_contrast", "image_height", "image_width", "error")
"""Prediction columns (`predictions.PREDICTION_SCHEMA`) that the profile reads."""


def profile_values(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Each quantity's values over the error-free rows of a predictions table (categorical ones as strings)."""
    ok = df["prob_abnormal"].notna()
    if "error" in df:
        ok &= df["error"].isna()
    rows = df.loc[ok]
    values: dict[str, np.ndarray] = {"prob_abnormal": rows["prob_abnormal"].to_numpy(np.float64)}
    # Columns that predictions of an older version lack come back all-null, and those rows are left out.
    stats = rows.reindex(columns=["image_mean", "image_contrast", "image_height", "image_width"]).dropna()
    stats = stats.astype(np.float64)
    height, width = stats["image_height"].to_numpy(), stats["image_width"].to_numpy()
    values.update(image_mean=stats["image_mean"].to_numpy(), image_contrast=stats["image_contrast"].to_numpy(),
                  image_size=np.maximum(height, width), image_aspect=width / np.maximum(height, 1.0))
    known = rows["body_part"]
    predicted = rows.reindex(columns=["body_part_pred"])["body_part_pred"]
    part = known.where(known.notna(), predicted)
    # Once per study (its id, else its folder): a study's views share their body part, and counting each view would
    # make the mix of a small run vary more than `psi_threshold` allows for independent draws.
    ids = rows.reindex(columns=["study_id", "path"])
    study = ids["study_id"].where(ids["study_id"].notna(), ids["path"].map(_folder, na_action="ignore"))
    first = ~study.duplicated() | study.isna()
    values["body_part"] = part[first & part.notna()].astype(str).to_numpy()
    both = known.notna() & predicted.notna()
    values["body_part_disagreement"] = np.where(known[both] == predicted[both], "agrees", "disagrees")
    return values


def _folder(path: str) -> str | None:
    folder = posixpath.dirname(str(path))
    return folder or None


def build_reference(df: pd.DataFrame, seed: int = 0) -> dict[str, Any]:
    """The reference profile of a predictions table (the validation split's, stored in the model card): per
    quantity its bins and counts, and for continuous ones a sample of values for the KS statistic."""
    values = profile_values(df)
    rng = np.random.default_rng(seed)
    quantities: dict[str, Any] = {}
    for name in CONTINUOUS:
        v = values[name]
        if not len(v):
            continue
        edges = np.unique(np.quantile(v, np.linspace(0.0, 1.0, N_BINS + 1)[1:-1]))
        sample = v if len(v) <= SAMPLE_SIZE else rng.choice(v, SAMPLE_SIZE, replace=False)
        quantities[name] = {"n": len(v), "edges": edges.tolist(), "counts": _bin_counts(v, edges).tolist(),
                            "sample": np.round(np.sort(sample), 6).tolist()}
    for name, categories in _CATEGORIES.items():
        v = values[name]
        if len(v):
            quantities[name] = {"n": len(v), "categories": list(categories),
                                "counts": [int((v == c).sum()) for c in categories]}
    return {"version": 1, "n_images": len(values["prob_abnormal"]), "quantities": quantities}


def _bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin: (-inf, e1], (e1, e2], ..., (ek, inf)."""
    return np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)


def psi(reference_counts: np.ndarray, counts: np.ndarray) -> float:
    """Population stability index of two binned samples: sum (p - q) ln(p / q), the symmetrised Kullback-Leibler
    divergence. Half a count is added to every bin, so that an empty bin gives a finite value."""
    p = np.asarray(counts, dtype=np.float64) + 0.5
    q = np.asarray(reference_counts, dtype=np.float64) + 0.5
    return float(entropy(p, q) + entropy(q, p))  # entropy() normalises both to shares


def psi_threshold(n_reference: int, n: int, n_bins: int, alpha: float = ALPHA) -> float:
    """The PSI above which a quantity is flagged: the usual alarm, or, when larger, the PSI that sampling alone
    exceeds with probability `alpha` when both samples come from one distribution. For independent samples of
    sizes n and m over k bins, PSI / (1/n + 1/m) is approximately chi-squared with k - 1 degrees of freedom
    (Yurdakul 2018, "Statistical properties of population stability index")."""
    critical = chi2.ppf(1.0 - alpha, max(n_bins - 1, 1)) * (1.0 / n_reference + 1.0 / n)
    return float(max(PSI_ALARM, critical))


def compare(reference: dict[str, Any], df: pd.DataFrame) -> dict[str, Any]:
    """The run's profile against `reference`: per quantity PSI, its threshold, KS for continuous ones, and the
    shares per bin of both (for the report's figure); `flagged` with its `reasons`, or a `status` saying why the
    run cannot be judged."""
    values = profile_values(df)
    n, n_reference = len(values["prob_abnormal"]), int(reference["n_images"])
    result: dict[str, Any] = {
        "status": "ok", "flagged": False, "reasons": [], "n_images": n, "n_reference": n_reference,
        "thresholds": {"psi_alarm": PSI_ALARM, "alpha": ALPHA, "min_images": MIN_IMAGES},
        "quantities": {},
    }
    if n_reference < MIN_IMAGES:
        result.update(status="reference_too_small", note=f"the model's reference profile holds {n_reference} "
                      f"images, too few to judge against (at least {MIN_IMAGES})")
        return result
    if n < MIN_IMAGES:
        result.update(status="too_few_images", note=f"too few images to judge: {n} scored without error in this "
                      f"run, at least {MIN_IMAGES} needed")
        return result
    for name, ref in reference["quantities"].items():
        if name not in QUANTITIES:
            continue  # a quantity of a newer profile
        v = values[name]
        if len(v) < MIN_VALUES or int(ref["n"]) < MIN_VALUES:
            result["quantities"][name] = {"n": len(v), "note": f"too few values to judge ({len(v)} here, "
                                                               f"{ref['n']} in the reference; at least {MIN_VALUES})"}
            continue
        ref_counts = np.asarray(ref["counts"])
        if "edges" in ref:
            edges = np.asarray(ref["edges"], dtype=np.float64)
            counts, labels = _bin_counts(v, edges), _bin_labels(edges)
        else:
            counts, labels = np.array([int((v == c).sum()) for c in ref["categories"]]), list(ref["categories"])
        entry: dict[str, Any] = {
            "n": len(v), "n_reference": int(ref["n"]), "psi": psi(ref_counts, counts),
            "psi_threshold": psi_threshold(int(ref["n"]), len(v), len(ref_counts)),
            "bins": labels, "reference_share": (ref_counts / ref_counts.sum()).tolist(),
            "share": (counts / counts.sum()).tolist(),
        }
        if "sample" in ref:
            ks = ks_2samp(np.asarray(ref["sample"], dtype=np.float64), v)
            entry.update(ks=float(ks.statistic), ks_pvalue=float(ks.pvalue))
        entry["flagged"] = entry["psi"] > entry["psi_threshold"]
        if entry["flagged"]:
            result["reasons"].append(f"{name} ({QUANTITIES[name]}): PSI {entry['psi']:.3f} > "
                                     f"{entry['psi_threshold']:.3f}")
        result["quantities"][name] = entry
    result["flagged"] = bool(result["reasons"])
    result["status"] = "flagged" if result["flagged"] else "ok"
    return result


def _bin_labels(edges: np.ndarray) -> list[str]:
    if not len(edges):
        return ["all"]
    inner = [f"{a:.3g}-{b:.3g}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return [f"<={edges[0]:.3g}", *inner, f">{edges[-1]:.3g}"]


def history_line(df: pd.DataFrame, drift: dict[str, Any], run_at: datetime) -> dict[str, Any]:
    """One run's line of OUT/history.jsonl: what it scored and its drift (`df`: this run's predictions)."""
    ok = df["prob_abnormal"].notna() & df["error"].isna()
    prob, pred = df.loc[ok, "prob_abnormal"], df.loc[ok, "pred_abnormal"]
    return {
        "run_at": run_at.isoformat(), "images": int(ok.sum()), "failed": int((~ok).sum()),
        "positive_rate": float(pred.mean()) if ok.any() else None,
        "mean_prob_abnormal": float(prob.mean()) if ok.any() else None,
        "drift_status": drift["status"], "drift_flagged": bool(drift["flagged"]),
        "psi": {name: q["psi"] for name, q in drift.get("quantities", {}).items() if "psi" in q},
    }
