"""Post-hoc calibration of slide probabilities, and metrics from aggregate counts.

A MIL model trained on a few dozen slides can rank them perfectly and still give every slide a
tumour probability of 0.85–0.94 (AUC 1.0, balanced accuracy 0.5 at the argmax). Two post-hoc
steps fitted on the *validation* split fix what a pathologist reads without touching the
ranking (Guo et al. 2017):

* **temperature scaling**: slide logits are divided by one T > 0, fitted by minimising the
  validation negative log-likelihood over a fixed log-spaced grid :data:`TEMPERATURES`
  (bounded: 0.05 … 20), refined by a parabola through the best grid point and its neighbours;
* **a decision threshold** (two labels): the cut on the slide's tumour log-odds that maximises
  balanced accuracy (Youden's J) on validation, found on the fixed score grid
  :data:`SCORE_EDGES`; the calibrated tumour probability threshold is sigmoid(cut / T).

Both are computed from *sums* — the validation NLL at every grid temperature and histograms of
log-odds by label — so a federated model is calibrated from what every site sends without a
single per-slide number leaving a hospital, and the site-local baseline uses the very same
code. The same histograms give AUCs pooled over sites: from binned counts the AUC is exact up
to pairs tied within a bin, and :func:`auc_from_histograms` reports that share so a reader
knows the bound (±share/2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import Field

from fedpath.common.configbase import StrictModel

TEMPERATURES: tuple[float, ...] = tuple(
    float(t) for t in np.exp(np.linspace(math.log(0.05), math.log(20.0), 81))
)
"""The grid a temperature is fitted on: 81 log-spaced values from 0.05 to 20 (7.8 % apart)."""
SCORE_EDGES: np.ndarray = np.round(np.linspace(-10.0, 10.0, 201), 6)
"""Bin edges of log-odds histograms (step 0.1); with the two open-ended bins 202 bins."""
N_SCORE_BINS = len(SCORE_EDGES) + 1
PATCH_EDGES: np.ndarray = np.round(np.linspace(-10.0, 10.0, 2001), 6)
"""Bin edges of patch log-odds histograms (step 0.01; 2002 bins). Finer than the slides' grid:
an instance classifier trained on a few annotated slides gives thousands of patches nearly the
same probability, and in 0.1-wide bins their ties made the pooled patch AUC uncertain by
± 2 %; patches are many, so the finer grid says nothing about a single one."""
N_PATCH_BINS = len(PATCH_EDGES) + 1
MIN_PER_CLASS_CALIBRATION = 5
"""Fewest validation slides of every class a calibration is fitted on: with fewer, one slide
moves the threshold across the whole gap and the temperature by a factor of several (the
proportion minimum of :mod:`fedpath.common.intervals`)."""


class SlideCalibration(StrictModel):
    """What is applied to a model's slide logits: a temperature and (two labels) a threshold.

    ``threshold`` is on the *calibrated* positive-class probability; ``None`` means the argmax.
    ``fitted`` is false when the validation split could not support a fit (``reason`` says
    why), and then T = 1 and the threshold is the argmax: the numbers are uncalibrated. A
    fitted calibration may carry a ``reason`` too: a note on what could not be fitted.
    """

    temperature: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    threshold: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    log_odds_cut: float | None = Field(None, allow_inf_nan=False)
    fitted: bool = False
    temperature_at_bound: bool = False
    n_slides: int = Field(0, ge=0)
    """Validation slides it was fitted on."""
    reason: str | None = None

    def describe(self) -> str:
        """One line for a terminal or a report."""
        if not self.fitted:
            return f"uncalibrated (T = 1, argmax): {self.reason}"
        cut = "argmax" if self.threshold is None else f"threshold {self.threshold:.3f}"
        bound = " (at the search bound)" if self.temperature_at_bound else ""
        note = f" ({self.reason})" if self.reason else ""
        return (
            f"temperature T = {self.temperature:.3f}{bound}, {cut}; "
            f"fitted on {self.n_slides} validation slides{note}"
        )


IDENTITY = SlideCalibration(reason="not fitted")


def scaled_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / T)`` in float64, row-wise, overflow-safe."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll_on_grid(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Summed negative log-likelihood of labels ``y`` at every temperature of the grid."""
    z = np.asarray(logits, dtype=np.float64)
    yy = np.asarray(y, dtype=np.int64)
    out = np.zeros(len(TEMPERATURES))
    for i, t in enumerate(TEMPERATURES):
        s = z / t
        m = s.max(axis=1)
        lse = m + np.log(np.exp(s - m[:, None]).sum(axis=1))
        out[i] = float(np.sum(lse - s[np.arange(len(yy)), yy]))
    return out


def fit_temperature(nll_sums: Sequence[float]) -> tuple[float, bool]:
    """``(T, at_bound)`` minimising the summed NLL given on :data:`TEMPERATURES`."""
    f = np.asarray(nll_sums, dtype=np.float64)
    if f.shape != (len(TEMPERATURES),) or not np.all(np.isfinite(f)):
        raise ValueError(f"need {len(TEMPERATURES)} finite NLL sums, got shape {f.shape}")
    k = int(np.argmin(f))
    if k in (0, len(f) - 1):
        return TEMPERATURES[k], True
    x = math.log(TEMPERATURES[k])
    h = math.log(TEMPERATURES[k + 1]) - x
    curvature = f[k - 1] - 2 * f[k] + f[k + 1]
    offset = h * (f[k - 1] - f[k + 1]) / (2 * curvature) if curvature > 0 else 0.0
    return math.exp(x + max(-h, min(h, offset))), False


def log_odds(logits: np.ndarray) -> np.ndarray:
    """Two-class logits → the positive class's log-odds ``z₁ − z₀``."""
    z = np.asarray(logits, dtype=np.float64)
    return z[..., 1] - z[..., 0]


def score_histogram(scores: np.ndarray, edges: np.ndarray = SCORE_EDGES) -> np.ndarray:
    """Counts of ``scores`` in the bins of ``edges`` plus the two open ends."""
    idx = np.searchsorted(edges, np.asarray(scores, dtype=np.float64), side="right")
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.int64)


def _check_hists(
    pos: Sequence[int], neg: Sequence[int], bins: int | None = N_SCORE_BINS
) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pos, dtype=np.float64)
    n = np.asarray(neg, dtype=np.float64)
    if p.ndim != 1 or p.shape != n.shape or (bins is not None and p.shape != (bins,)):
        raise ValueError(
            f"histograms must have {bins or 'the same number of'} bins, got {p.shape}, {n.shape}"
        )
    if np.any(p < 0) or np.any(n < 0):
        raise ValueError("histogram counts must be non-negative")
    return p, n


def auc_from_histograms(pos: Sequence[int], neg: Sequence[int]) -> tuple[float, float]:
    """``(AUC, tie share)`` from counts of positive and negative scores per bin.

    Pairs in one bin count one half, as tied scores do in the Mann–Whitney AUC; the true AUC of
    the unbinned scores lies within ± tie share / 2. NaN when either class is empty. Any grid
    (slide or patch) as long as both histograms share it.
    """
    p, n = _check_hists(pos, neg, None)
    n_pos, n_neg = p.sum(), n.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan, math.nan
    below = np.cumsum(n) - n
    auc = float(np.sum(p * (below + 0.5 * n)) / (n_pos * n_neg))
    return auc, float(np.sum(p * n) / (n_pos * n_neg))


def confusion_at_cut(pos: Sequence[int], neg: Sequence[int], cut: float) -> tuple[int, ...]:
    """``(TP, FN, TN, FP)`` for "positive when log-odds ≥ cut", ``cut`` one of the edges."""
    p, n = _check_hists(pos, neg)
    j = int(np.searchsorted(SCORE_EDGES, cut, side="left"))
    if j >= len(SCORE_EDGES) or not math.isclose(float(SCORE_EDGES[j]), cut, abs_tol=1e-9):
        raise ValueError(f"cut {cut} is not an edge of the score grid")
    first = j + 1  # bins at or above the edge
    tp, fp = int(p[first:].sum()), int(n[first:].sum())
    return tp, int(p.sum()) - tp, int(n.sum()) - fp, fp


def cut_from_histograms(pos: Sequence[int], neg: Sequence[int]) -> float | None:
    """The grid edge maximising balanced accuracy (Youden's J) of "positive when ≥ edge".

    Several edges often tie (every edge in a gap between the classes): of the runs of best
    edges the one nearest log-odds 0 (probability 0.5) is taken, and its middle edge. ``None``
    when a class is missing.
    """
    p, n = _check_hists(pos, neg)
    if p.sum() == 0 or n.sum() == 0:
        return None
    above_pos = p[::-1].cumsum()[::-1]  # above_pos[b] = positives in bins >= b
    below_neg = np.cumsum(n) - n  # negatives in bins < b
    first = np.arange(1, len(SCORE_EDGES) + 1)  # edge e-1 separates bins < e and >= e
    j = above_pos[first] / p.sum() + below_neg[first] / n.sum()
    best = np.flatnonzero(np.isclose(j, j.max(), rtol=0, atol=1e-12))
    runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
    zero = int(np.searchsorted(SCORE_EDGES, 0.0))
    run = min(runs, key=lambda r: min(abs(int(e) - zero) for e in r))
    return float(SCORE_EDGES[int(run[(len(run) - 1) // 2])])


def calibration_from_aggregates(
    nll_sums: Sequence[float],
    pos_hist: Sequence[int] | None,
    neg_hist: Sequence[int] | None,
    class_counts: Sequence[int],
    labels: Sequence[str] | None = None,
) -> SlideCalibration:
    """Fit T and (two labels) the threshold from validation sums; identity if they cannot.

    Every class must occur among the validation slides: with one class the NLL is minimised by
    pushing all probabilities to it, and no threshold separates anything.
    """
    counts = [int(c) for c in class_counts]
    n = sum(counts)
    if n == 0:
        return SlideCalibration(reason="no validation slides")
    if min(counts) < MIN_PER_CLASS_CALIBRATION:
        return SlideCalibration(
            n_slides=n,
            reason=f"{_counts_text(counts, labels)} validation slides; "
            f"need ≥ {MIN_PER_CLASS_CALIBRATION} per class",
        )
    temperature, at_bound = fit_temperature(nll_sums)
    note = None
    if at_bound and temperature < 1.0:
        # Separated at the argmax: the NLL falls for ever as T → 0. Sharpening by the bound
        # would only turn every probability into 0 or 1; keep the model's own scale.
        temperature, at_bound = 1.0, False
        note = (
            "the val slides are separated at the argmax, so the NLL has no minimum: "
            "T stays 1, only the threshold is fitted"
        )
    cut = threshold = None
    if len(counts) == 2 and pos_hist is not None and neg_hist is not None:
        cut = cut_from_histograms(pos_hist, neg_hist)
        if cut is not None:
            threshold = 1.0 / (1.0 + math.exp(-cut / temperature))
    return SlideCalibration(
        temperature=temperature,
        threshold=threshold,
        log_odds_cut=cut,
        fitted=True,
        temperature_at_bound=at_bound,
        n_slides=n,
        reason=note,
    )


def _counts_text(counts: Sequence[int], labels: Sequence[str] | None) -> str:
    names = labels if labels is not None and len(labels) == len(counts) else None
    if names is None:
        return " / ".join(f"{c} class-{i}" for i, c in enumerate(counts))
    return " / ".join(f"{c} {name}" for c, name in zip(counts, names, strict=True))


def fit_calibration(
    logits: np.ndarray, y: np.ndarray, labels: Sequence[str] | None = None
) -> SlideCalibration:
    """Fit on one set of validation slides (site-local): the same sums as a federation."""
    z = np.asarray(logits, dtype=np.float64)
    yy = np.asarray(y, dtype=np.int64)
    if z.ndim != 2 or z.shape[0] != yy.shape[0]:
        raise ValueError(f"logits {z.shape} do not match {yy.shape[0]} labels")
    counts = np.bincount(yy, minlength=z.shape[1]) if yy.size else np.zeros(z.shape[1], int)
    if yy.size == 0:
        return SlideCalibration(reason="no validation slides")
    pos = neg = None
    if z.shape[1] == 2:
        d = log_odds(z)
        pos, neg = score_histogram(d[yy == 1]), score_histogram(d[yy == 0])
    return calibration_from_aggregates(nll_on_grid(z, yy), pos, neg, counts.tolist(), labels)
