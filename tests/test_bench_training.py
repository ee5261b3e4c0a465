"""bench.training's speed-up at equal validation loss, on hand-made epoch records."""

from __future__ import annotations

import pytest

from bench.interleave import ArmEpoch
from bench.training import equal_loss_speedup, seconds_to_loss
from fedpath.client.training.trainer import ValidationMetrics


def _epochs(*pairs: tuple[float, float]) -> list[ArmEpoch]:
    """(seconds, validation loss) per epoch."""
    return [
        ArmEpoch(seconds, 10, loss, ValidationMetrics(loss=loss, auc=0.5, patch_auc=0.5))
        for seconds, loss in pairs
    ]


def test_seconds_to_loss_interpolates_within_the_crossing_epoch() -> None:
    epochs = _epochs((10.0, 0.6), (10.0, 0.4), (10.0, 0.3))
    # 0.5 lies halfway between 0.6 (after epoch 0) and 0.4 (after epoch 1).
    assert seconds_to_loss(epochs, initial_loss=0.7, target=0.5) == pytest.approx(15.0)
    # Crossed inside the first epoch: interpolated from the loss before training.
    assert seconds_to_loss(epochs, initial_loss=0.7, target=0.65) == pytest.approx(5.0)
    assert seconds_to_loss(epochs, initial_loss=0.7, target=0.3) == pytest.approx(30.0)
    assert seconds_to_loss(epochs, initial_loss=0.7, target=0.2) is None  # never reached
    assert seconds_to_loss(epochs, initial_loss=0.7, target=0.8) == 0.0  # no training needed


def test_seconds_to_loss_ignores_a_rise_before_the_crossing() -> None:
    # The loss went up in epoch 1; the crossing in epoch 2 interpolates from that higher loss.
    epochs = _epochs((10.0, 0.5), (10.0, 0.7), (10.0, 0.3))
    assert seconds_to_loss(epochs, initial_loss=0.8, target=0.4) == pytest.approx(27.5)


def test_equal_loss_speedup_charges_each_arm_for_reaching_ours_best_loss() -> None:
    ours = _epochs((4.0, 0.6), (4.0, 0.5), (4.0, 0.45))
    # The baseline is slower per epoch but better per epoch: it reaches 0.45 inside epoch 2.
    baseline = _epochs((12.0, 0.55), (12.0, 0.5), (12.0, 0.4))
    result = equal_loss_speedup(ours, baseline, initial_loss=0.7)
    assert result is not None and result.reached
    assert result.target_loss == 0.45
    assert result.ours_seconds == pytest.approx(12.0)
    assert result.baseline_seconds == pytest.approx(24.0 + 0.5 * 12.0)
    assert result.ratio == pytest.approx(2.5)  # below the per-epoch ratio of 3


def test_equal_loss_speedup_is_a_lower_bound_when_the_baseline_never_gets_there() -> None:
    ours = _epochs((4.0, 0.5), (4.0, 0.3))
    baseline = _epochs((12.0, 0.6), (12.0, 0.5))
    result = equal_loss_speedup(ours, baseline, initial_loss=0.7)
    assert result is not None and not result.reached
    assert result.baseline_seconds == 24.0
    assert result.ratio == pytest.approx(3.0)


def test_equal_loss_speedup_targets_ours_best_epoch_not_its_last() -> None:
    ours = _epochs((4.0, 0.5), (4.0, 0.4), (4.0, 0.45))  # best after epoch 1, as kept
    baseline = _epochs((12.0, 0.45), (12.0, 0.4))
    result = equal_loss_speedup(ours, baseline, initial_loss=0.7)
    assert result is not None and result.target_loss == 0.4
    assert result.ours_seconds == pytest.approx(8.0)
    assert result.ratio == pytest.approx(3.0)


def test_equal_loss_speedup_is_none_when_ours_never_improved() -> None:
    assert equal_loss_speedup(_epochs((4.0, 0.8)), _epochs((12.0, 0.5)), initial_loss=0.7) is None
