"""Confidence intervals of slide metrics on small test sets, and when there is none.

Site test sets are small, so a point estimate without its uncertainty invites over-reading a
difference between sites or methods; and an interval computed from a handful of slides is worse
than none (a bootstrap of 2 slides gives "1.0000 – 1.0000"). So each interval uses a method
built for small samples where one exists, and is *not estimable* below a documented minimum per
class. Kept apart from the metrics themselves because the server builds the same intervals from
the counts sites send (:mod:`fedpath.server.pooled`), without any slide's prediction:

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

MIN_PER_CLASS_AUC = 10
"""Fewest slides of every class for an AUC or F1 interval (see the module docstring)."""
MIN_PER_CLASS_PROPORTION = 5
"""Fewest slides of a class for a Wilson interval of its recall (see the module docstring)."""


def percentile_interval(values: list[float], ci: float) -> tuple[float, float]:
    """The central ``ci`` share of bootstrap ``values`` (NaN bounds when there are none)."""
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
