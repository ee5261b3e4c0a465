"""Slide- and patch-level evaluation metrics (DESIGN §4.7), shared by sites and the server.

Sites evaluate locally and the server aggregates, so both must compute *the same* numbers from
the same inputs: the metric definitions live here once, and the arithmetic is scikit-learn's so
that results match what anyone reproducing them with sklearn would get.

Slide level: ROC AUC (binary: on the positive-class probability; more classes: macro
one-vs-rest), balanced accuracy, each class's recall (binary: specificity, sensitivity) and F1
(binary: of the positive class; more classes: macro) at the argmax prediction or, for two
labels, at a decision threshold on the positive-class probability; Brier score and expected
calibration error (ECE) of the probabilities. Site test sets are small, so a point estimate
without its uncertainty invites over-reading a difference between sites or methods; and an
interval computed from a handful of slides is worse than none (a bootstrap of 2 slides gives
"1.0000 – 1.0000"). So each interval uses a method built for small samples where one exists,
and is *not estimable* (NaN with ``ci_reason``) below a documented minimum per class:

* AUC, two labels: Newcombe's score interval (2006, "Method 5": Hanley–McNeil variance as a
  function of the true AUC, solved like a Wilson interval), which stays inside [0, 1] and is
  not degenerate at AUC 1. More labels (macro one-vs-rest): bootstrap percentile.
  Minimum :data:`MIN_PER_CLASS_AUC` slides of every class: Newcombe's and Obuchowski's
  simulations show coverage of the AUC intervals falling well below nominal with fewer than
  about 10 per group, and the interval then spans most of [0.5, 1] anyway.
* Recall of a class (sensitivity, specificity): Wilson score interval; balanced accuracy, the
  mean of the classes' recalls (independent slides): MOVER-Wilson (Zou & Donner 2008).
  Minimum :data:`MIN_PER_CLASS_PROPORTION` slides of the class (every class for balanced
  accuracy): Wilson's coverage is close to nominal from about 5 trials on (Brown, Cai &
  DasGupta 2001), while below that the interval is nearly [0, 1].
* F1 has no small-sample interval: bootstrap percentile, with the AUC minimum.

Patch level (localisation, where patch labels exist): AUC and average precision of the instance
tumour probability, and Dice of the thresholded probability against the tumour labels, on the
patches whose label is known (1 tumour, 0 normal; −1 unknown is excluded). A slide that is all
tumour, all normal or unlabelled is an ordinary occurrence, not an error: undefined metrics come
back as NaN with a reason rather than raising, so one such slide never aborts an evaluation.

Every result has ``to_json()`` (plain floats/ints, NaN → ``None``, valid strict JSON) for run
reports, and ``flat()`` (a flat ``str → float`` mapping with NaN kept) for metric records that
must carry the same keys from every site.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

PROB_SUM_TOL = 1e-4
"""How far a row of class probabilities may sum from 1 (float32 softmax rounding)."""


def _json_float(x: float) -> float | None:
    """A float for strict JSON: NaN/inf become ``None`` (JSON has no NaN)."""
    return float(x) if math.isfinite(x) else None


def _from_json_float(x: float | None) -> float:
    return math.nan if x is None else float(x)


MIN_PER_CLASS_AUC = 10
"""Fewest slides of every class for an AUC or F1 interval (see the module docstring)."""
MIN_PER_CLASS_PROPORTION = 5
"""Fewest slides of a class for a Wilson interval of its recall (see the module docstring)."""
ECE_BINS = 10
"""Equal-width probability bins of the expected calibration error (Guo et al. 2017)."""


@dataclass(frozen=True)
class MetricWithCI:
    """One metric's point estimate and its interval, or why there is none.

    ``method`` names how the interval was computed (empty when it was not); ``ci_reason`` says
    why ``low``/``high`` are NaN when ``value`` is defined (too few slides of a class, no
    resamples). ``n_boot`` is how many bootstrap resamples a bootstrap interval rests on
    (resamples where the metric is undefined are skipped); 0 for the analytic intervals.
    ``reason`` says why ``value`` itself is NaN, if it is.
    """

    value: float
    low: float
    high: float
    n_boot: int
    reason: str | None = None
    method: str = ""
    ci_reason: str | None = None

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def interval_text(self, digits: int = 4) -> str:
        """``0.8123 – 0.9560``, or ``n/a (<why>)``: what a table's CI column shows."""
        if self.has_interval:
            return f"{self.low:.{digits}f} – {self.high:.{digits}f}"
        why = self.ci_reason or self.reason
        return f"n/a ({why})" if why else "n/a"

    def to_json(self) -> dict[str, Any]:
        return {
            "value": _json_float(self.value),
            "low": _json_float(self.low),
            "high": _json_float(self.high),
            "n_boot": int(self.n_boot),
            "reason": self.reason,
            "method": self.method,
            "ci_reason": self.ci_reason,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MetricWithCI:
        return cls(
            value=_from_json_float(data["value"]),
            low=_from_json_float(data["low"]),
            high=_from_json_float(data["high"]),
            n_boot=int(data["n_boot"]),
            reason=data.get("reason"),
            method=str(data.get("method") or ""),
            ci_reason=data.get("ci_reason"),
        )


@dataclass(frozen=True)
class SlideMetrics:
    """Slide-level metrics of one evaluation set (a site, or all sites pooled).

    ``threshold`` is the decision threshold on the positive-class probability the predictions
    were made at (two labels), ``None`` for the argmax. ``recall`` holds each class's recall in
    label order (two labels: specificity, sensitivity). ``brier`` and ``ece`` judge the
    probabilities themselves (see :func:`brier_score`, :func:`expected_calibration_error`).
    """

    n_slides: int
    n_classes: int
    class_counts: tuple[int, ...]
    auc: MetricWithCI
    balanced_accuracy: MetricWithCI
    f1: MetricWithCI
    bootstrap: int
    ci: float
    seed: int
    recall: tuple[MetricWithCI, ...] = ()
    brier: float = math.nan
    ece: float = math.nan
    threshold: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "n_slides": int(self.n_slides),
            "n_classes": int(self.n_classes),
            "class_counts": [int(c) for c in self.class_counts],
            "auc": self.auc.to_json(),
            "balanced_accuracy": self.balanced_accuracy.to_json(),
            "f1": self.f1.to_json(),
            "recall": [r.to_json() for r in self.recall],
            "brier": _json_float(self.brier),
            "ece": _json_float(self.ece),
            "threshold": None if self.threshold is None else float(self.threshold),
            "bootstrap": int(self.bootstrap),
            "ci": float(self.ci),
            "seed": int(self.seed),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SlideMetrics:
        threshold = data.get("threshold")
        return cls(
            n_slides=int(data["n_slides"]),
            n_classes=int(data["n_classes"]),
            class_counts=tuple(int(c) for c in data["class_counts"]),
            auc=MetricWithCI.from_json(data["auc"]),
            balanced_accuracy=MetricWithCI.from_json(data["balanced_accuracy"]),
            f1=MetricWithCI.from_json(data["f1"]),
            bootstrap=int(data["bootstrap"]),
            ci=float(data["ci"]),
            seed=int(data["seed"]),
            recall=tuple(MetricWithCI.from_json(r) for r in data.get("recall") or ()),
            brier=_from_json_float(data.get("brier")),
            ece=_from_json_float(data.get("ece")),
            threshold=None if threshold is None else float(threshold),
        )

    def flat(self, prefix: str = "") -> dict[str, float]:
        """Fixed keys (``auc``, ``auc_low``, ``auc_high``, ``auc_n_boot``, …), NaN kept.

        The key set does not depend on the data, so every site reports the same keys even when
        one of its metrics is undefined.
        """
        out: dict[str, float] = {f"{prefix}n_slides": float(self.n_slides)}
        for name, m in (
            ("auc", self.auc),
            ("balanced_accuracy", self.balanced_accuracy),
            ("f1", self.f1),
        ):
            out[f"{prefix}{name}"] = float(m.value)
            out[f"{prefix}{name}_low"] = float(m.low)
            out[f"{prefix}{name}_high"] = float(m.high)
            out[f"{prefix}{name}_n_boot"] = float(m.n_boot)
        out[f"{prefix}brier"] = float(self.brier)
        out[f"{prefix}ece"] = float(self.ece)
        return out


@dataclass(frozen=True)
class PatchMetrics:
    """Patch-level localisation metrics on the patches with a known label.

    ``reason`` explains every NaN (several reasons are joined with "; "), ``None`` when all
    three metrics are defined.
    """

    auc: float
    average_precision: float
    dice: float
    n_labelled: int
    n_tumour: int
    n_slides: int
    threshold: float
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "auc": _json_float(self.auc),
            "average_precision": _json_float(self.average_precision),
            "dice": _json_float(self.dice),
            "n_labelled": int(self.n_labelled),
            "n_tumour": int(self.n_tumour),
            "n_slides": int(self.n_slides),
            "threshold": float(self.threshold),
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PatchMetrics:
        return cls(
            auc=_from_json_float(data["auc"]),
            average_precision=_from_json_float(data["average_precision"]),
            dice=_from_json_float(data["dice"]),
            n_labelled=int(data["n_labelled"]),
            n_tumour=int(data["n_tumour"]),
            n_slides=int(data["n_slides"]),
            threshold=float(data["threshold"]),
            reason=data.get("reason"),
        )

    def flat(self, prefix: str = "") -> dict[str, float]:
        """Fixed keys with NaN kept, for metric records that need the same keys everywhere."""
        return {
            f"{prefix}patch_auc": float(self.auc),
            f"{prefix}patch_ap": float(self.average_precision),
            f"{prefix}patch_dice": float(self.dice),
            f"{prefix}patch_n_labelled": float(self.n_labelled),
            f"{prefix}patch_n_tumour": float(self.n_tumour),
        }


# --------------------------------------------------------------------------- slide level


def _check_slide_inputs(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated int64 labels and float64 probabilities renormalised to sum exactly to 1.

    sklearn's multiclass AUC insists on rows summing to 1 with a tolerance tighter than float32
    softmax rounding; renormalising after our own looser check keeps the argmax and (up to
    rounding) the ranking, so the metrics are unchanged.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D (one label per slide), got shape {y.shape}")
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (slides × classes), got shape {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"{y.shape[0]} labels but {p.shape[0]} rows of probabilities")
    if y.shape[0] == 0:
        raise ValueError("no slides to evaluate")
    if p.shape[1] < 2:
        raise ValueError(f"probs needs at least 2 class columns, got {p.shape[1]}")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    n_classes = p.shape[1]
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(
            f"y_true values must lie in [0, {n_classes}), got range [{y.min()}, {y.max()}]"
        )
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    if p.min() < 0 or p.max() > 1:
        raise ValueError("probs must lie in [0, 1] (softmax outputs, not logits)")
    sums = p.sum(axis=1)
    worst = float(np.max(np.abs(sums - 1.0)))
    if worst > PROB_SUM_TOL:
        raise ValueError(f"rows of probs must sum to 1 (softmax outputs); off by up to {worst:.3g}")
    return y, p / sums[:, None]


def _auc_undefined_reason(y: np.ndarray, n_classes: int) -> str | None:
    """Why AUC cannot be computed on these labels, or ``None`` if it can.

    Macro one-vs-rest averages over *all* classes, so every class must occur: averaging over
    only the present ones would make a site's AUC silently mean something different from the
    pooled one.
    """
    present = np.unique(y)
    if present.size < 2:
        return f"only one class present (class {int(present[0])})"
    if n_classes > 2 and present.size < n_classes:
        missing = sorted(set(range(n_classes)) - {int(c) for c in present})
        return f"macro one-vs-rest AUC needs every class; absent: {missing}"
    return None


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    if p.shape[1] == 2:
        return float(roc_auc_score(y, p[:, 1]))
    return float(
        roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(p.shape[1])))
    )


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    # sklearn warns when a prediction names a class absent from y_true, or when y_true and
    # y_pred hold one single class (both common in small resamples); the score it returns —
    # mean recall over the classes present in y_true — is what we want, so the noise goes.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")
        return float(balanced_accuracy_score(y, pred))


def _f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    # zero_division=0: no true and no predicted positives of a class scores 0 for that class
    # (sklearn's default, made explicit so it does not warn).
    if n_classes == 2:
        return float(f1_score(y, pred, pos_label=1, average="binary", zero_division=0.0))
    return float(
        f1_score(y, pred, labels=list(range(n_classes)), average="macro", zero_division=0.0)
    )


def _percentile_ci(values: list[float], ci: float) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(np.asarray(values, dtype=np.float64), [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _z(ci: float) -> float:
    return NormalDist().inv_cdf(0.5 + ci / 2.0)


def wilson_interval(successes: int, n: int, ci: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (NaN bounds when ``n`` is 0)."""
    if n <= 0:
        return math.nan, math.nan
    z = _z(ci)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mover_mean_interval(
    values: Sequence[float], intervals: Sequence[tuple[float, float]]
) -> tuple[float, float]:
    """Interval of the mean of independent estimates from their own intervals (MOVER).

    Zou & Donner (2008): the "method of variance estimates recovery" carries each estimate's
    asymmetric interval into the interval of their sum, so a mean of Wilson intervals keeps
    Wilson's small-sample behaviour (balanced accuracy = mean of the classes' recalls).
    """
    k = len(values)
    mean = sum(values) / k
    lower = math.sqrt(
        sum(((v - lo) / k) ** 2 for v, (lo, _) in zip(values, intervals, strict=True))
    )
    upper = math.sqrt(
        sum(((hi - v) / k) ** 2 for v, (_, hi) in zip(values, intervals, strict=True))
    )
    return max(0.0, mean - lower), min(1.0, mean + upper)


def auc_interval(auc: float, n_pos: int, n_neg: int, ci: float = 0.95) -> tuple[float, float]:
    """Newcombe's (2006) score interval of a binary AUC ("Method 5").

    The Hanley–McNeil variance is written as a function of the true AUC θ with
    N* = (n_pos + n_neg)/2 − 1:  V(θ) = θ(1−θ)/(n_pos·n_neg) · [1 + (N*−1)((1−θ)/(2−θ) +
    θ/(1+θ))], and the bounds are the θ where (AUC − θ)² = z²·V(θ), found by bisection on each
    side. Like Wilson's interval it stays in [0, 1] and does not collapse at AUC 0 or 1.
    """
    if n_pos <= 0 or n_neg <= 0 or not math.isfinite(auc):
        return math.nan, math.nan
    z2 = _z(ci) ** 2
    n_star = (n_pos + n_neg) / 2.0 - 1.0

    def excess(theta: float) -> float:
        var = (
            theta
            * (1 - theta)
            / (n_pos * n_neg)
            * (1 + (n_star - 1) * ((1 - theta) / (2 - theta) + theta / (1 + theta)))
        )
        return (auc - theta) ** 2 - z2 * var

    def bound(outside: float) -> float:
        # excess(auc) <= 0 and excess(outside) >= 0 (V is 0 at the ends of [0, 1]).
        inside = auc
        if excess(outside) < 0:
            return outside
        for _ in range(100):
            mid = (inside + outside) / 2.0
            if excess(mid) <= 0:
                inside = mid
            else:
                outside = mid
        return (inside + outside) / 2.0

    return bound(0.0), bound(1.0)


def too_few_text(
    counts: Sequence[int], minimum: int, labels: Sequence[str] | None, classes: Sequence[int]
) -> str | None:
    """``3 tumour / 2 normal slides; need ≥ 10 per class``, or ``None`` when every class of
    ``classes`` has ``minimum`` slides."""
    if all(counts[c] >= minimum for c in classes):
        return None
    names = labels if labels is not None else [f"class {i}" for i in range(len(counts))]
    shown = " / ".join(f"{counts[c]} {names[c]}" for c in classes)
    return f"{shown} slides; need ≥ {minimum} per class"


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


def predict(p: np.ndarray, threshold: float | None) -> np.ndarray:
    """Argmax, or for two labels "positive when p₁ ≥ threshold"."""
    if threshold is None or p.shape[1] != 2:
        return p.argmax(axis=1)
    return (p[:, 1] >= threshold).astype(np.int64)


def slide_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    threshold: float | None = None,
    labels: Sequence[str] | None = None,
) -> SlideMetrics:
    """AUC, balanced accuracy, per-class recall, F1, Brier and ECE of slide predictions.

    ``y_true`` holds class indices (B,), ``probs`` softmax probabilities (B, C). Predictions
    are the argmax, or with two labels and a ``threshold`` "positive when p₁ ≥ threshold".
    Intervals at level ``ci`` follow the module docstring: analytic where a small-sample method
    exists, else a percentile bootstrap over slides (``bootstrap`` resamples, ``0`` = none;
    resamples where AUC is undefined are skipped and ``n_boot`` says how many were used; the
    same ``seed`` gives the same interval), and none below the per-class minimum, with a
    ``ci_reason`` naming the counts (by ``labels`` when given).

    Raises ``ValueError`` on malformed input (shapes, label range, non-probabilities, no
    slides); a label set that leaves AUC undefined yields NaN with a reason instead.
    """
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    y, p = _check_slide_inputs(y_true, probs)
    n, n_classes = p.shape
    if labels is not None and len(labels) != n_classes:
        raise ValueError(f"{len(labels)} label names for {n_classes} classes")
    pred = predict(p, threshold)
    counts = tuple(int(c) for c in np.bincount(y, minlength=n_classes))
    every = list(range(n_classes))
    few_auc = too_few_text(counts, MIN_PER_CLASS_AUC, labels, every)

    auc_reason = _auc_undefined_reason(y, n_classes)
    auc_value = math.nan if auc_reason is not None else _auc(y, p)
    bacc_value = _balanced_accuracy(y, pred)
    f1_value = _f1(y, pred, n_classes)

    # Bootstrap only what has no small-sample interval (F1; AUC of more than two labels).
    boot_auc = n_classes > 2 and auc_reason is None and few_auc is None
    boot_f1 = few_auc is None
    rng = np.random.default_rng(seed)
    auc_boot: list[float] = []
    f1_boot: list[float] = []
    for _ in range(bootstrap if (boot_auc or boot_f1) else 0):
        idx = rng.integers(0, n, size=n)
        yb, pb, predb = y[idx], p[idx], pred[idx]
        # Skipping undefined resamples conditions the interval on "both classes drawn"; with a
        # defined point estimate that is rare except on tiny sets, and n_boot makes it visible.
        if boot_auc and _auc_undefined_reason(yb, n_classes) is None:
            auc_boot.append(_auc(yb, pb))
        f1_boot.append(_f1(yb, predb, n_classes))

    def bootstrap_metric(value: float, resamples: list[float]) -> MetricWithCI:
        """The percentile interval of a metric that has no small-sample method."""
        if not resamples:
            reason = "no bootstrap resamples (--bootstrap 0)"
            return MetricWithCI(value, math.nan, math.nan, 0, ci_reason=reason)
        low, high = _percentile_ci(resamples, ci)
        return MetricWithCI(value, low, high, len(resamples), method="bootstrap percentile")

    if auc_reason is not None:
        auc = MetricWithCI(auc_value, math.nan, math.nan, 0, auc_reason)
    elif few_auc is not None:
        auc = MetricWithCI(auc_value, math.nan, math.nan, 0, ci_reason=few_auc)
    elif n_classes == 2:
        low, high = auc_interval(auc_value, counts[1], counts[0], ci)
        auc = MetricWithCI(auc_value, low, high, 0, method="Newcombe score (Hanley–McNeil)")
    else:
        auc = bootstrap_metric(auc_value, auc_boot)

    recalls: list[MetricWithCI] = []
    for c in every:
        hits = int(np.sum((y == c) & (pred == c)))
        value = hits / counts[c] if counts[c] else math.nan
        few = too_few_text(counts, MIN_PER_CLASS_PROPORTION, labels, [c])
        if counts[c] == 0:
            recalls.append(MetricWithCI(value, math.nan, math.nan, 0, "no slide of this class"))
        elif few is not None:
            recalls.append(MetricWithCI(value, math.nan, math.nan, 0, ci_reason=few))
        else:
            low, high = wilson_interval(hits, counts[c], ci)
            recalls.append(MetricWithCI(value, low, high, 0, method="Wilson"))

    present = [c for c in every if counts[c] > 0]
    few_bacc = too_few_text(counts, MIN_PER_CLASS_PROPORTION, labels, every)
    if few_bacc is not None:
        bacc = MetricWithCI(bacc_value, math.nan, math.nan, 0, ci_reason=few_bacc)
    else:
        low, high = mover_mean_interval(
            [recalls[c].value for c in present],
            [(recalls[c].low, recalls[c].high) for c in present],
        )
        bacc = MetricWithCI(bacc_value, low, high, 0, method="MOVER-Wilson")

    if few_auc is not None:
        f1 = MetricWithCI(f1_value, math.nan, math.nan, 0, ci_reason=few_auc)
    else:
        f1 = bootstrap_metric(f1_value, f1_boot)

    return SlideMetrics(
        n_slides=n,
        n_classes=n_classes,
        class_counts=counts,
        auc=auc,
        balanced_accuracy=bacc,
        f1=f1,
        bootstrap=bootstrap,
        ci=ci,
        seed=seed,
        recall=tuple(recalls),
        brier=brier_score(y, p),
        ece=expected_calibration_error(y, p),
        threshold=threshold if n_classes == 2 else None,
    )


# --------------------------------------------------------------------------- patch level


def _check_patch_inputs(labels: np.ndarray, tumour_prob: np.ndarray) -> tuple[np.ndarray, ...]:
    lab = np.asarray(labels)
    prob = np.asarray(tumour_prob)
    if lab.ndim != 1 or prob.ndim != 1:
        raise ValueError(
            f"labels and tumour_prob must be 1-D (one per patch), got {lab.shape}, {prob.shape}"
        )
    if lab.shape != prob.shape:
        raise ValueError(f"{lab.shape[0]} patch labels but {prob.shape[0]} probabilities")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"patch labels must be integers (1/0/-1), got dtype {lab.dtype}")
    lab = lab.astype(np.int64)
    bad = np.setdiff1d(np.unique(lab), [-1, 0, 1])
    if bad.size:
        raise ValueError(f"patch labels must be 1, 0 or -1, found {bad.tolist()}")
    prob = prob.astype(np.float64)
    if not np.all(np.isfinite(prob)):
        raise ValueError("tumour_prob contains NaN or infinite values")
    return lab, prob


def _patch_metrics_labelled(
    y: np.ndarray, prob: np.ndarray, *, threshold: float, n_slides: int
) -> PatchMetrics:
    """Metrics on already-filtered labelled patches (``y`` in {0, 1})."""
    reasons: list[str] = []
    n_tumour = int(y.sum())
    if y.size == 0:
        reasons.append("no labelled patches")
    elif n_tumour in (0, y.size):
        reasons.append(
            f"only {'tumour' if n_tumour else 'normal'} patches labelled: AUC and AP undefined"
        )
    if reasons:
        auc = ap = math.nan
    else:
        auc = float(roc_auc_score(y, prob))
        ap = float(average_precision_score(y, prob))

    pred = prob >= threshold
    truth = y == 1
    denom = int(pred.sum()) + int(truth.sum())
    if denom == 0:
        dice = math.nan
        if y.size:
            reasons.append("no tumour labelled or predicted: Dice undefined")
    else:
        dice = 2.0 * int(np.logical_and(pred, truth).sum()) / denom
    return PatchMetrics(
        auc=auc,
        average_precision=ap,
        dice=dice,
        n_labelled=int(y.size),
        n_tumour=n_tumour,
        n_slides=n_slides,
        threshold=threshold,
        reason="; ".join(reasons) if reasons else None,
    )


def patch_metrics(
    labels: np.ndarray, tumour_prob: np.ndarray, *, threshold: float = 0.5
) -> PatchMetrics:
    """AUC, average precision and Dice at ``threshold`` of one slide's patch predictions.

    ``labels`` are 1 (tumour), 0 (normal) or −1 (unknown, excluded); ``tumour_prob`` is the
    instance tumour probability per patch. Dice = 2|P∩T| / (|P| + |T|) with P = prob ≥
    threshold and T = label 1, over labelled patches. Undefined metrics are NaN with a reason;
    malformed input raises ``ValueError``.
    """
    lab, prob = _check_patch_inputs(labels, tumour_prob)
    keep = lab != -1
    return _patch_metrics_labelled(lab[keep], prob[keep], threshold=threshold, n_slides=1)


def pooled_patch_metrics(
    slides: Iterable[tuple[np.ndarray, np.ndarray]], *, threshold: float = 0.5
) -> PatchMetrics:
    """Patch metrics over the labelled patches of many slides taken together (micro-pooled).

    Pooling lets slides that are all tumour or all normal — undefined on their own — still count
    toward AUC and AP; it ranks patches across slides, so it also rewards probabilities that are
    comparable between slides, which a per-slide mean would not test.
    """
    ys: list[np.ndarray] = []
    ps: list[np.ndarray] = []
    n_slides = 0
    for labels, prob in slides:
        lab, pr = _check_patch_inputs(labels, prob)
        keep = lab != -1
        ys.append(lab[keep])
        ps.append(pr[keep])
        n_slides += 1
    y = np.concatenate(ys) if ys else np.zeros(0, dtype=np.int64)
    p = np.concatenate(ps) if ps else np.zeros(0, dtype=np.float64)
    return _patch_metrics_labelled(y, p, threshold=threshold, n_slides=n_slides)
