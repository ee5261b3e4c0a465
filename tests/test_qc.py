"""QC picture (PNG) and QuPath tissue contours (GeoJSON)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from shapely.geometry import Point, shape

from fedpath.client.wsi.patching import PatchGrid, patch_grid
from fedpath.client.wsi.qc import (
    QC_MAX_SIDE,
    TISSUE_OUTLINE,
    render_qc_image,
    render_qc_png,
    tissue_contours_geojson,
)
from fedpath.client.wsi.tissue import TissueMask

GREY = 150


def make_mask(raw: np.ndarray, downsample: tuple[float, float] = (64.0, 64.0)) -> TissueMask:
    thumb = np.where(raw[..., None], GREY, 245).astype(np.uint8).repeat(3, axis=2)
    return TissueMask(mask=raw.astype(bool), downsample=downsample, thumbnail=thumb)


def block_mask() -> TissueMask:
    raw = np.zeros((20, 30), dtype=bool)
    raw[2:18, 4:28] = True
    return make_mask(raw)


# ------------------------------------------------------------ PNG


def test_png_is_written_enlarged_with_banner(tmp_path: Path) -> None:
    mask = block_mask()
    grid = patch_grid(mask, (30 * 64, 20 * 64), 256, 256, 0.25)
    path = tmp_path / "qc" / "s1.png"
    render_qc_png(path, mask, grid, title="slide s1")
    assert [p.name for p in path.parent.iterdir()] == ["s1.png"]
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None
    scale = 27  # ceil(800 / 30): small masks are enlarged by an integer factor
    assert image.shape == (20 * scale + 56, 30 * scale, 3)
    assert (image[:56] < 128).any()  # title text in the banner


def test_labels_colour_patches_and_outline_is_drawn() -> None:
    mask = block_mask()
    grid = patch_grid(mask, (30 * 64, 20 * 64), 256, 256, 0.25)
    labels = np.array([1, 0, -1] * (len(grid) // 3 + 1), dtype=np.int8)[: len(grid)]
    rgb = render_qc_image(mask, grid, title="labels", patch_labels=labels)
    scale = 27
    banner = 56

    def centre_colour(index: int) -> np.ndarray:
        x, y = grid.coords[index] + 128
        return rgb[banner + int(y / 64 * scale), int(x / 64 * scale)].astype(int)

    tumour, normal, unknown = centre_colour(0), centre_colour(1), centre_colour(2)
    assert tumour[0] > tumour[2] + 40  # red tint
    assert normal[2] > normal[0] + 40  # blue tint
    assert unknown[0] > unknown[2] + 40 and unknown[1] > unknown[2] + 40  # yellow tint
    outline = np.all(rgb == np.array(TISSUE_OUTLINE[::-1]), axis=2)
    assert outline.sum() > 100
    # Without labels every patch gets the same tint.
    plain = render_qc_image(mask, grid, title="plain")
    x, y = grid.coords[0] + 128
    first = plain[banner + int(y / 64 * scale), int(x / 64 * scale)]
    x, y = grid.coords[1] + 128
    second = plain[banner + int(y / 64 * scale), int(x / 64 * scale)]
    assert np.array_equal(first, second)


def test_large_masks_are_shrunk_and_empty_grid_renders() -> None:
    raw = np.zeros((100, 3000), dtype=bool)
    raw[20:80, 100:2900] = True
    empty = PatchGrid(np.zeros((0, 2), np.int64), np.zeros(0, np.float32), 256, 256)
    rgb = render_qc_image(make_mask(raw), empty, title="wide")
    assert rgb.shape[1] == QC_MAX_SIDE
    assert rgb.shape[0] == round(100 * QC_MAX_SIDE / 3000) + 56


def test_wrong_label_count_is_refused(tmp_path: Path) -> None:
    mask = block_mask()
    grid = patch_grid(mask, (30 * 64, 20 * 64), 256, 256, 0.25)
    with pytest.raises(ValueError, match="patch_labels"):
        render_qc_png(tmp_path / "x.png", mask, grid, title="t", patch_labels=np.zeros(2))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ GeoJSON


def test_geojson_polygon_with_hole_in_level0_coordinates() -> None:
    raw = np.zeros((16, 16), dtype=bool)
    raw[2:12, 3:13] = True
    raw[5:8, 6:9] = False
    collection = tissue_contours_geojson(make_mask(raw, (4.0, 4.0)))
    json.dumps(collection)  # plain Python types only
    assert collection["type"] == "FeatureCollection"
    (feature,) = collection["features"]
    assert feature["properties"] == {
        "objectType": "annotation",
        "classification": {"name": "Tissue"},
    }
    rings = feature["geometry"]["coordinates"]
    assert len(rings) == 2
    assert all(ring[0] == ring[-1] for ring in rings)
    polygon = shape(feature["geometry"])
    assert polygon.is_valid
    # Outer ring through boundary pixel centres: x (3.5..12.5)·4, y (2.5..11.5)·4.
    assert polygon.bounds == (14.0, 10.0, 50.0, 46.0)
    assert not polygon.contains(Point(7.5 * 4, 6.5 * 4))  # a hole pixel's centre
    assert polygon.contains(Point(4.5 * 4, 3.5 * 4))  # a tissue pixel's centre


def test_geojson_one_feature_per_component_and_degenerate_pixels() -> None:
    raw = np.zeros((20, 20), dtype=bool)
    raw[0, 0] = True  # a single pixel: no area as a contour
    raw[5:15, 5:15] = True
    raw[18, 2:9] = True  # a 1-px line
    collection = tissue_contours_geojson(make_mask(raw, (8.0, 8.0)))
    polygons = [shape(f["geometry"]) for f in collection["features"]]
    assert len(polygons) == 3
    areas = sorted(p.area for p in polygons)
    assert areas[0] == pytest.approx(64.0)  # the dot's pixel-edge box: 8×8 level-0 px
    assert areas[1] == pytest.approx(7 * 8 * 8)  # the line: 7 px × 1 px
    assert areas[2] == pytest.approx((9 * 8) ** 2)  # 10×10 block traced through pixel centres


def test_geojson_empty_mask() -> None:
    collection = tissue_contours_geojson(make_mask(np.zeros((5, 5), dtype=bool)))
    assert collection == {"type": "FeatureCollection", "features": []}


def test_small_specimen_gets_a_sharper_background(tmp_path: Path) -> None:
    """A biopsy's 64x thumbnail is a few dozen px: QC reads a finer level instead."""
    from fedpath.client.config import TissueConfig
    from fedpath.client.wsi.qc import QC_MIN_SIDE, _canvas_scale, qc_background
    from fedpath.client.wsi.reader import WsiReader
    from fedpath.client.wsi.tissue import tissue_mask_for_slide
    from tests.tiffs import write_pyramid

    rgb = np.full((2048, 3072, 3), 240, np.uint8)
    rgb[512:1536, 768:2304] = (190, 90, 170)
    path = write_pyramid(tmp_path / "biopsy.tif", rgb, levels=3)
    with WsiReader(path) as reader:
        mask = tissue_mask_for_slide(reader, TissueConfig.preset("biopsy"))
        background = qc_background(reader, mask)
        assert background is not None
        image, (dx, dy) = background
        assert dx == dy and dx < mask.downsample[0]
        assert max(image.shape[:2]) >= QC_MIN_SIDE // 2
        assert image[image.shape[0] // 2, image.shape[1] // 2].tolist() == [190, 90, 170]
        grid = patch_grid(mask, reader.info.dimensions, 256, 256, 0.25)
        assert len(grid) > 0
        sharp = render_qc_image(mask, grid, title="b", background=background)
        # Drawn on the background's own pixels (no block upscaling of the 64x thumbnail).
        scale = _canvas_scale(*image.shape[:2])
        assert sharp.shape[1] == round(image.shape[1] * scale)
