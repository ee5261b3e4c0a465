"""Slide-level evaluation metrics (DESIGN §4.7), shared by sites and the server.

Sites evaluate locally and the server aggregates, so both must compute *the same* numbers from
the same inputs: the metric definitions live here once, and the arithmetic is scikit-learn's so
that results match what anyone reproducing them with sklearn would get.

ROC AUC (binary: on the positive-class probability; more classes: macro one-vs-rest), balanced
accuracy, each class's recall (binary: specificity, sensitivity) and F1 (binary: of the
positive class; more classes: macro) at the argmax prediction or, for two labels, at a decision
threshold on the positive-class probability; Brier score and expected calibration error (ECE)
of the probabilities (:mod:`fedpath.common.probability_scores`). Each metric carries an
interval built for small test sets, or none below a minimum per class, with ``ci_reason``
saying why (:mod:`fedpath.common.intervals`). Patch-level localisation metrics are
:mod:`fedpath.common.patch_metrics`.

Every result has ``to_json()`` (plain floats/ints, NaN → ``None``, valid strict JSON) for run
reports, and ``flat()`` (a flat ``str → float`` mapping with NaN kept) for metric records that
must carry the same keys from every site.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import (
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

from fedpath.common.intervals import (
    MIN_PER_CLASS_AUC,
    MIN_PER_CLASS_PROPORTION,
    auc_interval,
    mover_mean_interval,
    percentile_interval,
    too_few_text,
    wilson_interval,
)
from fedpath.common.json_float import from_json_float, json_float
from fedpath.common.probability_scores import brier_score, expected_calibration_error

PROB_SUM_TOL = 1e-4
"""How far a row of class probabilities may sum from 1 (float32 softmax rounding)."""


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
            "value": json_float(self.value),
            "low": json_float(self.low),
            "high": json_float(self.high),
            "n_boot": int(self.n_boot),
            "reason": self.reason,
            "method": self.method,
            "ci_reason": self.ci_reason,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MetricWithCI:
        return cls(
            value=from_json_float(data["value"]),
            low=from_json_float(data["low"]),
            high=from_json_float(data["high"]),
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
    probabilities themselves (see :mod:`fedpath.common.probability_scores`).
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
            "brier": json_float(self.brier),
            "ece": json_float(self.ece),
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
            brier=from_json_float(data.get("brier")),
            ece=from_json_float(data.get("ece")),
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
    Intervals at level ``ci`` follow :mod:`fedpath.common.intervals`: analytic where a
    small-sample method exists, else a percentile bootstrap over slides (``bootstrap``
    resamples, ``0`` = none; resamples where AUC is undefined are skipped and ``n_boot`` says
    how many were used; the same ``seed`` gives the same interval), and none below the
    per-class minimum, with a ``ci_reason`` naming the counts (by ``labels`` when given).

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
        low, high = percentile_interval(resamples, ci)
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
