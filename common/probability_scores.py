"""How good slide probabilities are, beside how good the decisions made from them are.

The Brier score and the expected calibration error (ECE) judge the probabilities themselves: a
model can rank every slide right and still be over-confident, which is what post-hoc
calibration (:mod:`fedpath.common.calibration`) then fixes. The ECE is built from per-bin sums
(:func:`calibration_bins`), so sites can add theirs up and the server gets the pooled ECE
without any slide's probability.
"""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 10
"""Equal-width probability bins of the expected calibration error (Guo et al. 2017)."""


def brier_score(y: np.ndarray, p: np.ndarray) -> float:
    """Two labels: mean (p₁ − y)² (scikit-learn's ``brier_score_loss``); more: mean Σ_c
    (p_c − [y = c])²."""
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - y) ** 2))
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def calibration_bins(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per ECE bin: slide count, sum of the judged probability, count of events.

    Two labels judge the positive-class probability against the positive label; more labels
    the top-label confidence against "the argmax was right". Sums, so sites can add them up.
    """
    if p.shape[1] == 2:
        conf, hit = p[:, 1], (y == 1)
    else:
        conf, hit = p.max(axis=1), (p.argmax(axis=1) == y)
    idx = np.minimum((conf * ECE_BINS).astype(np.int64), ECE_BINS - 1)
    count = np.bincount(idx, minlength=ECE_BINS)
    prob_sum = np.bincount(idx, weights=conf, minlength=ECE_BINS)
    events = np.bincount(idx, weights=hit.astype(np.float64), minlength=ECE_BINS)
    return count.astype(np.int64), prob_sum, events.astype(np.int64)


def ece_from_bins(count: np.ndarray, prob_sum: np.ndarray, events: np.ndarray) -> float:
    """Σ_b |Σ prob − Σ events| / N: the slide-weighted gap between confidence and frequency."""
    n = float(np.sum(count))
    return float(np.sum(np.abs(prob_sum - events)) / n) if n > 0 else math.nan


def expected_calibration_error(y: np.ndarray, p: np.ndarray) -> float:
    """ECE over :data:`ECE_BINS` equal-width bins (see :func:`calibration_bins`)."""
    return ece_from_bins(*calibration_bins(y, p))
