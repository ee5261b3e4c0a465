"""FedAvg / FedMix weights and the weighted average against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from fedpath.server.aggregation import fedavg_weights, fedmix_weights, weighted_average


def test_fedavg_weights_are_slide_shares() -> None:
    np.testing.assert_allclose(fedavg_weights([10, 30, 60]), [0.1, 0.3, 0.6])


def test_fedmix_weights_hand_computed() -> None:
    # d = [0.25, 0.75]; L^1.5 = [1, 0.353553]; s = [0.738796, 0.261204];
    # w~ = d + 10 s = [7.637958, 3.362042]; w = w~ / 11.
    w = fedmix_weights([10, 30], [1.0, 0.5], lam=10.0, beta=1.5)
    np.testing.assert_allclose(w, [0.6943601, 0.3056399], atol=1e-7)
    assert w.sum() == pytest.approx(1.0)


def test_fedmix_with_lambda_zero_is_fedavg() -> None:
    np.testing.assert_allclose(
        fedmix_weights([3, 7], [0.2, 0.9], lam=0.0, beta=3.0), fedavg_weights([3, 7])
    )


def test_fedmix_higher_loss_gets_more_weight() -> None:
    w = fedmix_weights([10, 10, 10], [0.1, 0.2, 0.8], lam=2.0, beta=3.0)
    assert w[2] > w[1] > w[0]


def test_fedmix_falls_back_to_data_term_when_a_loss_is_not_finite() -> None:
    np.testing.assert_allclose(
        fedmix_weights([1, 3], [np.nan, 0.5], lam=10.0, beta=1.5), [0.25, 0.75]
    )


def test_fedmix_negative_loss_is_clipped_not_powered() -> None:
    w = fedmix_weights([1, 1], [-0.5, 1.0], lam=10.0, beta=1.5)
    # s = [0, 1]; w~ = [0.5, 10.5]; w = [0.5/11, 10.5/11]
    np.testing.assert_allclose(w, [0.5 / 11, 10.5 / 11])


@pytest.mark.parametrize(
    ("counts", "losses", "lam", "beta"),
    [
        ([], [], 1.0, 1.0),
        ([0, 0], [1, 1], 1.0, 1.0),
        ([1, -1], [1, 1], 1.0, 1.0),
        ([1, 1], [1], 1.0, 1.0),
        ([1, 1], [1, 1], -1.0, 1.0),
        ([1, 1], [1, 1], 1.0, 0.0),
    ],
)
def test_fedmix_rejects_bad_inputs(counts, losses, lam, beta) -> None:
    with pytest.raises(ValueError):
        fedmix_weights(counts, losses, lam, beta)


def test_weighted_average_hand_computed_and_keeps_float32() -> None:
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "step": np.array(5, dtype=np.int64)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32), "step": np.array(9, dtype=np.int64)}
    out = weighted_average([a, b], [0.25, 0.75])
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], np.array([2.5, 5.0], dtype=np.float32))
    assert out["step"].dtype == np.int64 and int(out["step"]) == 5


def test_weighted_average_keeps_float16() -> None:
    a = {"w": np.ones(3, dtype=np.float16)}
    out = weighted_average([a, a], [0.5, 0.5])
    assert out["w"].dtype == np.float16


def test_weighted_average_refuses_mismatched_sites() -> None:
    a = {"w": np.zeros(2, dtype=np.float32)}
    with pytest.raises(ValueError, match="different array names"):
        weighted_average([a, {"v": np.zeros(2, dtype=np.float32)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="shape"):
        weighted_average([a, {"w": np.zeros(3, dtype=np.float32)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="sum to 1"):
        weighted_average([a, a], [0.5, 0.6])
