"""Which slides each training step sees (DESIGN §4.4, after MS-CLAM).

Annotated slides are rare but carry patch-level supervision, so MS-CLAM oversamples them with a
weight ``w0`` that decays per epoch (the model first learns from the outlines, then from the
bulk of weakly labelled slides). Pairing one normal with one tumour slide per step keeps both
the instance task (which needs negatives and positives) and the bag loss balanced. Everything
is driven by a caller-supplied ``numpy.random.Generator`` so a seeded run is reproducible and no
module-level random state exists.
"""

from __future__ import annotations

import numpy as np

from fedpath.common.mil.config import SupervisionConfig

__all__ = ["epoch_schedule", "oversample_weights"]


def oversample_weights(annotated: np.ndarray, epoch: int, cfg: SupervisionConfig) -> np.ndarray:
    """Sampling weight per slide: ``max(1, w0·decay^epoch)`` if annotated, else 1.

    The floor at 1 keeps an annotated slide at least as likely as any other once the boost has
    decayed away, rather than letting it become under-sampled.
    """
    flags = np.asarray(annotated)
    if flags.ndim != 1:
        raise ValueError(f"annotated must be a 1-D array; got shape {flags.shape}")
    if flags.dtype != np.bool_:
        raise ValueError(f"annotated must be boolean; got dtype {flags.dtype}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0; got {epoch}")
    boost = max(1.0, cfg.oversample_weight * cfg.oversample_decay**epoch)
    return np.where(flags, boost, 1.0).astype(np.float64)


def _draw(pool: np.ndarray, weights: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices from ``pool`` with replacement, proportional to ``weights[pool]``."""
    p = weights[pool]
    return rng.choice(pool, size=size, replace=True, p=p / p.sum())


def epoch_schedule(
    labels: np.ndarray,
    annotated: np.ndarray,
    epoch: int,
    cfg: SupervisionConfig,
    rng: np.random.Generator,
    steps: int | None = None,
) -> list[tuple[int, ...]]:
    """Slide index groups, one tuple per step, drawn with replacement by oversampling weight.

    With ``cfg.pair_normal_tumour`` and both classes present each step is ``(normal, tumour)``
    (tumour = label ``cfg.tumour_class``, normal = any other label), each drawn by weight
    within its class; otherwise each step is a single slide drawn by weight over all slides.
    ``steps`` defaults to one pass worth of slides: ``ceil(n/2)`` pairs or ``n`` singles.
    """
    y = np.asarray(labels)
    flags = np.asarray(annotated)
    if y.ndim != 1 or flags.shape != y.shape:
        raise ValueError(
            f"labels and annotated must be 1-D of one length; got {y.shape}, {flags.shape}"
        )
    n = y.shape[0]
    if n == 0:
        raise ValueError("no slides to schedule")
    if steps is not None and steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    weights = oversample_weights(flags, epoch, cfg)
    tumour = np.flatnonzero(y == cfg.tumour_class)
    normal = np.flatnonzero(y != cfg.tumour_class)
    if cfg.pair_normal_tumour and tumour.size and normal.size:
        count = (n + 1) // 2 if steps is None else steps
        normals = _draw(normal, weights, count, rng)
        tumours = _draw(tumour, weights, count, rng)
        return [(int(a), int(b)) for a, b in zip(normals, tumours, strict=True)]
    count = n if steps is None else steps
    singles = _draw(np.arange(n), weights, count, rng)
    return [(int(i),) for i in singles]
