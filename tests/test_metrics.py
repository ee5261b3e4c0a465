"""Slide and patch metrics against hand-computed values and against scikit-learn directly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

from fedpath.common.intervals import auc_interval, mover_mean_interval, wilson_interval
from fedpath.common.metrics import MetricWithCI, SlideMetrics, slide_metrics
from fedpath.common.patch_metrics import PatchMetrics, patch_metrics, pooled_patch_metrics


def _binary_probs(p1: list[float]) -> np.ndarray:
    p = np.asarray(p1, dtype=np.float64)
    return np.stack([1.0 - p, p], axis=1)


# Fixed 3-class data: rows are softmax-like and sum to 1.
Y3 = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 1, 0])
P3 = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.3, 0.6],
        [0.4, 0.4, 0.2],
        [0.5, 0.3, 0.2],
        [0.2, 0.2, 0.6],
        [0.6, 0.1, 0.3],
        [0.1, 0.8, 0.1],
        [0.3, 0.4, 0.3],
        [0.2, 0.1, 0.7],
        [0.3, 0.6, 0.1],
        [0.2, 0.3, 0.5],
    ]
)


# --------------------------------------------------------------------------- slide level


def test_binary_hand_computed() -> None:
    # Scores 0.1, 0.4 (neg) vs 0.35, 0.8 (pos): 3 of 4 pairs ranked right → AUC 0.75.
    # Argmax predicts [0, 0, 0, 1]: recall 1 and 0.5 → balanced accuracy 0.75;
    # TP=1, FP=0, FN=1 → F1 = 2/3.
    m = slide_metrics(np.array([0, 0, 1, 1]), _binary_probs([0.1, 0.4, 0.35, 0.8]), bootstrap=0)
    assert m.auc.value == pytest.approx(0.75)
    assert m.balanced_accuracy.value == pytest.approx(0.75)
    assert m.f1.value == pytest.approx(2 / 3)
    assert m.n_slides == 4 and m.n_classes == 2 and m.class_counts == (2, 2)
    # No bootstrap → no interval, and it says so.
    assert math.isnan(m.auc.low) and math.isnan(m.auc.high) and m.auc.n_boot == 0


def test_binary_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=40)
    p1 = np.clip(0.35 * y + rng.random(40) * 0.65, 0, 1)
    probs = _binary_probs(p1.tolist()).astype(np.float32)  # float32 softmax rounding is fine
    m = slide_metrics(y, probs, bootstrap=0)
    pred = (p1 > 0.5).astype(int)
    assert m.auc.value == pytest.approx(roc_auc_score(y, p1), abs=1e-6)
    assert m.balanced_accuracy.value == pytest.approx(balanced_accuracy_score(y, pred))
    assert m.f1.value == pytest.approx(f1_score(y, pred))


def test_three_class_matches_sklearn() -> None:
    m = slide_metrics(Y3, P3, bootstrap=0)
    pred = P3.argmax(axis=1)
    assert m.auc.value == pytest.approx(roc_auc_score(Y3, P3, multi_class="ovr", average="macro"))
    assert m.balanced_accuracy.value == pytest.approx(balanced_accuracy_score(Y3, pred))
    assert m.f1.value == pytest.approx(f1_score(Y3, pred, average="macro"))
    assert m.class_counts == (4, 4, 4)


def test_three_class_auc_is_macro_one_vs_rest() -> None:
    # Macro OvR by hand: mean over classes of the binary AUC of "class k" vs the rest.
    per_class = [roc_auc_score((k == Y3).astype(int), P3[:, k]) for k in range(3)]
    m = slide_metrics(Y3, P3, bootstrap=0)
    assert m.auc.value == pytest.approx(sum(per_class) / 3)


@pytest.mark.slow
def test_intervals_contain_the_estimate_and_are_deterministic() -> None:
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, size=60)
    p1 = np.clip(0.3 * y + rng.random(60) * 0.7, 0, 1)
    probs = _binary_probs(p1.tolist())
    a = slide_metrics(y, probs, bootstrap=120, seed=5)
    b = slide_metrics(y, probs, bootstrap=120, seed=5)
    c = slide_metrics(y, probs, bootstrap=120, seed=6)
    for metric in ("auc", "balanced_accuracy", "f1"):
        ma: MetricWithCI = getattr(a, metric)
        assert ma.low <= ma.value <= ma.high
        assert ma.low < ma.high
        assert ma.low >= 0.0 and ma.high <= 1.0
        assert ma == getattr(b, metric)
    # Analytic where a small-sample method exists; F1 alone is bootstrapped.
    assert a.auc.method.startswith("Newcombe") and a.auc.n_boot == 0
    assert a.balanced_accuracy.method == "MOVER-Wilson"
    assert a.f1.method == "bootstrap percentile" and a.f1.n_boot == 120
    assert (a.f1.low, a.f1.high) != (c.f1.low, c.f1.high)
    assert a.auc == c.auc  # no resampling in it


def test_two_test_slides_give_no_interval_but_say_why() -> None:
    """Issue 20.15: `local eval` on 2 slides printed "1.0000 – 1.0000"."""
    m = slide_metrics(
        np.array([0, 1]), _binary_probs([0.2, 0.9]), bootstrap=1000, labels=("normal", "tumour")
    )
    assert m.auc.value == 1.0
    for metric in (m.auc, m.balanced_accuracy, m.f1, *m.recall):
        assert math.isnan(metric.low) and math.isnan(metric.high)
        assert metric.ci_reason is not None
    assert m.auc.interval_text() == "n/a (1 normal / 1 tumour slides; need ≥ 10 per class)"
    assert m.balanced_accuracy.interval_text() == (
        "n/a (1 normal / 1 tumour slides; need ≥ 5 per class)"
    )
    assert m.recall[1].interval_text() == "n/a (1 tumour slides; need ≥ 5 per class)"


def test_the_minimum_is_per_class_not_per_set() -> None:
    """40 slides, but only 9 of one class: the AUC interval is still not estimable."""
    y = np.array([0] * 31 + [1] * 9)
    p1 = np.linspace(0.05, 0.95, 40)
    m = slide_metrics(y, _binary_probs(p1.tolist()), bootstrap=50, labels=("normal", "tumour"))
    assert m.auc.ci_reason == "31 normal / 9 tumour slides; need ≥ 10 per class"
    assert m.balanced_accuracy.has_interval and m.recall[1].has_interval  # 9 >= 5
    y10 = np.array([0] * 30 + [1] * 10)
    assert slide_metrics(y10, _binary_probs(p1.tolist()), bootstrap=50).auc.has_interval


@pytest.mark.slow
def test_a_perfect_auc_on_ten_per_class_has_a_real_lower_bound() -> None:
    """At AUC 1 the bootstrap and the Wald interval collapse to 1 – 1; the score one does not.

    Solved by hand from Newcombe's variance for 10 vs 10: the lower bound is about 0.817.
    """
    y = np.array([0] * 10 + [1] * 10)
    m = slide_metrics(y, _binary_probs([0.1] * 10 + [0.9] * 10), bootstrap=200)
    assert m.auc.value == 1.0 and m.auc.high == pytest.approx(1.0)
    assert m.auc.low == pytest.approx(0.817, abs=0.005)


def test_wilson_and_mover_against_hand_computed_values() -> None:
    # Wilson at 95 %: 3/3 → (0.4385, 1); 10/10 → (0.7225, 1); 5/10 → (0.2366, 0.7634).
    assert wilson_interval(3, 3) == pytest.approx((0.43850, 1.0), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    # MOVER of the mean of two: each side combines the two half-widths in quadrature.
    lo, hi = mover_mean_interval([0.5, 1.0], [(0.23659, 0.76341), (0.72247, 1.0)])
    assert lo == pytest.approx(0.75 - math.hypot(0.26341 / 2, 0.27753 / 2), abs=1e-4)
    assert hi == pytest.approx(0.75 + math.hypot(0.26341 / 2, 0.0), abs=1e-4)


def test_auc_interval_is_close_to_hanley_mcneil_away_from_the_edges() -> None:
    """Mid-range, the score interval and the Wald one with Hanley–McNeil's SE nearly agree."""
    auc, n1, n0 = 0.75, 50, 50
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0)
    lo, hi = auc_interval(auc, n1, n0)
    assert lo == pytest.approx(auc - 1.96 * math.sqrt(var), abs=0.02)
    assert hi == pytest.approx(auc + 1.96 * math.sqrt(var), abs=0.02)
    assert lo < auc < hi


def test_threshold_brier_and_ece() -> None:
    # Issue 20.17: every slide at 0.85-0.94, half of them normal: argmax says "all tumour".
    y = np.array([0, 0, 1, 1])
    probs = _binary_probs([0.85, 0.88, 0.91, 0.94])
    at_argmax = slide_metrics(y, probs, bootstrap=0)
    assert at_argmax.balanced_accuracy.value == 0.5 and at_argmax.auc.value == 1.0
    assert at_argmax.threshold is None
    tuned = slide_metrics(y, probs, bootstrap=0, threshold=0.9)
    assert tuned.balanced_accuracy.value == 1.0 and tuned.threshold == 0.9
    assert tuned.brier == pytest.approx(np.mean([0.85**2, 0.88**2, 0.09**2, 0.06**2]))
    # Bin 0.8-0.9 holds 0.85, 0.88 (no tumour), bin 0.9-1.0 holds 0.91, 0.94 (2 tumours).
    assert tuned.ece == pytest.approx((abs(0.85 + 0.88 - 0) + abs(0.91 + 0.94 - 2)) / 4)
    assert tuned.recall[0].value == 1.0 and tuned.recall[1].value == 1.0


@pytest.mark.slow
def test_wider_ci_level_gives_wider_interval() -> None:
    y = np.tile(Y3, 4)
    p = np.tile(P3, (4, 1))  # 16 slides of each class
    m90 = slide_metrics(y, p, bootstrap=100, seed=1, ci=0.90)
    m99 = slide_metrics(y, p, bootstrap=100, seed=1, ci=0.99)
    for metric in ("auc", "balanced_accuracy"):
        assert getattr(m99, metric).low <= getattr(m90, metric).low
        assert getattr(m99, metric).high >= getattr(m90, metric).high
    assert m90.auc.method == "bootstrap percentile"  # macro one-vs-rest: no analytic interval


@pytest.mark.slow
def test_bootstrap_skips_single_class_resamples_for_auc_only() -> None:
    y = np.array([0] * 10 + [1] * 10 + [2] * 10)
    p = np.tile(P3[:10], (3, 1))
    m = slide_metrics(y, p, bootstrap=200, seed=7)
    # Replay the same resamples: AUC uses exactly those that drew every class.
    rng = np.random.default_rng(7)
    expected = sum(int(np.unique(y[rng.integers(0, 30, size=30)]).size == 3) for _ in range(200))
    assert m.auc.n_boot == expected and m.f1.n_boot == 200


def test_single_class_slides_auc_nan_with_reason() -> None:
    y = np.array([1, 1, 1])
    m = slide_metrics(y, _binary_probs([0.9, 0.3, 0.6]), bootstrap=50)
    assert math.isnan(m.auc.value) and m.auc.n_boot == 0
    assert m.auc.reason is not None and "one class" in m.auc.reason
    assert math.isnan(m.auc.low) and math.isnan(m.auc.high)
    # Predictions [1, 0, 1]: recall of the only true class is 2/3; F1 = 2·2/(2·2+0+1) = 0.8.
    assert m.balanced_accuracy.value == pytest.approx(2 / 3)
    assert m.f1.value == pytest.approx(0.8)
    assert m.balanced_accuracy.reason is None


def test_three_class_missing_class_auc_nan() -> None:
    keep = Y3 != 2
    p = P3[keep]
    m = slide_metrics(Y3[keep], p, bootstrap=20)
    assert math.isnan(m.auc.value)
    assert m.auc.reason is not None and "[2]" in m.auc.reason
    assert not math.isnan(m.balanced_accuracy.value)


@pytest.mark.parametrize(
    ("y", "probs", "match"),
    [
        (np.array([0, 1]), np.array([[0.5, 0.5]]), "labels"),
        (np.array([0, 2]), np.array([[0.5, 0.5], [0.4, 0.6]]), r"\[0, 2\)"),
        (np.array([0, 1]), np.array([[2.0, -1.0], [0.4, 0.6]]), "logits"),
        (np.array([0, 1]), np.array([[0.5, 0.6], [0.4, 0.6]]), "sum to 1"),
        (np.array([0.0, 1.0]), np.array([[0.5, 0.5], [0.4, 0.6]]), "integer"),
        (np.array([], dtype=int), np.zeros((0, 2)), "no slides"),
        (np.array([0, 1]), np.array([[1.0], [1.0]]), "2 class"),
    ],
)
def test_slide_metrics_rejects_malformed_input(
    y: np.ndarray, probs: np.ndarray, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        slide_metrics(y, probs, bootstrap=0)


def test_slide_metrics_json_round_trip() -> None:
    m = slide_metrics(np.array([1, 1, 0]), _binary_probs([0.9, 0.3, 0.6]), bootstrap=30)
    nan_case = slide_metrics(np.array([1, 1]), _binary_probs([0.9, 0.3]), bootstrap=30)
    for metrics in (m, nan_case):
        data = metrics.to_json()
        text = json.dumps(data, allow_nan=False)  # strict JSON: no NaN tokens
        assert json.loads(text) == data
        assert SlideMetrics.from_json(json.loads(text)).to_json() == data
    assert nan_case.to_json()["auc"]["value"] is None
    assert isinstance(m.to_json()["f1"]["value"], float)
    # Same flat keys whether or not a metric is defined.
    assert m.flat("site_a/").keys() == nan_case.flat("site_a/").keys()
    assert math.isnan(nan_case.flat()["auc"])


# --------------------------------------------------------------------------- patch level

LABELS = np.array([1, 1, 0, 0, -1, 1, 0], dtype=np.int8)
PROBS = np.array([0.9, 0.4, 0.6, 0.1, 0.99, 0.7, 0.2])


def test_patch_metrics_hand_computed() -> None:
    # Labelled: pos {0.9, 0.4, 0.7}, neg {0.6, 0.1, 0.2}; the −1 patch (0.99) is excluded.
    # AUC: 3 + 2 + 3 of 9 pairs → 8/9. AP: ranks 1, 2, 4 hold positives → (1 + 1 + 3/4)/3.
    # Dice at 0.5: P = {0.9, 0.6, 0.7}, T = {0.9, 0.4, 0.7}, |P∩T| = 2 → 4/6.
    m = patch_metrics(LABELS, PROBS)
    assert m.auc == pytest.approx(8 / 9)
    assert m.average_precision == pytest.approx(2.75 / 3)
    assert m.dice == pytest.approx(2 / 3)
    assert (m.n_labelled, m.n_tumour, m.n_slides, m.reason) == (6, 3, 1, None)


def test_patch_metrics_match_sklearn() -> None:
    keep = LABELS != -1
    m = patch_metrics(LABELS, PROBS)
    assert m.auc == pytest.approx(roc_auc_score(LABELS[keep], PROBS[keep]))
    assert m.average_precision == pytest.approx(average_precision_score(LABELS[keep], PROBS[keep]))


def test_dice_threshold_is_inclusive() -> None:
    m = patch_metrics(np.array([1, 0], dtype=np.int8), np.array([0.5, 0.49]))
    assert m.dice == pytest.approx(1.0)
    m = patch_metrics(np.array([1, 0], dtype=np.int8), np.array([0.5, 0.49]), threshold=0.6)
    assert m.dice == pytest.approx(0.0)


def test_patch_all_tumour_auc_ap_nan_dice_defined() -> None:
    m = patch_metrics(np.array([1, 1, 1, -1], dtype=np.int8), np.array([0.9, 0.2, 0.7, 0.1]))
    assert math.isnan(m.auc) and math.isnan(m.average_precision)
    assert m.dice == pytest.approx(2 * 2 / (2 + 3))
    assert m.reason is not None and "only tumour" in m.reason


def test_patch_all_normal_none_predicted_everything_nan() -> None:
    m = patch_metrics(np.array([0, 0], dtype=np.int8), np.array([0.1, 0.3]))
    assert math.isnan(m.auc) and math.isnan(m.average_precision) and math.isnan(m.dice)
    assert m.reason is not None and "only normal" in m.reason and "Dice" in m.reason
    # A false positive makes Dice defined (and zero).
    m = patch_metrics(np.array([0, 0], dtype=np.int8), np.array([0.1, 0.8]))
    assert m.dice == 0.0


@pytest.mark.parametrize(
    "labels",
    [np.array([-1, -1], dtype=np.int8), np.array([], dtype=np.int8)],
)
def test_patch_no_labelled_patches(labels: np.ndarray) -> None:
    m = patch_metrics(labels, np.full(labels.shape, 0.7))
    assert math.isnan(m.auc) and math.isnan(m.average_precision) and math.isnan(m.dice)
    assert m.reason == "no labelled patches"
    assert m.n_labelled == 0


def test_patch_metrics_rejects_malformed_input() -> None:
    with pytest.raises(ValueError, match="1, 0 or -1"):
        patch_metrics(np.array([2, 0], dtype=np.int8), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="probabilities"):
        patch_metrics(np.array([1, 0], dtype=np.int8), np.array([0.1]))
    with pytest.raises(ValueError, match="NaN"):
        patch_metrics(np.array([1, 0], dtype=np.int8), np.array([0.1, np.nan]))


def test_pooled_patch_metrics() -> None:
    # Each slide alone is single-class (AUC undefined); pooled they rank 4 of 4 pairs right.
    slide_a = (np.array([1, 1, -1], dtype=np.int8), np.array([0.8, 0.6, 0.0]))
    slide_b = (np.array([0, 0], dtype=np.int8), np.array([0.3, 0.55]))
    assert math.isnan(patch_metrics(*slide_a).auc)
    m = pooled_patch_metrics([slide_a, slide_b])
    assert m.auc == pytest.approx(1.0)
    y = np.array([1, 1, 0, 0])
    p = np.array([0.8, 0.6, 0.3, 0.55])
    assert m.average_precision == pytest.approx(average_precision_score(y, p))
    # P = {0.8, 0.6, 0.55}, T = {0.8, 0.6}: Dice = 2·2/(3+2) = 0.8.
    assert m.dice == pytest.approx(0.8)
    assert (m.n_labelled, m.n_tumour, m.n_slides) == (4, 2, 2)
    # A generator works too, and an empty list is "no labelled patches", not an error.
    assert pooled_patch_metrics(s for s in [slide_a, slide_b]) == m
    empty = pooled_patch_metrics([])
    assert math.isnan(empty.auc) and empty.n_slides == 0 and empty.reason == "no labelled patches"


def test_patch_metrics_json_round_trip() -> None:
    for m in (patch_metrics(LABELS, PROBS), pooled_patch_metrics([])):
        data = m.to_json()
        text = json.dumps(data, allow_nan=False)
        assert json.loads(text) == data
        assert PatchMetrics.from_json(json.loads(text)).to_json() == data
    assert pooled_patch_metrics([]).to_json()["dice"] is None
    assert patch_metrics(LABELS, PROBS).flat().keys() == pooled_patch_metrics([]).flat().keys()
