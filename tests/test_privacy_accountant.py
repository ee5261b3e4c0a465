"""The accountant against the reference values of DESIGN §4.5 (Opacus RDP, δ = 1e-5)."""

from __future__ import annotations

import itertools
import math

import pytest

from fedpath.client.training.privacy_accountant import (
    Mechanism,
    check_delta,
    epsilon,
    sampling_plan,
    solve_noise_multiplier,
)
from fedpath.common.errors import ConfigError


def _dp_sgd(n: int, batch: int, sigma: float, epochs: int) -> list[Mechanism]:
    """The textbook setting the references use: q = B/N, epochs·N/B steps."""
    return [Mechanism(sigma, batch / n, int(epochs * n / batch))]


@pytest.mark.parametrize(
    ("n", "batch", "sigma", "epochs", "reference"),
    [
        (300, 16, 1.0, 50, 12.5),
        (300, 16, 1.5, 50, 6.3),
        (300, 16, 2.0, 50, 4.2),
        (1000, 32, 1.0, 50, 9.2),
        (60000, 256, 1.1, 60, 2.60),
        (60000, 256, 1.1, 15, 1.28),
    ],
)
def test_rdp_matches_the_design_references_within_one_percent(
    n: int, batch: int, sigma: float, epochs: int, reference: float
) -> None:
    assert epsilon(_dp_sgd(n, batch, sigma, epochs), 1e-5, "rdp") == pytest.approx(
        reference, rel=0.01
    )


@pytest.mark.slow
def test_prv_is_a_tighter_accountant_of_the_same_history() -> None:
    history = _dp_sgd(300, 16, 1.0, 50)
    prv = epsilon(history, 1e-5, "prv")
    assert 0.8 * epsilon(history, 1e-5, "rdp") < prv < epsilon(history, 1e-5, "rdp")


def test_composition_grows_strictly_and_beats_adding_epsilons() -> None:
    one = Mechanism(1.0, 16 / 300, 19)
    spent = [epsilon([one] * k, 1e-5) for k in range(1, 6)]
    assert all(b > a for a, b in itertools.pairwise(spent))
    assert spent[-1] < 5 * spent[0], "RDP composition is tighter than summing ε"
    assert epsilon([], 1e-5) == 0.0
    assert math.isinf(epsilon([Mechanism(0.0, 0.1, 10)], 1e-5)), "no noise, no guarantee"


@pytest.mark.slow
def test_solved_sigma_reaches_the_target() -> None:
    sigma = solve_noise_multiplier(8.0, 1e-5, 16 / 300, 950)
    assert 7.9 < epsilon([Mechanism(sigma, 16 / 300, 950)], 1e-5) <= 8.0
    with pytest.raises(ConfigError):
        solve_noise_multiplier(0.0, 1e-5, 0.1, 10)


def test_sampling_plan_and_delta_checks() -> None:
    assert sampling_plan(300, 16) == (pytest.approx(16 / 300), 19)
    assert sampling_plan(6, 16) == (1.0, 1), "a site smaller than the batch takes every slide"
    with pytest.raises(ConfigError):
        sampling_plan(0, 16)
    check_delta(1e-5, 300)
    with pytest.raises(ConfigError, match="not below 1/N"):
        check_delta(1e-2, 300)
    with pytest.raises(ConfigError):
        check_delta(0.0, 300)


@pytest.mark.slow
def test_the_cached_rdp_curve_is_opacus_rdp_accountant() -> None:
    from opacus.accountants import RDPAccountant

    history = [Mechanism(1.0, 0.05, 40), Mechanism(1.3, 0.1, 7), Mechanism(1.0, 0.05, 9)]
    accountant = RDPAccountant()
    accountant.history = [m.as_tuple() for m in history]
    assert epsilon(history, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.slow
def test_solving_sigma_twice_for_one_plan_bisects_once() -> None:
    """A round's message plans its DP-SGD twice (budget check, trainer): one bisection."""
    from fedpath.client.training.privacy_accountant import solve_noise_multiplier

    solve_noise_multiplier.cache_clear()
    first = solve_noise_multiplier(8.0, 1e-5, 0.25, 40)
    assert solve_noise_multiplier(8.0, 1e-5, 0.25, 40) == first
    info = solve_noise_multiplier.cache_info()
    assert (info.hits, info.misses) == (1, 1)
