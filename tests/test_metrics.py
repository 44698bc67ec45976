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


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap by study (cluster) and its bookkeeping


def _naive_study_bootstrap(y, p, threshold, studies, n_resamples, seed):
    """The textbook study bootstrap: draw as many studies as there are, with replacement, and compute the metrics
    on all images of the drawn studies (one-class resamples skipped for AUC, undefined kappa skipped)."""
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    rng = np.random.default_rng(seed)
    pred = (p >= threshold).astype(int)
    rows = [np.flatnonzero(studies == s) for s in np.unique(studies)]
    aucs, kappas = [], []
    for _ in range(n_resamples):
        idx = np.concatenate([rows[i] for i in rng.integers(0, len(rows), len(rows))])
        yy, pp, dd = y[idx], p[idx], pred[idx]
        if 0 < yy.sum() < yy.size:
            aucs.append(roc_auc_score(yy, pp))
        if not (np.unique(yy).size == 1 and (yy == dd).all()):
            kappas.append(cohen_kappa_score(yy, dd))
    return {"roc_auc_ci95": np.percentile(aucs, [2.5, 97.5]), "cohen_kappa_ci95": np.percentile(kappas, [2.5, 97.5])}


def test_image_level_bootstrap_by_study_matches_a_naive_study_bootstrap():
    # 24 studies of 3-6 images each; images of a study are strongly correlated (a shared study effect).
    rng = np.random.default_rng(7)
    sizes = rng.integers(3, 7, 24)
    studies = np.repeat(np.arange(24), sizes)
    y = (studies % 2).astype(int)
    logit = 0.8 * (2 * y - 1) + np.repeat(rng.normal(0, 1.2, 24), sizes) + rng.normal(0, 0.1, studies.size)
    p = np.round(1 / (1 + np.exp(-logit)), 3)
    by_study = metrics.bootstrap_ci(y, p, (p >= 0.5).astype(int), n_resamples=600, seed=0,
                                    groups=[f"S{s}" for s in studies])
    naive = _naive_study_bootstrap(y, p, 0.5, studies, 600, seed=100)
    by_image = metrics.bootstrap_ci(y, p, (p >= 0.5).astype(int), n_resamples=600, seed=0)
    assert by_study["n_units"] == 24 and by_image["n_units"] == studies.size
    for key in ("roc_auc_ci95", "cohen_kappa_ci95"):
        lo, hi = naive[key]
        width = hi - lo
        # The same resampling scheme: the same interval, up to Monte Carlo error (a fraction of its width).
        assert by_study[key] == pytest.approx([lo, hi], abs=0.2 * width), key
        assert 0.8 * width < by_study[key][1] - by_study[key][0] < 1.25 * width, key
        # Resampling images one by one ignores the correlation: an interval about half as wide (the power of the
        # check above).
        assert by_image[key][1] - by_image[key][0] < 0.7 * width, key


def test_image_level_bootstrap_of_duplicated_images_equals_the_study_level_one():
    # Every study is 3 copies of one image: at image level, drawing studies (each with its 3 copies) is the study
    # bootstrap exactly, so the image-level CIs equal the study-level ones. Drawing images one by one would make
    # them narrower.
    rng = np.random.default_rng(3)
    study_p = rng.random(40)
    study_y = (rng.random(40) < 0.2 + 0.6 * study_p).astype(int)
    image_p, image_y = np.repeat(study_p, 3), np.repeat(study_y, 3)
    study_of_image = np.repeat([f"study{k}" for k in range(40)], 3)
    images = compute_binary_metrics(image_y, image_p, 0.5, bootstrap=200, seed=5, groups=study_of_image,
                                    unit="study")
    studies = compute_binary_metrics(study_y, study_p, 0.5, bootstrap=200, seed=5, unit="study")
    for key in ("roc_auc_ci95", "cohen_kappa_ci95"):
        assert images[key] == pytest.approx(studies[key], rel=1e-9, abs=1e-12), key
    assert images["bootstrap"] == studies["bootstrap"]
    assert images["bootstrap"]["unit"] == "study" and images["bootstrap"]["n_units"] == 40
    rows = compute_binary_metrics(image_y, image_p, 0.5, bootstrap=200, seed=5)
    assert rows["bootstrap"]["unit"] == "row" and rows["bootstrap"]["n_units"] == 120
    width = studies["roc_auc_ci95"][1] - studies["roc_auc_ci95"][0]
    assert rows["roc_auc_ci95"][1] - rows["roc_auc_ci95"][0] < 0.8 * width


def test_bootstrap_resamples_equal_scikit_learn_on_the_same_draws():
    # Each resample's AUC (a weighted sum over runs of tied scores) and kappa are scikit-learn's on the rows drawn.
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    rng = np.random.default_rng(4)
    studies = np.repeat(np.arange(30), rng.integers(1, 4, 30))
    y = (studies % 3 == 0).astype(int)
    p = np.round(rng.random(studies.size) * 0.6 + 0.3 * y, 1)  # coarse: many tied scores
    pred = (p >= 0.5).astype(int)
    got = metrics.bootstrap_ci(y, p, pred, n_resamples=100, seed=0, groups=studies)
    draws, aucs, kappas = np.random.default_rng(0), [], []
    for _ in range(100):
        weight = np.bincount(draws.integers(0, 30, 30), minlength=30)[studies]
        if len(np.unique(y[weight > 0])) == 2:
            aucs.append(roc_auc_score(y, p, sample_weight=weight))
        kappas.append(cohen_kappa_score(y, pred, sample_weight=weight))
    assert got["roc_auc_ci95"] == pytest.approx(list(np.percentile(aucs, [2.5, 97.5])), rel=1e-12)
    assert got["cohen_kappa_ci95"] == pytest.approx(list(np.percentile(kappas, [2.5, 97.5])), rel=1e-12)
    assert got["n_resamples_used"] == {"roc_auc": len(aucs), "cohen_kappa": 100}


def test_bootstrap_by_study_is_seeded():
    y, p = np.array(Y6 * 5), np.array(P6 * 5)
    studies = np.repeat(np.arange(10), 3)
    a = compute_binary_metrics(y, p, 0.5, bootstrap=50, seed=1, groups=studies)
    b = compute_binary_metrics(y, p, 0.5, bootstrap=50, seed=1, groups=studies)
    c = compute_binary_metrics(y, p, 0.5, bootstrap=50, seed=2, groups=studies)
    assert (a["roc_auc_ci95"], a["cohen_kappa_ci95"]) == (b["roc_auc_ci95"], b["cohen_kappa_ci95"])
    assert (a["roc_auc_ci95"], a["cohen_kappa_ci95"]) != (c["roc_auc_ci95"], c["cohen_kappa_ci95"])


def test_bootstrap_groups_must_be_complete():
    with pytest.raises(ValueError, match="missing ids"):
        metrics.bootstrap_ci(np.array(Y6), np.array(P6), np.zeros(6), n_resamples=5, groups=["a", None] * 3)


@pytest.mark.filterwarnings("error")
def test_bootstrap_counts_the_resamples_each_metric_used():
    # One abnormal image in six: a resample misses it with probability (5/6)^6 = 33%, and then has no AUC. Kappa
    # is still defined there while some drawn normal image is called abnormal (0.6 and 0.7 are >= 0.5): it is 0.
    # Only resamples of the three images called normal (0.1, 0.2, 0.3) alone have neither ((3/6)^6 = 1.6%).
    y = [0, 0, 0, 0, 0, 1]
    p = [0.1, 0.2, 0.6, 0.7, 0.3, 0.9]
    m = compute_binary_metrics(y, p, 0.5, bootstrap=1000, seed=0)
    used = m["bootstrap"]["n_resamples_used"]
    assert 600 < used["roc_auc"] < 740  # ~665 expected
    assert used["roc_auc"] < used["cohen_kappa"] < 1000
    assert used["cohen_kappa"] > 960  # ~984 expected
    assert m["notes"]["roc_auc_ci95"].startswith(f"from {used['roc_auc']} of 1000 bootstrap resamples")
    assert f"from {used['cohen_kappa']} of 1000" in m["notes"]["cohen_kappa_ci95"]
    # Kappa's interval includes the one-class resamples, where kappa is 0.
    assert m["cohen_kappa_ci95"][0] <= 0.0
    # With every resample usable, no note.
    m = compute_binary_metrics(Y6 * 50, P6 * 50, 0.5, bootstrap=20, seed=0)
    assert m["bootstrap"]["n_resamples_used"] == {"roc_auc": 20, "cohen_kappa": 20}
    assert "roc_auc_ci95" not in m["notes"] and "cohen_kappa_ci95" not in m["notes"]


def test_aggregate_studies_flags_mixed_labels_and_refuses_missing_ids():
    studies = aggregate_studies(["A", "A", "B", "B", "C"], [0.9, 0.2, 0.6, 0.8, 0.1], [1, 0, 1, 1, 0])
    assert studies["mixed_labels"].tolist() == [True, False, False]
    assert studies["label"].tolist() == [1, 1, 0]
    for missing in (None, ""):
        with pytest.raises(ValueError, match="1 rows have no study id"):
            aggregate_studies(["A", missing], [0.1, 0.2], [0, 1])


def test_the_kappa_operating_point_maximises_cohens_kappa():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(1)
    for _ in range(10):
        y = rng.integers(0, 2, 200)
        p = np.round(rng.random(200) * 0.7 + 0.3 * y, 2)  # ties
        best = max(cohen_kappa_score(y, (p >= t).astype(int)) for t in np.unique(p))
        assert cohen_kappa_score(y, (p >= metrics.choose_threshold(y, p, "kappa")).astype(int)) == pytest.approx(best)
