"""Aggregation weights (FedAvg, FedMix) and the weighted average of model arrays (DESIGN §4.6).

Pure numpy so the formulas are tested against hand-computed values without Flower or torch.
The average accumulates in float64 and casts back to each array's own dtype: numpy 2 would
otherwise upcast float32 × float64 weights to float64 and double every later payload.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["fedavg_weights", "fedmix_weights", "weighted_average"]


def _check_counts(counts: Sequence[float]) -> np.ndarray:
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise ValueError("need at least one site to aggregate")
    if not np.all(np.isfinite(n)) or np.any(n < 0) or n.sum() <= 0:
        raise ValueError(f"sample counts must be finite, >= 0 and not all 0; got {n.tolist()}")
    return n


def fedavg_weights(counts: Sequence[float]) -> np.ndarray:
    """``w_i = n_i / Σ n``: each site counts in proportion to its training slides."""
    n = _check_counts(counts)
    return n / n.sum()


def fedmix_weights(
    counts: Sequence[float], losses: Sequence[float], lam: float, beta: float
) -> np.ndarray:
    """FedMix (Wicaksana et al. 2022): ``w̃_i = n_i/Σn + λ·L_i^β/ΣL^β``, normalised.

    A site with a higher mean training loss gets more weight, pulling the global model toward
    the sites it fits worst. A site whose loss is not finite (it diverged) cannot be weighted
    by loss, so the whole round falls back to the data term; losses are clipped at 0 from
    below because the attention regulariser can make the total loss negative, and a negative
    base has no real power.
    """
    n = _check_counts(counts)
    loss = np.asarray(losses, dtype=np.float64)
    if loss.shape != n.shape:
        raise ValueError(f"{loss.size} losses for {n.size} sites")
    if lam < 0 or beta <= 0:
        raise ValueError(f"FedMix needs λ >= 0 and β > 0; got λ={lam}, β={beta}")
    data_term = n / n.sum()
    if not np.all(np.isfinite(loss)):
        return data_term
    powered = np.power(np.clip(loss, 0.0, None), beta)
    loss_term = powered / powered.sum() if powered.sum() > 0 else np.zeros_like(powered)
    mixed = data_term + lam * loss_term
    return mixed / mixed.sum()


def weighted_average(
    arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """``Σ w_i · x_i`` per named array, in each array's dtype; every site must send the same keys.

    Integer arrays (step counters and the like) cannot be averaged meaningfully; the first
    site's value is kept.
    """
    if not arrays:
        raise ValueError("no arrays to average")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(arrays),) or not math.isclose(float(w.sum()), 1.0, abs_tol=1e-9):
        raise ValueError(f"weights must be one per site and sum to 1; got {w.tolist()}")
    keys = list(arrays[0].keys())
    for i, site in enumerate(arrays[1:], start=1):
        if list(site.keys()) != keys:
            raise ValueError(f"site {i} sends different array names than site 0")
    out: dict[str, np.ndarray] = {}
    for key in keys:
        first = np.asarray(arrays[0][key])
        for i, site in enumerate(arrays[1:], start=1):
            if np.asarray(site[key]).shape != first.shape:
                raise ValueError(
                    f"array {key!r}: site {i} has shape {np.asarray(site[key]).shape}, "
                    f"site 0 has {first.shape}"
                )
        if not np.issubdtype(first.dtype, np.floating):
            out[key] = first.copy()
            continue
        total = np.zeros(first.shape, dtype=np.float64)
        for weight, site in zip(w, arrays, strict=True):
            total += weight * np.asarray(site[key], dtype=np.float64)
        out[key] = total.astype(first.dtype)
    return out
