"""Patch-level localisation metrics, where patch labels exist.

AUC and average precision of the instance tumour probability, and Dice of the thresholded
probability against the tumour labels, on the patches whose label is known (1 tumour, 0 normal;
−1 unknown is excluded). A slide that is all tumour, all normal or unlabelled is an ordinary
occurrence, not an error: undefined metrics come back as NaN with a reason rather than raising,
so one such slide never aborts an evaluation. A job of its own beside the slide metrics
(:mod:`fedpath.common.metrics`): other inputs (one label per patch), other metrics, no
intervals.

:class:`PatchMetrics` has ``to_json()`` (NaN → ``None``) for run reports and ``flat()`` (fixed
keys, NaN kept) for metric records that must carry the same keys from every site.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from fedpath.common.json_float import from_json_float, json_float


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
            "auc": json_float(self.auc),
            "average_precision": json_float(self.average_precision),
            "dice": json_float(self.dice),
            "n_labelled": int(self.n_labelled),
            "n_tumour": int(self.n_tumour),
            "n_slides": int(self.n_slides),
            "threshold": float(self.threshold),
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PatchMetrics:
        return cls(
            auc=from_json_float(data["auc"]),
            average_precision=from_json_float(data["average_precision"]),
            dice=from_json_float(data["dice"]),
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
