"""Oversampling weights and per-step slide schedules (DESIGN §4.4, MS-CLAM)."""

from __future__ import annotations

import numpy as np
import pytest

from fedpath.common.mil.config import SupervisionConfig
from fedpath.common.mil.sampling import epoch_schedule, oversample_weights

CFG = SupervisionConfig()  # w0 = 90, decay 0.9, pairing on, tumour class 1


def test_weights_decay_per_epoch_and_floor_at_one() -> None:
    annotated = np.array([True, False, True])
    np.testing.assert_allclose(oversample_weights(annotated, 0, CFG), [90.0, 1.0, 90.0])
    np.testing.assert_allclose(oversample_weights(annotated, 1, CFG), [81.0, 1.0, 81.0])
    np.testing.assert_allclose(oversample_weights(annotated, 2, CFG), [72.9, 1.0, 72.9])
    # 90·0.9^43 = 0.970 < 1 -> floored; 90·0.9^42 = 1.078 is not
    np.testing.assert_allclose(
        oversample_weights(annotated, 42, CFG), [90 * 0.9**42, 1, 90 * 0.9**42]
    )
    np.testing.assert_allclose(oversample_weights(annotated, 43, CFG), [1.0, 1.0, 1.0])
    flat = SupervisionConfig(oversample_weight=5.0, oversample_decay=1.0)
    np.testing.assert_allclose(oversample_weights(annotated, 100, flat), [5.0, 1.0, 5.0])


def test_weights_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        oversample_weights(np.array([1, 0]), 0, CFG)
    with pytest.raises(ValueError):
        oversample_weights(np.array([[True]]), 0, CFG)
    with pytest.raises(ValueError):
        oversample_weights(np.array([True]), -1, CFG)


def test_pairs_one_normal_and_one_tumour_per_step() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    annotated = np.array([False, False, True, False, False])
    schedule = epoch_schedule(labels, annotated, 0, CFG, np.random.default_rng(0))
    assert len(schedule) == 3  # ceil(5 / 2)
    for normal, tumour in schedule:
        assert labels[normal] == 0 and labels[tumour] == 1
    schedule = epoch_schedule(labels, annotated, 0, CFG, np.random.default_rng(0), steps=7)
    assert len(schedule) == 7 and all(len(step) == 2 for step in schedule)
    assert epoch_schedule(labels, annotated, 0, CFG, np.random.default_rng(0), steps=0) == []


def test_single_slides_with_one_class_or_pairing_off() -> None:
    annotated = np.zeros(4, dtype=bool)
    only_tumour = epoch_schedule(np.ones(4, int), annotated, 0, CFG, np.random.default_rng(1))
    assert len(only_tumour) == 4 and all(len(s) == 1 and 0 <= s[0] < 4 for s in only_tumour)
    only_normal = epoch_schedule(np.zeros(4, int), annotated, 0, CFG, np.random.default_rng(1))
    assert len(only_normal) == 4 and all(len(s) == 1 for s in only_normal)
    unpaired = SupervisionConfig(pair_normal_tumour=False)
    labels = np.array([0, 1, 0, 1])
    steps = epoch_schedule(labels, annotated, 0, unpaired, np.random.default_rng(1), steps=9)
    assert len(steps) == 9 and all(len(s) == 1 for s in steps)


def test_schedule_is_deterministic_for_a_seed() -> None:
    labels = np.array([0, 1, 0, 1, 1, 0, 1])
    annotated = np.array([False, True, False, False, True, False, False])
    a = epoch_schedule(labels, annotated, 3, CFG, np.random.default_rng(42), steps=50)
    b = epoch_schedule(labels, annotated, 3, CFG, np.random.default_rng(42), steps=50)
    c = epoch_schedule(labels, annotated, 3, CFG, np.random.default_rng(43), steps=50)
    assert a == b and a != c


def test_annotated_slides_drawn_about_w_times_as_often() -> None:
    # one annotated slide among ten, epoch 0 (w = 90): expected count ratio 90
    labels = np.ones(10, dtype=int)
    annotated = np.zeros(10, dtype=bool)
    annotated[3] = True
    steps = epoch_schedule(labels, annotated, 0, CFG, np.random.default_rng(7), steps=40_000)
    counts = np.bincount([s[0] for s in steps], minlength=10)
    ratio = counts[3] / np.delete(counts, 3).mean()
    assert 81 < ratio < 99
    # epoch 1 (w = 81) and within-class drawing when pairing
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    annotated = np.array([True, False, False, False, False, True, False, False, False])
    steps = epoch_schedule(labels, annotated, 1, CFG, np.random.default_rng(7), steps=40_000)
    normal_counts = np.bincount([s[0] for s in steps], minlength=9)
    tumour_counts = np.bincount([s[1] for s in steps], minlength=9)
    assert 73 < normal_counts[0] / normal_counts[1:4].mean() < 89
    assert 73 < tumour_counts[5] / tumour_counts[[4, 6, 7, 8]].mean() < 89


def test_schedule_rejects_bad_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        epoch_schedule(np.array([0, 1]), np.array([True]), 0, CFG, rng)
    with pytest.raises(ValueError):
        epoch_schedule(np.array([], dtype=int), np.array([], dtype=bool), 0, CFG, rng)
    with pytest.raises(ValueError):
        epoch_schedule(np.array([0, 1]), np.array([True, False]), 0, CFG, rng, steps=-1)
