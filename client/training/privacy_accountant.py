"""ε of slide-level DP-SGD from its history, with Opacus' accountants (DESIGN §4.5).

A history is the list Opacus keeps itself: one ``(noise multiplier, sample rate, steps)``
triple per stretch of training with fixed settings. fedpath records one triple per federated
round, so composing across rounds, runs and even differently configured runs on the same
slides is just composing their histories: RDP composes additively, so ε of the concatenated
history is at most (and usually well below) the sum of the runs' separate ε's.

The sampling plan follows the DP-SGD analysis Opacus' accountants assume: every step samples
each slide independently with probability q = B/N (Poisson), and an epoch is N/B such steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

from fedpath.common.dp_config import Accountant
from fedpath.common.errors import ConfigError

__all__ = [
    "Mechanism",
    "check_delta",
    "epsilon",
    "sampling_plan",
    "solve_noise_multiplier",
]


@dataclass(frozen=True)
class Mechanism:
    """One stretch of DP-SGD with fixed settings: ``steps`` noisy steps at sampling rate q."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_tuple(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def sampling_plan(n_slides: int, expected_batch: int) -> tuple[float, int]:
    """``(q, steps per epoch)`` for Poisson sampling of ``expected_batch`` of ``n_slides``.

    q = min(1, B/N) and an epoch is round(N/B) ≥ 1 steps, so one epoch still visits each
    slide once in expectation (q · steps ≈ 1). A site smaller than the batch samples every
    slide every step (q = 1): no amplification by sampling, which its ε then shows.
    """
    if n_slides < 1:
        raise ConfigError("DP-SGD needs at least one training slide")
    if expected_batch < 1:
        raise ConfigError(f"the expected batch must be >= 1 slide; got {expected_batch}")
    if expected_batch >= n_slides:
        return 1.0, 1
    return expected_batch / n_slides, max(1, round(n_slides / expected_batch))


@functools.lru_cache(maxsize=64)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """Opacus' RDP curve of one step of the subsampled Gaussian, over its default orders.

    RDP is linear in the number of steps, so one curve per (σ, q) serves every history
    (computing it is what costs time: ~0.3 s, at every order); the result is exactly what
    ``RDPAccountant.get_epsilon`` computes for the same history.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    curve = analysis.compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )
    return tuple(float(v) for v in curve)


def _rdp_epsilon(merged: dict[tuple[float, float], int], delta: float) -> float:
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    total = sum(np.asarray(_rdp_per_step(s, q)) * n for (s, q), n in merged.items())
    eps, _ = analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
    return float(eps)


def _prv_epsilon(merged: dict[tuple[float, float], int], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(s, q, n) for (s, q), n in merged.items()]
    return float(accountant.get_epsilon(delta=delta))


def epsilon(history: Iterable[Mechanism], delta: float, accountant: Accountant = "rdp") -> float:
    """ε at ``delta`` after every mechanism of ``history`` (0 for an empty history).

    A mechanism without noise (σ = 0) has no finite ε; the result is then ``inf``.
    """
    steps = [m for m in history if m.steps > 0]
    if not steps:
        return 0.0
    if any(m.noise_multiplier <= 0 for m in steps):
        return math.inf
    # Stretches with the same (σ, q) compose into one with their steps added (exactly: the
    # accountants' cost is linear in the steps of a fixed mechanism), and computing the RDP
    # curve of one stretch is what costs time, so a long ledger stays fast to account.
    merged: dict[tuple[float, float], int] = {}
    for m in steps:
        merged[(m.noise_multiplier, m.sample_rate)] = (
            merged.get((m.noise_multiplier, m.sample_rate), 0) + m.steps
        )
    if accountant == "rdp":
        return _rdp_epsilon(merged, delta)
    if accountant == "prv":
        return _prv_epsilon(merged, delta)
    raise ConfigError(f"unknown accountant {accountant!r}; use rdp or prv")


@functools.lru_cache(maxsize=32)
def solve_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
) -> float:
    """σ for which ``steps`` steps at sampling rate q spend at most ``target_epsilon``.

    Opacus' ``get_noise_multiplier`` (a bisection over its accountant, ε within 0.01 below the
    target). A run solves it once for all its planned rounds, so every round uses the same σ.
    Cached: the bisection takes up to ~1.6 s at ε = 8 and a round's message planned it twice
    (the client's budget check, then the trainer); the arguments fully determine the result.
    """
    if target_epsilon <= 0:
        raise ConfigError(f"the target ε must be > 0; got {target_epsilon}")
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except ValueError as exc:
        raise ConfigError(f"no noise multiplier reaches ε = {target_epsilon}: {exc}") from exc


def check_delta(delta: float, n_slides: int) -> None:
    """Refuse δ ≥ 1/N: such a δ allows releasing one slide's data outright with probability δ
    per slide and still 'satisfy' (ε, δ)-DP, so it is no guarantee at all for N slides."""
    if not 0 < delta < 1:
        raise ConfigError(f"δ must be in (0, 1); got {delta}")
    if delta * n_slides >= 1:
        raise ConfigError(
            f"δ = {delta:g} is not below 1/N = 1/{n_slides} for this site's {n_slides} "
            f"training slides; use δ < {1 / n_slides:.2g} (e.g. 1e-5)"
        )
