"""Metrics over all sites' slides and patches at once, from the counts each site sends.

A weighted mean of site AUCs is not the AUC over all test slides: it ignores how slides of one
site rank against another's, and a site with one class has no AUC to contribute. Each evaluate
reply carries histograms of tumour log-odds by label, class and confusion counts and
calibration-error bins (``fedpath.common.federation.COUNT_LISTS``/``SUM_LISTS``); summed over sites
they are exactly what the pooled metrics need:

* slide and patch AUC from the summed histograms (exact up to pairs tied within a log-odds
  bin, 0.1 wide for slides, 0.01 for patches; the share of such pairs is reported, the true
  value lies within ± share/2);
* balanced accuracy, sensitivity, specificity and F1 from the summed confusion counts;
* ECE from the summed bins; loss and Brier score are means over slides, so the slide-weighted
  mean of the sites' means *is* the pooled value;
* intervals under the rules of :mod:`fedpath.common.intervals` (per-class minimum,
  small-sample methods).

The weighted mean of the sites' AUCs is kept too, under a name that says so
(``auc_site_mean``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedpath.common.calibration import (
    N_PATCH_BINS,
    N_SCORE_BINS,
    TEMPERATURES,
    SlideCalibration,
    auc_from_histograms,
    calibration_from_aggregates,
    confusion_at_cut,
)
from fedpath.common.federation import ECE_BINS
from fedpath.common.intervals import (
    MIN_PER_CLASS_AUC,
    MIN_PER_CLASS_PROPORTION,
    auc_interval,
    mover_mean_interval,
    too_few_text,
    wilson_interval,
)
from fedpath.common.probability_scores import ece_from_bins

__all__ = ["PooledCounts"]

POOLING = (
    "pooled over every slide (patch) of every site from the sites' counts: AUCs from summed "
    "log-odds histograms (exact within ± tie share / 2), accuracy and F1 from summed confusion "
    "counts, ECE from summed bins, loss and Brier as slide-weighted means of the sites' means "
    "(which equal the pooled ones); *_site_mean is the slide-weighted mean of site values"
)


def _json(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass
class PooledCounts:
    """The sum of the sites' evaluate replies of one split."""

    n_labels: int
    slide_pos: np.ndarray = field(default_factory=lambda: np.zeros(N_SCORE_BINS, np.int64))
    slide_neg: np.ndarray = field(default_factory=lambda: np.zeros(N_SCORE_BINS, np.int64))
    patch_tumour: np.ndarray = field(default_factory=lambda: np.zeros(N_PATCH_BINS, np.int64))
    patch_normal: np.ndarray = field(default_factory=lambda: np.zeros(N_PATCH_BINS, np.int64))
    nll_grid: np.ndarray = field(default_factory=lambda: np.zeros(len(TEMPERATURES)))
    ece_count: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS, np.int64))
    ece_events: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS, np.int64))
    ece_prob_sum: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS))
    class_counts: np.ndarray = field(init=False)
    confusion: np.ndarray = field(init=False)
    weighted: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Metric → (Σ n·value, Σ n) over sites where the value is defined."""
    sites: int = 0

    def __post_init__(self) -> None:
        self.class_counts = np.zeros(self.n_labels, np.int64)
        self.confusion = np.zeros((self.n_labels, self.n_labels), np.int64)

    def add(self, metrics: Mapping[str, Any]) -> None:
        """Add one site's checked reply (``check_reply_metrics`` output, hyphenated keys)."""
        n = float(metrics.get("num-examples", 0.0))
        if n <= 0:
            return
        self.sites += 1
        for key, attr in (
            ("slide-hist-pos", "slide_pos"),
            ("slide-hist-neg", "slide_neg"),
            ("patch-hist-tumour", "patch_tumour"),
            ("patch-hist-normal", "patch_normal"),
            ("nll-grid", "nll_grid"),
            ("ece-count", "ece_count"),
            ("ece-events", "ece_events"),
            ("ece-prob-sum", "ece_prob_sum"),
            ("class-counts", "class_counts"),
        ):
            total = getattr(self, attr)
            total += np.asarray(metrics[key], dtype=total.dtype)
        self.confusion += np.asarray(metrics["confusion"], np.int64).reshape(self.confusion.shape)
        for key in ("loss", "auc", "brier", "brier-raw", "patch-auc"):
            value = float(metrics.get(key, math.nan))
            if math.isfinite(value):
                s, w = self.weighted.get(key, (0.0, 0.0))
                self.weighted[key] = (s + n * value, w + n)

    def _mean(self, key: str) -> float:
        s, w = self.weighted.get(key, (0.0, 0.0))
        return s / w if w > 0 else math.nan

    def calibration(self, labels: Sequence[str]) -> SlideCalibration:
        """Temperature and threshold of the federated model from these validation sums."""
        binary = self.n_labels == 2
        return calibration_from_aggregates(
            self.nll_grid,
            self.slide_pos if binary else None,
            self.slide_neg if binary else None,
            self.class_counts.tolist(),
            labels,
        )

    def slide_auc(self) -> tuple[float, float]:
        """(pooled slide AUC, tie share); NaN with more than two labels."""
        if self.n_labels != 2:
            return math.nan, math.nan
        return auc_from_histograms(self.slide_pos, self.slide_neg)

    def patch_auc(self) -> tuple[float, float]:
        return auc_from_histograms(self.patch_tumour, self.patch_normal)

    def metrics(self, labels: Sequence[str], ci: float = 0.95) -> dict[str, Any]:
        """``final.json``'s ``global_test``: flat, JSON-ready (NaN → ``None``)."""
        counts = [int(c) for c in self.class_counts]
        n = sum(counts)
        every = list(range(self.n_labels))
        out: dict[str, Any] = {"num_examples": n, "pooling": POOLING}
        out["loss"] = _json(self._mean("loss"))

        auc, ties = self.slide_auc()
        out["auc"], out["auc_tie_share"] = _json(auc), _json(ties)
        few = too_few_text(counts, MIN_PER_CLASS_AUC, labels, every)
        low = high = math.nan
        if not math.isfinite(auc):
            why = (
                "pooled AUC from histograms needs two labels"
                if self.n_labels != 2
                else "a class has no slide"
            )
            out["auc_ci"] = f"n/a ({why})"
        elif few is not None:
            out["auc_ci"] = f"n/a ({few})"
        else:
            low, high = auc_interval(auc, counts[1], counts[0], ci)
            out["auc_ci"] = "Newcombe score (Hanley–McNeil)"
        out["auc_low"], out["auc_high"] = _json(low), _json(high)
        out["auc_site_mean"] = _json(self._mean("auc"))

        patch_auc, patch_ties = self.patch_auc()
        out["patch_auc"], out["patch_auc_tie_share"] = _json(patch_auc), _json(patch_ties)
        out["patch_n_labelled"] = int(self.patch_tumour.sum() + self.patch_normal.sum())
        out["patch_auc_site_mean"] = _json(self._mean("patch-auc"))

        out.update(self._accuracy(counts, labels, ci))
        out["brier"] = _json(self._mean("brier"))
        out["ece"] = _json(ece_from_bins(self.ece_count, self.ece_prob_sum, self.ece_events))
        out["brier_raw"] = _json(self._mean("brier-raw"))
        if self.n_labels == 2 and n > 0:
            tp, fn, tn, fp = confusion_at_cut(self.slide_pos, self.slide_neg, 0.0)
            recalls = [
                tn / (tn + fp) if tn + fp else math.nan,
                tp / (tp + fn) if tp + fn else math.nan,
            ]
            finite = [r for r in recalls if math.isfinite(r)]
            out["balanced_accuracy_raw"] = _json(sum(finite) / len(finite)) if finite else None
        return out

    def _accuracy(self, counts: list[int], labels: Sequence[str], ci: float) -> dict[str, Any]:
        """Balanced accuracy (MOVER-Wilson interval), per-class recall and F1 from confusion."""
        out: dict[str, Any] = {}
        hits = np.diag(self.confusion)
        present = [c for c in range(self.n_labels) if counts[c] > 0]
        recalls = [hits[c] / counts[c] for c in present]
        bacc = sum(recalls) / len(recalls) if recalls else math.nan
        out["balanced_accuracy"] = _json(bacc)
        few = too_few_text(counts, MIN_PER_CLASS_PROPORTION, labels, list(range(self.n_labels)))
        low = high = math.nan
        if not recalls:
            out["balanced_accuracy_ci"] = "n/a (no slides)"
        elif few is not None:
            out["balanced_accuracy_ci"] = f"n/a ({few})"
        else:
            intervals = [wilson_interval(int(hits[c]), counts[c], ci) for c in present]
            low, high = mover_mean_interval(recalls, intervals)
            out["balanced_accuracy_ci"] = "MOVER-Wilson"
        out["balanced_accuracy_low"], out["balanced_accuracy_high"] = _json(low), _json(high)
        if self.n_labels == 2:
            out["sensitivity"] = _json(hits[1] / counts[1] if counts[1] else math.nan)
            out["specificity"] = _json(hits[0] / counts[0] if counts[0] else math.nan)
        predicted = self.confusion.sum(axis=0)
        f1s = []
        for c in range(self.n_labels) if self.n_labels > 2 else [1]:
            denom = counts[c] + int(predicted[c])
            f1s.append(2 * int(hits[c]) / denom if denom else 0.0)
        out["f1"] = _json(sum(f1s) / len(f1s)) if sum(counts) else None
        return out
