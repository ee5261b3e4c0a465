"""Slide- and patch-level evaluation metrics (DESIGN §4.7), shared by sites and the server.

Sites evaluate locally and the server aggregates, so both must compute *the same* numbers from
the same inputs: the metric definitions live here once, and the arithmetic is scikit-learn's so
that results match what anyone reproducing them with sklearn would get.

Slide level: ROC AUC (binary: on the positive-class probability; more classes: macro
one-vs-rest), balanced accuracy and F1 (binary: of the positive class; more classes: macro) at
the argmax prediction, each with a bootstrap percentile CI over slides. Site test sets are small,
so a point estimate without its uncertainty invites over-reading a difference between sites or
methods.

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class MetricWithCI:
    """One metric's point estimate and bootstrap percentile interval.

    ``n_boot`` is how many resamples the interval rests on: resamples where the metric is
    undefined (e.g. a single class for AUC) are skipped, and a reader must see when an interval
    stands on far fewer resamples than requested. ``reason`` says why ``value`` is NaN, if it is.
    """

    value: float
    low: float
    high: float
    n_boot: int
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "value": _json_float(self.value),
            "low": _json_float(self.low),
            "high": _json_float(self.high),
            "n_boot": int(self.n_boot),
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MetricWithCI:
        return cls(
            value=_from_json_float(data["value"]),
            low=_from_json_float(data["low"]),
            high=_from_json_float(data["high"]),
            n_boot=int(data["n_boot"]),
            reason=data.get("reason"),
        )


@dataclass(frozen=True)
class SlideMetrics:
    """Slide-level metrics of one evaluation set (a site, or all sites pooled)."""

    n_slides: int
    n_classes: int
    class_counts: tuple[int, ...]
    auc: MetricWithCI
    balanced_accuracy: MetricWithCI
    f1: MetricWithCI
    bootstrap: int
    ci: float
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {
            "n_slides": int(self.n_slides),
            "n_classes": int(self.n_classes),
            "class_counts": [int(c) for c in self.class_counts],
            "auc": self.auc.to_json(),
            "balanced_accuracy": self.balanced_accuracy.to_json(),
            "f1": self.f1.to_json(),
            "bootstrap": int(self.bootstrap),
            "ci": float(self.ci),
            "seed": int(self.seed),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SlideMetrics:
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


def slide_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> SlideMetrics:
    """AUC, balanced accuracy and F1 of slide predictions, each with a bootstrap CI.

    ``y_true`` holds class indices (B,), ``probs`` softmax probabilities (B, C). Slides are
    resampled with replacement ``bootstrap`` times (``0`` = no intervals, NaN bounds); the
    interval is the percentile one at level ``ci``. Resamples on which AUC is undefined (a
    single class; for C > 2 any class absent) are skipped for AUC only, and ``n_boot`` reports
    how many were used. The same ``seed`` gives the same intervals.

    Raises ``ValueError`` on malformed input (shapes, label range, non-probabilities, no
    slides); a label set that leaves AUC undefined yields NaN with a reason instead.
    """
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    y, p = _check_slide_inputs(y_true, probs)
    n, n_classes = p.shape
    pred = p.argmax(axis=1)

    auc_reason = _auc_undefined_reason(y, n_classes)
    auc_value = math.nan if auc_reason is not None else _auc(y, p)
    bacc_value = _balanced_accuracy(y, pred)
    f1_value = _f1(y, pred, n_classes)

    rng = np.random.default_rng(seed)
    auc_boot: list[float] = []
    bacc_boot: list[float] = []
    f1_boot: list[float] = []
    for _ in range(bootstrap):
        idx = rng.integers(0, n, size=n)
        yb, pb, predb = y[idx], p[idx], pred[idx]
        # Skipping undefined resamples conditions the interval on "both classes drawn"; with a
        # defined point estimate that is rare except on tiny sets, and n_boot makes it visible.
        if auc_reason is None and _auc_undefined_reason(yb, n_classes) is None:
            auc_boot.append(_auc(yb, pb))
        bacc_boot.append(_balanced_accuracy(yb, predb))
        f1_boot.append(_f1(yb, predb, n_classes))

    def with_ci(value: float, boot: list[float], reason: str | None = None) -> MetricWithCI:
        low, high = _percentile_ci(boot, ci)
        return MetricWithCI(value=value, low=low, high=high, n_boot=len(boot), reason=reason)

    return SlideMetrics(
        n_slides=n,
        n_classes=n_classes,
        class_counts=tuple(int(c) for c in np.bincount(y, minlength=n_classes)),
        auc=with_ci(auc_value, auc_boot, auc_reason),
        balanced_accuracy=with_ci(bacc_value, bacc_boot),
        f1=with_ci(f1_value, f1_boot),
        bootstrap=bootstrap,
        ci=ci,
        seed=seed,
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
