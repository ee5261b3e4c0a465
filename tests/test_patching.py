"""Patch grid: exact area-weighted tissue fractions, grid rules, coordinate-file round trips."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from fedpath.client.config import ResolutionConfig, TissueConfig
from fedpath.client.wsi.patching import (
    PatchGrid,
    patch_grid,
    read_coords_h5,
    tissue_fractions,
    write_coords_h5,
)
from fedpath.client.wsi.reader import SlideInfo, WsiReader
from fedpath.client.wsi.resolution import plan_read
from fedpath.client.wsi.tissue import TissueMask, tissue_mask_for_slide
from fedpath.common.atomic import TMP_PREFIX
from fedpath.common.errors import FeatureBagError

CMU = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "slides"
CMU = CMU / "cmu-1-small-region.svs"


def make_mask(mask: np.ndarray, downsample: tuple[float, float]) -> TissueMask:
    thumb = np.where(mask[..., None], 150, 240).astype(np.uint8).repeat(3, axis=2)
    return TissueMask(mask=mask.astype(bool), downsample=downsample, thumbnail=thumb)


def overlap_lengths(start: float, stop: float, cells: int, cell: float) -> np.ndarray:
    """Length of [start, stop) inside each cell [k·cell, (k+1)·cell), k < cells."""
    lo = np.arange(cells) * cell
    return np.clip(np.minimum(stop, lo + cell) - np.maximum(start, lo), 0.0, None)


def brute_force_fraction(mask: TissueMask, x: int, y: int, size: int) -> float:
    """Tissue share of one patch from explicit per-pixel overlap areas."""
    rows, cols = mask.mask.shape
    dx, dy = mask.downsample
    wx = overlap_lengths(x, x + size, cols, dx)
    wy = overlap_lengths(y, y + size, rows, dy)
    return float(wy @ mask.mask.astype(np.float64) @ wx) / (size * size)


# ------------------------------------------------------------ exact fractions


@pytest.mark.parametrize(
    ("downsample", "size"),
    [((64.0, 64.0), 256), ((3.7, 2.9), 23), ((1.0, 1.0), 5), ((16.0, 16.0), 7), ((5.5, 8.25), 40)],
)
def test_fractions_match_brute_force_on_random_masks(
    downsample: tuple[float, float], size: int
) -> None:
    rng = np.random.default_rng(int(downsample[0] * 100) + size)
    mask = make_mask(rng.random((37, 53)) < 0.4, downsample)
    width, height = 53 * downsample[0], 37 * downsample[1]
    # Include positions that hang off the mask's right/bottom edge (counted as glass).
    xs = np.unique(rng.integers(0, int(width), size=15)).astype(np.int64)
    ys = np.unique(rng.integers(0, int(height), size=15)).astype(np.int64)
    fast = tissue_fractions(mask, xs, ys, size)
    assert fast.shape == (ys.size, xs.size)
    for r, y in enumerate(ys):
        for c, x in enumerate(xs):
            assert fast[r, c] == pytest.approx(brute_force_fraction(mask, x, y, size), abs=1e-9)


def test_aligned_patches_give_block_means() -> None:
    rng = np.random.default_rng(3)
    raw = rng.random((16, 16)) < 0.5
    mask = make_mask(raw, (4.0, 4.0))
    xs = np.arange(0, 64, 16, dtype=np.int64)
    fractions = tissue_fractions(mask, xs, xs, 16)
    blocks = raw.reshape(4, 4, 4, 4).mean(axis=(1, 3))
    assert np.allclose(fractions, blocks)


def test_partial_pixel_overlap_is_weighted_not_snapped() -> None:
    # One tissue mask pixel (64 level-0 px wide) at column 1; a 256-px patch starting at x=96
    # covers 32 of its 64 columns: 32·64 / 256² = 1/32. Snapping to whole pixels would say
    # the patch covers the whole pixel (1/16).
    raw = np.zeros((4, 8), dtype=bool)
    raw[0, 1] = True
    mask = make_mask(raw, (64.0, 64.0))
    value = tissue_fractions(mask, np.array([96]), np.array([0]), 256)[0, 0]
    assert value == pytest.approx(1 / 32)


# ------------------------------------------------------------ grid rules


def block_mask() -> TissueMask:
    raw = np.zeros((40, 60), dtype=bool)
    raw[5:30, 10:50] = True
    raw[12:18, 20:30] = False  # a hole
    return make_mask(raw, (64.0, 64.0))


def test_grid_equals_brute_force_selection() -> None:
    mask = block_mask()
    dims = (60 * 64, 40 * 64)
    grid = patch_grid(mask, dims, 256, 256, 0.25)
    expected = []
    for y in range(5 * 64, 30 * 64, 256):
        for x in range(10 * 64, 50 * 64, 256):
            if x + 256 <= dims[0] and y + 256 <= dims[1]:
                fraction = brute_force_fraction(mask, x, y, 256)
                if fraction >= 0.25:
                    expected.append((x, y, fraction))
    assert grid.coords.dtype == np.int64
    assert grid.tissue_fraction.dtype == np.float32
    assert grid.coords.tolist() == [[x, y] for x, y, _ in expected]
    assert np.allclose(grid.tissue_fraction, [f for _, _, f in expected], atol=1e-6)
    assert (grid.patch_size_level0, grid.step_level0) == (256, 256)


def test_grid_is_row_major_anchored_at_tissue_and_inside_slide() -> None:
    mask = block_mask()
    dims = (50 * 64 + 100, 30 * 64 + 10)  # slide ends just after the tissue
    grid = patch_grid(mask, dims, 300, 200, 0.0)
    xs, ys = grid.coords[:, 0], grid.coords[:, 1]
    order = np.lexsort((xs, ys))
    assert np.array_equal(order, np.arange(len(grid)))
    assert xs.min() == 10 * 64
    assert ys.min() == 5 * 64
    assert np.all((xs - 640) % 200 == 0)
    assert np.all((ys - 320) % 200 == 0)
    assert np.all(xs + 300 <= dims[0])
    assert np.all(ys + 300 <= dims[1])
    # min fraction 0 keeps every candidate: a full rectangular grid.
    assert len(grid) == len(np.unique(xs)) * len(np.unique(ys))


def test_threshold_is_inclusive() -> None:
    raw = np.zeros((8, 8), dtype=bool)
    raw[0:2, 0:2] = True  # exactly 4 of the 16 mask px under the first 256-px patch
    raw[4:8, 4:8] = True
    mask = make_mask(raw, (64.0, 64.0))
    kept = patch_grid(mask, (512, 512), 256, 256, 0.25)
    assert kept.coords.tolist() == [[0, 0], [256, 256]]
    assert kept.tissue_fraction.tolist() == [0.25, 1.0]
    stricter = patch_grid(mask, (512, 512), 256, 256, 0.26)
    assert stricter.coords.tolist() == [[256, 256]]


def test_overlap_step_gives_more_patches() -> None:
    mask = block_mask()
    dims = (60 * 64, 40 * 64)
    plain = patch_grid(mask, dims, 256, 256, 0.25)
    dense = patch_grid(mask, dims, 256, 128, 0.25)
    assert len(dense) > 3 * len(plain)
    assert set(map(tuple, plain.coords.tolist())) <= set(map(tuple, dense.coords.tolist()))


def test_empty_mask_gives_empty_grid() -> None:
    mask = make_mask(np.zeros((10, 10), dtype=bool), (64.0, 64.0))
    grid = patch_grid(mask, (640, 640), 256, 256, 0.25)
    assert grid.coords.shape == (0, 2)
    assert grid.coords.dtype == np.int64
    assert grid.tissue_fraction.shape == (0,)
    assert len(grid) == 0


def test_slide_smaller_than_patch_gives_empty_grid() -> None:
    mask = make_mask(np.ones((2, 2), dtype=bool), (64.0, 64.0))
    assert len(patch_grid(mask, (128, 128), 256, 256, 0.25)) == 0


def test_invalid_sizes_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        patch_grid(block_mask(), (100, 100), 0, 256, 0.25)


# ------------------------------------------------------------ coordinate files


def slide_info(objective_power: float | None = 40.0) -> SlideInfo:
    return SlideInfo(
        path=Path("/slides/s1.tif"),
        slide_id="s1",
        vendor="generic-tiff",
        dimensions=(8000, 6000),
        level_dimensions=((8000, 6000), (2000, 1500)),
        level_downsamples=(1.0, 4.0),
        mpp=0.25,
        mpp_source="slide",
        objective_power=objective_power,
    )


def small_grid() -> PatchGrid:
    return PatchGrid(
        coords=np.array([[0, 0], [512, 0], [0, 512]], dtype=np.int64),
        tissue_fraction=np.array([0.5, 1.0, 0.25], dtype=np.float32),
        patch_size_level0=512,
        step_level0=512,
    )


def test_write_and_read_coords_round_trip(tmp_path: Path) -> None:
    info = slide_info()
    plan = plan_read(info.mpp, info.level_downsamples, ResolutionConfig())
    path = tmp_path / "patches" / "s1.h5"
    write_coords_h5(path, small_grid(), plan, info)
    assert [p.name for p in path.parent.iterdir()] == ["s1.h5"]
    with h5py.File(path, "r") as fh:
        assert fh["coords"].dtype == np.int64
        assert fh["tissue_fraction"].dtype == np.float32
        attrs = dict(fh["coords"].attrs)
        assert attrs["patch_size"] == 512  # read size at level 0 for 0.25 µm/px
        assert attrs["patch_level"] == 0
        assert attrs["downsample"] == 1.0
        assert attrs["level_dim"].tolist() == [8000, 6000]
        assert attrs["patch_size_level0"] == 512
        assert attrs["step_level0"] == 512
        assert attrs["target_patch_size"] == 256
        assert attrs["target_mpp"] == 0.5
        assert attrs["level0_mpp"] == 0.25
        assert attrs["level0_magnification"] == 40.0
        assert attrs["name"] == "s1"
        assert fh.attrs["patch_size_level0"] == 512  # also at the root
    grid, read_attrs = read_coords_h5(path)
    assert np.array_equal(grid.coords, small_grid().coords)
    assert np.array_equal(grid.tissue_fraction, small_grid().tissue_fraction)
    assert (grid.patch_size_level0, grid.step_level0) == (512, 512)
    assert read_attrs["name"] == "s1"
    assert read_attrs["level_dim"] == [8000, 6000]


def test_level_attrs_follow_the_plan(tmp_path: Path) -> None:
    info = slide_info(objective_power=None)
    plan = plan_read(info.mpp, info.level_downsamples, ResolutionConfig(target_mpp=1.0))
    path = tmp_path / "s1.h5"
    write_coords_h5(path, small_grid(), plan, info)
    with h5py.File(path, "r") as fh:
        attrs = dict(fh["coords"].attrs)
    assert attrs["patch_level"] == 1
    assert attrs["downsample"] == 4.0
    assert attrs["level_dim"].tolist() == [2000, 1500]
    assert attrs["patch_size"] == 256
    assert "level0_magnification" not in attrs


def test_mismatched_grid_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    info = slide_info()
    plan = plan_read(info.mpp, info.level_downsamples, ResolutionConfig())
    bad = PatchGrid(
        coords=np.zeros((3, 2), dtype=np.int64),
        tissue_fraction=np.zeros(2, dtype=np.float32),
        patch_size_level0=512,
        step_level0=512,
    )
    with pytest.raises(FeatureBagError, match="same patches"):
        write_coords_h5(tmp_path / "s1.h5", bad, plan, info)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    info = slide_info()
    plan = plan_read(info.mpp, info.level_downsamples, ResolutionConfig())
    broken = SlideInfo(**{**info.__dict__, "level_dimensions": ()})  # level lookup fails
    with pytest.raises(IndexError):
        write_coords_h5(tmp_path / "s1.h5", small_grid(), plan, broken)
    assert not any(p.name.startswith(TMP_PREFIX) or p.suffix == ".h5" for p in tmp_path.iterdir())


def test_read_clam_style_file(tmp_path: Path) -> None:
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as fh:
        dset = fh.create_dataset("coords", data=np.array([[0, 0], [1024, 0]], dtype=np.int32))
        dset.attrs["patch_size"] = 256
        dset.attrs["patch_level"] = 1
        dset.attrs["downsample"] = np.array([4.0, 4.0])
    grid, attrs = read_coords_h5(path)
    assert grid.coords.dtype == np.int64
    assert grid.patch_size_level0 == 1024
    assert grid.step_level0 == 1024
    assert np.isnan(grid.tissue_fraction).all()
    assert attrs["patch_level"] == 1


def test_read_malformed_files(tmp_path: Path) -> None:
    not_h5 = tmp_path / "x.h5"
    not_h5.write_text("nope")
    with pytest.raises(FeatureBagError, match="HDF5"):
        read_coords_h5(not_h5)
    no_coords = tmp_path / "y.h5"
    with h5py.File(no_coords, "w") as fh:
        fh.create_dataset("features", data=np.zeros((2, 3)))
    with pytest.raises(FeatureBagError, match="no 'coords'"):
        read_coords_h5(no_coords)
    wide = tmp_path / "z.h5"
    with h5py.File(wide, "w") as fh:
        fh.create_dataset("coords", data=np.zeros((2, 3)))
    with pytest.raises(FeatureBagError, match="N×2"):
        read_coords_h5(wide)


def test_real_slide_grid() -> None:
    if not CMU.exists():
        pytest.skip(f"shared test slide not available: {CMU}")
    cfg = TissueConfig.preset("biopsy")
    with WsiReader(CMU) as reader:
        mask = tissue_mask_for_slide(reader, cfg)
        plan = plan_read(reader.info.mpp, reader.info.level_downsamples, ResolutionConfig())
        grid = patch_grid(
            mask, reader.info.dimensions, plan.patch_size_level0, plan.step_level0, 0.25
        )
    assert 20 <= len(grid) <= 80
    assert np.all(grid.tissue_fraction >= 0.25)
    assert np.all(grid.coords + 256 <= np.array(reader.info.dimensions))
