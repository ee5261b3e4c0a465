"""Scoring a trained model on bags in memory, and the feature-space ceiling beside it.

Patch metrics are against the generator's ground truth; the low-grade figures compare
low-grade with normal patches only, the part of a tumour slide labels alone do not point to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bench.prepared_cohort import HIGH_GRADE, LOW_GRADE, NORMAL_GRADE, LoadedCohort, with_truth
from fedpath.client.training.bags import Bag
from fedpath.client.training.evaluate import predict_bag
from fedpath.common.metrics import SlideMetrics, slide_metrics
from fedpath.common.mil.models import MILModel
from fedpath.common.patch_metrics import PatchMetrics, pooled_patch_metrics


@dataclass(frozen=True)
class Evaluation:
    """A model's scores on one set of test bags."""

    slide: SlideMetrics
    patch: PatchMetrics
    low_grade_patch: PatchMetrics | None = None
    """Low-grade against normal patches (``low_grade_patch_metrics``); None when not scored or
    the bags have no low-grade patch."""


def grade_labels(grade: np.ndarray, positive: int) -> np.ndarray:
    """Patch labels of one grade against normal tissue: 1 grade ``positive``, 0 normal, −1 the
    rest (other grades, ambiguous), so a metric compares exactly those two kinds of patch."""
    labels = np.full(grade.shape, -1, dtype=np.int8)
    labels[grade == NORMAL_GRADE] = 0
    labels[grade == positive] = 1
    return labels


def low_grade_patch_metrics(
    slides: Iterable[tuple[np.ndarray, np.ndarray]],
) -> PatchMetrics | None:
    """Pooled patch metrics of low-grade (positive) against normal patches from (grade,
    tumour probability) per slide; None when no slide has a low-grade patch.

    The overall patch AUC is dominated by conspicuous high-grade tumour, which slide labels
    alone find; this isolates the part that needs outlines to be learnt.
    """
    labelled = [(grade_labels(grade, LOW_GRADE), prob) for grade, prob in slides]
    if not any((labels == 1).any() for labels, _ in labelled):
        return None
    return pooled_patch_metrics(labelled)


def evaluate_bags(
    model: MILModel,
    bags: Sequence[Bag],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    grade: Mapping[str, np.ndarray] | None = None,
) -> Evaluation:
    """Slide metrics with bootstrap CIs and pooled patch metrics over every bag with labels.

    Unlike ``evaluate_entries`` this takes bags already in memory, so one load of the test set
    serves every arm, and the bags' patch labels can be the generator's ground truth. With
    ``grade`` (patch grades by slide id, covering every bag with patch labels) it also scores
    low-grade against normal patches.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            preds = [predict_bag(model, bag) for bag in bags]
    finally:
        model.train(was_training)
    y = np.asarray([p.label for p in preds], dtype=np.int64)
    slide = slide_metrics(y, np.stack([p.probs for p in preds]), bootstrap=bootstrap, seed=seed)
    patches = [
        (p.patch_labels, p.patch_tumour_prob)
        for p in preds
        if p.patch_labels is not None and p.patch_tumour_prob is not None
    ]
    low_grade = None
    if grade is not None:
        low_grade = low_grade_patch_metrics(
            (grade[p.slide_id], p.patch_tumour_prob)
            for p in preds
            if p.patch_tumour_prob is not None
        )
    return Evaluation(slide, pooled_patch_metrics(patches), low_grade)


def labelled_patches(bags: Sequence[Bag]) -> tuple[np.ndarray, np.ndarray]:
    """Features and 0/1 labels of every patch with a known label, over ``bags``."""
    xs, ys = [], []
    for bag in bags:
        if bag.patch_labels is None:
            continue
        labels = bag.patch_labels.numpy()
        keep = labels != -1
        xs.append(bag.features.numpy()[keep])
        ys.append(labels[keep].astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


@dataclass(frozen=True)
class LowGradeCeiling:
    """The feature space on low-grade tumour: test low-grade against normal patches."""

    high_grade_probe: PatchMetrics
    """A probe fitted on training-pool high-grade vs normal patches only: the tumour that
    slide labels point to, so about what weak supervision can be expected to reach here."""
    full_probe: PatchMetrics
    """The ceiling's probe (fitted on every labelled pool patch, low-grade ones included)."""
    n_train_patches: int
    """Pool patches the high-grade probe was fitted on."""


@dataclass(frozen=True)
class FeatureCeiling:
    """How separable tumour is in the feature space, given unlimited patch labels."""

    probe: PatchMetrics
    """A standardised logistic-regression probe fitted on every labelled training-pool patch,
    scored on the test patches."""
    n_train_patches: int
    best_dim: int
    best_dim_auc: float
    """Test AUC of the single feature dimension that separates the training pool best."""
    low_grade: LowGradeCeiling | None = None
    """None unless both the pool and the test set have low-grade patches."""


def _probe(x: np.ndarray, y: np.ndarray, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """A standardised logistic regression fitted on (``x``, ``y``): features → P(positive)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(x, y)
    return lambda features: probe.predict_proba(features)[:, 1]


def _has_low_grade(bags: Sequence[Bag], grade: Mapping[str, np.ndarray]) -> bool:
    return any((grade[b.entry.slide_id] == LOW_GRADE).any() for b in bags)


def _low_grade_ceiling(
    data: LoadedCohort, full_probs: Sequence[np.ndarray], seed: int
) -> LowGradeCeiling | None:
    """Both probes on test low-grade vs normal patches (``full_probs``: the full probe's
    tumour probabilities per test bag); None without low-grade patches in pool and test."""
    if not (_has_low_grade(data.probe_train, data.grade) and _has_low_grade(data.test, data.grade)):
        return None
    high_grade_bags = [
        with_truth(b, grade_labels(data.grade[b.entry.slide_id], HIGH_GRADE))
        for b in data.probe_train
    ]
    x, y = labelled_patches(high_grade_bags)
    predict = _probe(x, y, seed)
    test_grade = [data.grade[b.entry.slide_id] for b in data.test]
    high = low_grade_patch_metrics(
        (g, predict(b.features.numpy())) for g, b in zip(test_grade, data.test, strict=True)
    )
    full = low_grade_patch_metrics(zip(test_grade, full_probs, strict=True))
    assert high is not None and full is not None  # the test set has low-grade patches
    return LowGradeCeiling(high, full, len(y))


def feature_ceiling(data: LoadedCohort, seed: int = 0) -> FeatureCeiling:
    """The upper bound a patch classifier can reach on these features (no MIL involved)."""
    from sklearn.metrics import roc_auc_score

    x, y = labelled_patches(data.probe_train)
    predict = _probe(x, y, seed)
    probs = [predict(bag.features.numpy()) for bag in data.test]
    slides = []
    for bag, prob in zip(data.test, probs, strict=True):
        assert bag.patch_labels is not None
        slides.append((bag.patch_labels.numpy().astype(np.int64), prob))
    train_auc = np.array([roc_auc_score(y, x[:, j]) for j in range(x.shape[1])])
    best = int(np.argmax(np.abs(train_auc - 0.5)))
    sign = 1.0 if train_auc[best] >= 0.5 else -1.0
    x_test, y_test = labelled_patches(data.test)
    best_auc = float(roc_auc_score(y_test, sign * x_test[:, best]))
    return FeatureCeiling(
        pooled_patch_metrics(slides),
        len(y),
        best,
        best_auc,
        _low_grade_ceiling(data, probs, seed),
    )


# ------------------------------------------------------------------------------- the table


def low_grade_text(metrics: PatchMetrics | None) -> str:
    """ ", low-grade patch AUC x" for a progress line; nothing on a uniform-tumour cohort."""
    return "" if metrics is None else f", low-grade patch AUC {metrics.auc:.4f}"
