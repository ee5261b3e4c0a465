"""Read plans for many pyramids: level choice, read size, rounding rule, level-0 footprint."""

from __future__ import annotations

import pytest

from fedpath.client.config import ResolutionConfig
from fedpath.client.wsi.resolution import plan_read, round_half_up

DEFAULT = ResolutionConfig()


def test_40x_pyramid_reads_level0_at_double_size() -> None:
    plan = plan_read(0.25, [1.0, 4.0, 16.0], DEFAULT)
    assert plan.level == 0
    assert plan.read_size == 512
    assert plan.patch_size == 256
    assert plan.patch_size_level0 == 512
    assert plan.step_level0 == 512
    assert plan.level_mpp == pytest.approx(0.25)
    assert plan.needs_resize


def test_20x_slide_reads_exact_patch_without_resize() -> None:
    plan = plan_read(0.5, [1.0, 4.0, 16.0], DEFAULT)
    assert (plan.level, plan.read_size, plan.patch_size_level0) == (0, 256, 256)
    assert not plan.needs_resize


def test_mpp_within_tolerance_is_read_at_patch_size_not_257() -> None:
    # 256 · 0.5 / 0.499 = 256.51 would round to 257; within tolerance the level *is* 0.5 µm/px.
    plan = plan_read(0.499, [1.0], DEFAULT)
    assert plan.read_size == 256
    assert plan.patch_size_level0 == 256
    assert not plan.needs_resize


def test_mpp_outside_tolerance_is_resized_with_half_up_rounding() -> None:
    # 0.44 is 12 % finer than 0.5 (> 10 %): read round_half_up(256 · 0.5 / 0.44) = 291.
    plan = plan_read(0.44, [1.0], DEFAULT)
    assert plan.read_size == 291
    assert plan.patch_size_level0 == 291
    assert plan.needs_resize
    # 257 · 0.5 / 1.0 = 128.5 exactly: half-up gives 129 (banker's rounding would give 128).
    upsampled = plan_read(1.0, [1.0], ResolutionConfig(patch_size=257))
    assert upsampled.read_size == 129
    assert round_half_up(256.5) == 257
    assert round_half_up(255.5) == 256
    assert round_half_up(256.49) == 256


def test_downsample_two_levels_pick_level1_at_native_size() -> None:
    plan = plan_read(0.25, [1.0, 2.0, 4.0, 8.0], DEFAULT)
    assert plan.level == 1
    assert plan.read_size == 256
    assert plan.level_downsample == 2.0
    assert plan.patch_size_level0 == 512
    assert plan.level_mpp == pytest.approx(0.5)


def test_target_one_micron_on_40x_pyramid() -> None:
    cfg = ResolutionConfig(target_mpp=1.0)
    plan = plan_read(0.25, [1.0, 4.0, 16.0], cfg)
    assert (plan.level, plan.read_size, plan.patch_size_level0) == (1, 256, 1024)
    plan2 = plan_read(0.25, [1.0, 2.0, 4.0, 8.0], cfg)
    assert (plan2.level, plan2.read_size, plan2.patch_size_level0) == (2, 256, 1024)


def test_level0_coarser_than_target_upsamples_from_level0() -> None:
    plan = plan_read(1.0, [1.0, 2.0005], DEFAULT)
    assert plan.level == 0
    assert plan.read_size == 128
    assert plan.patch_size == 256
    assert plan.patch_size_level0 == 128
    assert plan.needs_resize


def test_never_upsamples_when_a_finer_level_exists() -> None:
    # Levels at 0.25, 0.75, 3.0 µm/px: 0.75 is coarser than 0.5·1.1, so read 0.25 and shrink.
    plan = plan_read(0.25, [1.0, 3.0, 12.0], DEFAULT)
    assert plan.level == 0
    assert plan.read_size == 512


def test_coarser_level_just_inside_tolerance_is_used() -> None:
    # 0.55 = 0.5·(1 + 0.1) exactly: float rounding must not push it out of tolerance.
    plan = plan_read(0.275, [1.0, 2.0], DEFAULT)
    assert plan.level == 1
    assert plan.read_size == 256
    assert plan.patch_size_level0 == 512


def test_non_integer_downsample_footprint_rounds_half_up() -> None:
    plan = plan_read(0.25, [1.0, 2.0005055500659967], DEFAULT)
    assert plan.level == 1
    assert plan.read_size == 256
    assert plan.patch_size_level0 == round_half_up(256 * 2.0005055500659967) == 512


def test_overlap_gives_smaller_step() -> None:
    cfg = ResolutionConfig(overlap=64)
    plan = plan_read(0.25, [1.0, 4.0], cfg)
    assert plan.patch_size_level0 == 512
    assert plan.step_level0 == 384
    plan_native = plan_read(0.5, [1.0], cfg)
    assert plan_native.step_level0 == 192


def test_footprint_matches_physical_size() -> None:
    for mpp, downsamples in [(0.2527, [1, 4, 16]), (0.1, [1, 2, 4, 8]), (0.46, [1, 4])]:
        plan = plan_read(mpp, [float(d) for d in downsamples], DEFAULT)
        physical = plan.patch_size_level0 * mpp
        expected = 256 * 0.5
        assert physical == pytest.approx(expected, rel=0.1 + 0.01)
        assert plan.level_mpp <= 0.5 * 1.1 + 1e-9


@pytest.mark.parametrize(
    ("mpp", "downsamples"), [(0.0, [1.0]), (-1.0, [1.0]), (float("nan"), [1.0]), (0.5, [])]
)
def test_invalid_inputs_raise(mpp: float, downsamples: list[float]) -> None:
    with pytest.raises(ValueError):
        plan_read(mpp, downsamples, DEFAULT)
