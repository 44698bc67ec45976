"""Metric functions on small cases whose expected numbers are worked out by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from mura_ray import metrics
from mura_ray.metrics import (
    aggregate_studies,
    choose_threshold,
    compute_binary_metrics,
    compute_body_part_metrics,
)

# Six images at threshold 0.5: predictions [0, 0, 1, 0, 1, 0] -> tn=3, fp=1, fn=1, tp=1.
Y6 = [0, 0, 0, 0, 1, 1]
P6 = [0.1, 0.2, 0.7, 0.3, 0.6, 0.4]


@pytest.mark.filterwarnings("error")
def test_binary_metrics_six_images_by_hand():
    m = compute_binary_metrics(Y6, P6, 0.5)
    assert m["confusion_matrix"] == [[3, 1], [1, 1]]
    assert m["n"] == 6 and m["n_abnormal"] == 2
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Observed agreement 4/6; chance agreement (4/6)^2 + (2/6)^2 = 5/9; kappa = (2/3 - 5/9) / (1 - 5/9) = 1/4.
    assert m["cohen_kappa"] == pytest.approx(0.25)
    # Positive 0.6 and 0.4 each beat negatives 0.1, 0.2, 0.3 but not 0.7: 6 of 8 pairs.
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["per_class"]["0"] == pytest.approx({"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4})
    assert m["per_class"]["1"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["macro_avg"] == pytest.approx({"precision": 0.625, "recall": 0.625, "f1": 0.625})
    assert m["weighted_avg"]["precision"] == pytest.approx((4 * 0.75 + 2 * 0.5) / 6)
    assert m["sensitivity"] == pytest.approx(0.5) and m["specificity"] == pytest.approx(0.75)
    # Brier: mean squared error of the probabilities against the labels.
    assert m["brier_score"] == pytest.approx((0.01 + 0.04 + 0.49 + 0.09 + 0.16 + 0.36) / 6)
    assert m["notes"] == {}
    assert "roc_auc_ci95" not in m


def test_threshold_is_inclusive():
    # prob == threshold counts as abnormal.
    m = compute_binary_metrics([0, 1], [0.2, 0.5], 0.5)
    assert m["confusion_matrix"] == [[1, 0], [0, 1]]


@pytest.mark.filterwarnings("error")
def test_undefined_metrics_are_null_with_reason():
    m = compute_binary_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)
    assert m["roc_auc"] is None and "one class" in m["notes"]["roc_auc"]
    assert m["cohen_kappa"] is None and "cohen_kappa" in m["notes"]
    assert m["average_precision"] is None and "average_precision" in m["notes"]
    assert m["per_class"]["1"]["precision"] is None and m["per_class"]["1"]["recall"] is None
    assert m["per_class"]["1"]["support"] == 0
    assert m["accuracy"] == 1.0
    # Bootstrap on one class: no usable resample, so no CI, still no crash or warning.
    m = compute_binary_metrics([1, 1], [0.7, 0.8], 0.5, bootstrap=10)
    assert m["roc_auc_ci95"] is None and "roc_auc_ci95" in m["notes"]


@pytest.mark.filterwarnings("error")
def test_kappa_defined_when_predictions_are_one_class_but_labels_are_not():
    m = compute_binary_metrics([0, 1], [0.1, 0.2], 0.5)
    assert m["cohen_kappa"] == pytest.approx(0.0)
    assert m["per_class"]["1"]["precision"] is None and "per_class.1.precision" in m["notes"]


@pytest.mark.filterwarnings("error")
def test_averages_count_undefined_values_as_zero_like_classification_report():
    # y = [0, 0, 1, 1], everything predicted normal. Class 0: precision 2/4, recall 2/2, F1 2/3. Class 1: nothing
    # predicted, so its precision is undefined (null, with a note); recall 0/2 and F1 0.
    # classification_report counts the undefined precision as 0: macro precision (0.5 + 0) / 2 = 0.25 (not 0.5,
    # the mean of the defined values only), recall (1 + 0) / 2, F1 (2/3 + 0) / 2; equal supports, so weighted = macro.
    m = compute_binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 0.5)
    assert m["per_class"]["1"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["macro_avg"] == pytest.approx({"precision": 0.25, "recall": 0.5, "f1": 1 / 3})
    assert m["weighted_avg"] == pytest.approx({"precision": 0.25, "recall": 0.5, "f1": 1 / 3})
    assert "precision of class 1 counted as 0" in m["notes"]["macro_avg"]
    assert "precision of class 1 counted as 0" in m["notes"]["weighted_avg"]
    # A class without examples or predictions: macro averages count its undefined values as 0; it has no weight in
    # the weighted average, which therefore gets no note.
    m = compute_binary_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)
    assert m["macro_avg"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    assert m["weighted_avg"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0})
    assert "macro_avg" in m["notes"] and "weighted_avg" not in m["notes"]


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 3000)
    p = np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1)
    a = compute_binary_metrics(y, p, 0.5, bootstrap=100, seed=3)
    b = compute_binary_metrics(y, p, 0.5, bootstrap=100, seed=3)
    assert a["roc_auc_ci95"] == b["roc_auc_ci95"] and a["cohen_kappa_ci95"] == b["cohen_kappa_ci95"]
    lo, hi = a["roc_auc_ci95"]
    assert lo < a["roc_auc"] < hi and hi - lo < 0.1
    lo, hi = a["cohen_kappa_ci95"]
    assert lo < a["cohen_kappa"] < hi
    assert a["bootstrap"]["n_resamples"] == 100


def test_bootstrap_with_binned_scores_stays_close(monkeypatch):
    # More distinct scores than bins: AUC is bootstrapped on equal-count bins, off by at most 1/bins.
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 5000)
    p = rng.random(5000) * 0.5 + 0.3 * y
    exact = compute_binary_metrics(y, p, 0.5, bootstrap=100, seed=0)["roc_auc_ci95"]
    monkeypatch.setattr(metrics, "AUC_BOOTSTRAP_BINS", 1000)
    binned = compute_binary_metrics(y, p, 0.5, bootstrap=100, seed=0)["roc_auc_ci95"]
    assert binned == pytest.approx(exact, abs=2e-3)


def test_aggregate_studies_mean_probability_and_max_label():
    studies = aggregate_studies(
        ["A", "A", "A", "B", "B", "C"],
        [0.9, 0.2, 0.3, 0.6, 0.8, 0.1],
        [1, 1, 1, 0, 1, 0],
    )
    assert list(studies.index) == ["A", "B", "C"]
    # Study A has one confident abnormal image, but its mean 0.4667 falls below 0.5: the study is called normal.
    assert studies.loc["A", "prob_abnormal"] == pytest.approx(1.4 / 3)
    assert studies.loc["B", "prob_abnormal"] == pytest.approx(0.7)
    assert studies["label"].tolist() == [1, 1, 0]  # B's images disagree: the study is abnormal
    assert studies["n_images"].tolist() == [3, 2, 1]
    m = compute_binary_metrics(studies["label"], studies["prob_abnormal"], 0.5)
    assert m["confusion_matrix"] == [[1, 0], [1, 1]]


@pytest.mark.filterwarnings("error")
def test_body_part_metrics_by_hand():
    y = ["ELBOW", "ELBOW", "HAND", "HAND", "WRIST"]
    pred = ["ELBOW", "HAND", "HAND", "HAND", "ELBOW"]
    m = compute_body_part_metrics(y, pred)
    assert list(m["per_class"]) == ["ELBOW", "HAND", "WRIST"]  # BODY_PARTS order, only parts seen
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["per_class"]["ELBOW"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["HAND"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    # WRIST is never predicted: precision undefined, recall and F1 are 0.
    assert m["per_class"]["WRIST"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 1}
    assert "per_class.WRIST.precision" in m["notes"]
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # WRIST's undefined precision counts as 0 in the averages (classification_report), weighted by support 2, 2, 1.
    assert m["macro_avg"]["precision"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert m["weighted_avg"]["precision"] == pytest.approx((2 * 0.5 + 2 * 2 / 3 + 0.0) / 5)
    assert "WRIST" in m["notes"]["macro_avg"]
    assert m["confusion_matrix"] == {
        "labels": ["ELBOW", "HAND", "WRIST"],
        "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 0]],
    }


def test_body_part_metrics_reject_unknown_names():
    with pytest.raises(ValueError, match="KNEE"):
        compute_body_part_metrics(["ELBOW", "KNEE"], ["ELBOW", "ELBOW"])


# Negatives 0.1, 0.55, 0.6; positives 0.5, 0.7, 0.9. Youden's J by threshold:
# 0.9: 1/3 - 0; 0.7: 2/3 - 0 (best); 0.6: 2/3 - 1/3; 0.55: 2/3 - 2/3; 0.5: 1 - 2/3; 0.1: 1 - 1.
YV = [0, 0, 0, 1, 1, 1]
PV = [0.1, 0.55, 0.6, 0.5, 0.7, 0.9]


def test_choose_threshold_youden():
    assert choose_threshold(YV, PV, "youden") == pytest.approx(0.7)


def test_choose_threshold_sensitivity():
    # Sensitivity 0.9 is first reached at 0.5 (all three positives); 0.6 is already met at 0.7.
    assert choose_threshold(YV, PV, "sensitivity", target_sensitivity=0.9) == pytest.approx(0.5)
    assert choose_threshold(YV, PV, "sensitivity", target_sensitivity=0.6) == pytest.approx(0.7)
    assert choose_threshold(YV, PV, "sensitivity", target_sensitivity=1.0) == pytest.approx(0.5)


def test_choose_threshold_errors():
    with pytest.raises(ValueError, match="only one class"):
        choose_threshold([1, 1], [0.2, 0.9])
    with pytest.raises(ValueError, match="youden"):
        choose_threshold(YV, PV, "f1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target_sensitivity"):
        choose_threshold(YV, PV, "sensitivity", target_sensitivity=0.0)
