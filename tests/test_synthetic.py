"""Synthetic slides: determinism, OpenSlide compatibility, ground truth, annotations, cohorts."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile
from pydantic import ValidationError

from fedpath.common.atomic import TMP_PREFIX
from fedpath.common.errors import ConfigError, MissingMppError
from fedpath.common.hashing import sha256_file
from fedpath.synthetic import texture as synth_texture
from fedpath.synthetic.masks import (
    drop_nested_islands,
    low_grade_mask,
    make_tissue_mask,
    make_tumour_mask,
    mask_polygons,
    mimic_mask,
    partial_annotation_mask,
)
from fedpath.synthetic.render import SEAM_BLEND_PX, _ramp_weights
from fedpath.synthetic.slides import (
    DEFAULT_SITES,
    GROUND_TRUTH_COLUMNS,
    MANIFEST_COLUMNS,
    SynthCohortConfig,
    SynthSiteConfig,
    SynthSlide,
    SynthSlideConfig,
    generate_cohort,
    generate_site,
    generate_slide,
    plan_site,
)
from fedpath.synthetic.stain import (
    STAIN_PRESETS,
    StainConfig,
    concentrations_to_rgb,
    stain_matrix,
)
from fedpath.synthetic.texture import TILE, BankView, TextureBank, build_banks

SMALL = SynthSlideConfig(
    width_px=2048,
    height_px=1536,
    tissue_fraction=0.55,
    tumour_fraction=0.3,
    tumour_foci=2,
    bank_size=512,
)


def _level0(slide: SynthSlide) -> np.ndarray:
    with openslide.OpenSlide(str(slide.slide_path)) as osr:
        return np.asarray(osr.read_region((0, 0), 0, osr.dimensions).convert("RGB"))


def _mask(path: Path | None) -> np.ndarray:
    assert path is not None
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.dtype == np.uint8 and img.ndim == 2
    assert set(np.unique(img)) <= {0, 255}
    return img > 0


def _rasterise(rings_per_polygon: list[list[np.ndarray]], shape: tuple[int, int], ds: int):
    """Fill level-0 outlines at mask resolution (mask pixel centres at (j + ½)·ds)."""
    out = np.zeros(shape, dtype=np.uint8)
    shift = 4
    for rings in rings_per_polygon:
        pts = [np.round((np.asarray(r) / ds - 0.5) * (1 << shift)).astype(np.int32) for r in rings]
        cv2.fillPoly(out, pts, 1, cv2.LINE_8, shift)  # even-odd: holes stay empty
    return out.astype(bool)


def _geojson_rings(path: Path | None) -> list[list[np.ndarray]]:
    assert path is not None
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection"
    return [[np.asarray(r) for r in f["geometry"]["coordinates"]] for f in doc["features"]]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1, float((a | b).sum()))


@dataclass(frozen=True)
class Generated:
    first: SynthSlide
    again: SynthSlide
    other_seed: SynthSlide
    one_thread: SynthSlide


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    root = tmp_path_factory.mktemp("synth")
    return Generated(
        first=generate_slide(root / "a", "s1", SMALL, seed=11),
        again=generate_slide(root / "b", "s1", SMALL, seed=11),
        other_seed=generate_slide(root / "c", "s1", SMALL, seed=12),
        one_thread=generate_slide(root / "d", "s1", SMALL.model_copy(update={"workers": 1}), 11),
    )


# --------------------------------------------------------------------------------------------
# Determinism and file format
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_gives_identical_slide_and_masks(generated: Generated) -> None:
    a, b = generated.first, generated.again
    assert np.array_equal(_level0(a), _level0(b))
    assert sha256_file(a.slide_path) == sha256_file(b.slide_path)
    # Tiles are rendered in parallel; the bytes must not depend on the thread count.
    assert sha256_file(generated.one_thread.slide_path) == sha256_file(a.slide_path)
    assert np.array_equal(_mask(a.tissue_mask_path), _mask(b.tissue_mask_path))
    assert np.array_equal(_mask(a.tumour_mask_path), _mask(b.tumour_mask_path))
    assert a.geojson_path is not None and b.geojson_path is not None
    assert a.geojson_path.read_bytes() == b.geojson_path.read_bytes()
    assert a.tumour_fraction == b.tumour_fraction


def test_different_seed_differs(generated: Generated) -> None:
    a, c = generated.first, generated.other_seed
    assert not np.array_equal(_mask(a.tissue_mask_path), _mask(c.tissue_mask_path))
    pix_a, pix_c = _level0(a), _level0(c)
    assert np.mean(pix_a != pix_c) > 0.3


def test_openslide_reads_pyramid_with_mpp_and_objective(generated: Generated) -> None:
    slide = generated.first
    with openslide.OpenSlide(str(slide.slide_path)) as osr:
        assert osr.dimensions == (2048, 1536)
        assert osr.level_count == 2
        assert osr.level_dimensions[1] == (512, 384)
        assert osr.level_downsamples == pytest.approx((1.0, 4.0))
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)
        assert float(osr.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER]) == 20
    with tifffile.TiffFile(slide.slide_path) as tf:
        pages = list(tf.pages)
        assert [p.is_tiled for p in pages] == [True, True]
        assert pages[0].tilewidth == TILE and pages[0].compression == 7  # JPEG
        assert int(pages[1].subfiletype) == 1
        assert int(pages[0].tags["ResolutionUnit"].value) == 3  # centimetre
        x_res = pages[0].tags["XResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(1e4 / 0.5)


@pytest.mark.slow
def test_larger_slide_gets_more_levels_each_four_times_smaller(tmp_path: Path) -> None:
    cfg = SMALL.model_copy(update={"width_px": 4608, "height_px": 1024, "tumour_fraction": 0.0})
    slide = generate_slide(tmp_path, "wide", cfg, seed=3)
    assert slide.label == "normal" and slide.geojson_path is None
    with openslide.OpenSlide(str(slide.slide_path)) as osr:
        assert osr.level_dimensions == ((4608, 1024), (1152, 256), (288, 64))
        assert osr.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        # Level 1 is the 4× box reduction of level 0 (up to JPEG error).
        full = np.asarray(osr.read_region((0, 0), 0, (4608, 1024)).convert("RGB"))
        lvl1 = np.asarray(osr.read_region((0, 0), 1, (1152, 256)).convert("RGB"))
    reduced = cv2.resize(full, (1152, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(reduced.astype(int) - lvl1).mean() < 6
    assert not any(p.name.startswith(TMP_PREFIX) for p in tmp_path.rglob("*"))


@pytest.mark.parametrize(
    ("write_mpp", "write_objective"), [(False, True), (True, False), (False, False)]
)
def test_mpp_and_objective_can_be_left_out(
    tmp_path: Path, write_mpp: bool, write_objective: bool
) -> None:
    cfg = SynthSlideConfig(
        width_px=512,
        height_px=512,
        bank_size=256,
        write_mpp=write_mpp,
        write_objective=write_objective,
    )
    slide = generate_slide(tmp_path, "bare", cfg, seed=1)
    with openslide.OpenSlide(str(slide.slide_path)) as osr:
        props = dict(osr.properties)
        assert (openslide.PROPERTY_NAME_MPP_X in props) == write_mpp
        assert (openslide.PROPERTY_NAME_OBJECTIVE_POWER in props) == write_objective
        assert osr.level_count == 2
    with tifffile.TiffFile(slide.slide_path) as tf:
        unit = int(tf.pages[0].tags["ResolutionUnit"].value)
        assert (unit == 3) == write_mpp


def test_reader_falls_back_to_objective_or_refuses_without_both(tmp_path: Path) -> None:
    from fedpath.client.wsi.reader import WsiReader

    base = SynthSlideConfig(width_px=512, height_px=512, bank_size=256, write_mpp=False)
    with_power = generate_slide(tmp_path, "power", base, seed=1)
    with WsiReader(with_power.slide_path) as reader:
        assert reader.info.mpp_source == "objective_power"
        assert reader.info.mpp == pytest.approx(0.5)
    bare_cfg = base.model_copy(update={"write_objective": False})
    bare = generate_slide(tmp_path, "bare", bare_cfg, seed=1)
    with pytest.raises(MissingMppError, match="bare"):
        WsiReader(bare.slide_path, slide_id="bare")


# --------------------------------------------------------------------------------------------
# Ground truth and appearance
# --------------------------------------------------------------------------------------------


def _haematoxylin(rgb: np.ndarray, stain: StainConfig) -> np.ndarray:
    """Colour deconvolution with the known stain matrix: per-pixel c_H."""
    i0 = np.asarray(stain.background_rgb, dtype=np.float64)
    od = -np.log(np.clip(rgb.astype(np.float64), 1, None) / i0)
    conc = od.reshape(-1, 3) @ np.linalg.pinv(stain_matrix(stain).astype(np.float64))
    return conc[:, 0]


@pytest.mark.slow
def test_tumour_is_darker_and_more_haematoxylin_than_normal(generated: Generated) -> None:
    slide = generated.first
    rgb = _level0(slide)
    h, w = rgb.shape[:2]
    kernel = np.ones((5, 5), np.uint8)
    tissue = _mask(slide.tissue_mask_path).astype(np.uint8)
    tumour = _mask(slide.tumour_mask_path).astype(np.uint8)
    deep_tumour = cv2.erode(tumour, kernel)
    deep_normal = cv2.erode(tissue & (1 - tumour), kernel) & (1 - cv2.dilate(tumour, kernel))
    glass = 1 - cv2.dilate(tissue, kernel)

    def level0(mask: np.ndarray) -> np.ndarray:
        big = np.kron(mask, np.ones((16, 16), np.uint8))[:h, :w]
        return big.astype(bool)

    t_px, n_px, g_px = rgb[level0(deep_tumour)], rgb[level0(deep_normal)], rgb[level0(glass)]
    assert len(t_px) > 10_000 and len(n_px) > 10_000 and len(g_px) > 10_000
    assert t_px.mean() < n_px.mean() - 15
    stain = SMALL.stain
    assert _haematoxylin(t_px, stain).mean() > _haematoxylin(n_px, stain).mean() + 0.15
    assert np.abs(g_px.mean(axis=0) - np.asarray(stain.background_rgb)).max() < 3
    # Glass stays below the CLAM saturation threshold, tissue well above it.
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    assert np.median(sat[level0(glass)]) < 8
    assert np.median(sat[level0(deep_normal)]) > 30


def test_pipeline_tissue_segmentation_finds_the_generated_tissue(generated: Generated) -> None:
    from fedpath.client.config import TissueConfig
    from fedpath.client.wsi.reader import WsiReader
    from fedpath.client.wsi.tissue import tissue_mask_for_slide

    slide = generated.first
    truth = _mask(slide.tissue_mask_path).astype(np.float32)
    with WsiReader(slide.slide_path) as reader:
        found = tissue_mask_for_slide(reader, TissueConfig.preset("biopsy"))
    h, w = found.mask.shape
    expected = cv2.resize(truth, (w, h), interpolation=cv2.INTER_AREA) >= 0.5
    assert _iou(expected, found.mask) >= 0.75


def test_realised_tumour_fraction_matches_request_and_masks(generated: Generated) -> None:
    slide = generated.first
    tissue, tumour = _mask(slide.tissue_mask_path), _mask(slide.tumour_mask_path)
    assert not (tumour & ~tissue).any()
    assert slide.tumour_fraction == pytest.approx(tumour.sum() / tissue.sum())
    assert slide.tumour_fraction == pytest.approx(SMALL.tumour_fraction, rel=0.05)
    assert tissue.mean() == pytest.approx(SMALL.tissue_fraction, abs=0.08)
    assert slide.label == "tumour" and slide.mask_downsample == 16
    assert tissue.shape == (1536 // 16, 2048 // 16)


@pytest.mark.parametrize("fraction", [0.004, 0.05, 0.4, 0.9])
def test_tumour_mask_area_from_micrometastasis_to_most_of_tissue(fraction: float) -> None:
    rng = np.random.default_rng(5)
    tissue = make_tissue_mask(rng, (300, 400), 0.5, 2)
    foci = 1 if fraction < 0.03 else 3
    tumour = make_tumour_mask(rng, tissue, fraction, foci)
    realised = tumour.sum() / tissue.sum()
    assert realised == pytest.approx(fraction, rel=0.05, abs=0.002)
    assert not (tumour & ~tissue).any()
    if foci == 1:
        _, _, stats, _ = cv2.connectedComponentsWithStats(tumour.astype(np.uint8))
        assert stats[1:, cv2.CC_STAT_AREA].max() >= 0.8 * tumour.sum()


def test_normal_slide_has_empty_tumour_mask_and_no_annotation(tmp_path: Path) -> None:
    cfg = SMALL.model_copy(update={"tumour_fraction": 0.0})
    slide = generate_slide(tmp_path, "n1", cfg, seed=4)
    assert slide.label == "normal" and slide.tumour_fraction == 0.0
    assert not _mask(slide.tumour_mask_path).any()
    assert slide.geojson_path is None and slide.asap_xml_path is None
    assert slide.annotation_complete is None
    assert not (tmp_path / "annotations" / "n1.geojson").exists()


# --------------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------------


def test_geojson_and_xml_reproduce_the_tumour_mask(generated: Generated) -> None:
    slide = generated.first
    tumour = _mask(slide.tumour_mask_path)
    rings = _geojson_rings(slide.geojson_path)
    assert rings
    drawn = _rasterise(rings, tumour.shape, slide.mask_downsample)
    assert _iou(drawn, tumour) >= 0.95
    doc = json.loads(slide.geojson_path.read_text())  # type: ignore[union-attr]
    assert {f["properties"]["classification"]["name"] for f in doc["features"]} == {"Tumor"}

    assert slide.asap_xml_path is not None
    root = ET.parse(slide.asap_xml_path).getroot()
    tumour_polys, exclusions = [], []
    for ann in root.iter("Annotation"):
        pts = sorted(ann.iter("Coordinate"), key=lambda c: int(c.get("Order", "0")))
        ring = np.array([[float(c.get("X")), float(c.get("Y"))] for c in pts])
        (exclusions if ann.get("PartOfGroup") == "_2" else tumour_polys).append(ring)
    assert len(tumour_polys) == len(rings)
    from_xml = _rasterise([[r] for r in tumour_polys], tumour.shape, 16)
    from_xml &= ~_rasterise([[r] for r in exclusions], tumour.shape, 16) if exclusions else True
    assert _iou(from_xml, tumour) >= 0.95
    assert slide.annotation_complete is True


def test_mask_polygons_keep_holes_and_follow_the_rendered_edge() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    cv2.circle(mask.view(np.uint8), (20, 20), 12, 1, -1)
    cv2.circle(mask.view(np.uint8), (20, 20), 5, 0, -1)
    mask[2:5, 2:5] = True  # a second, separate region
    polys = mask_polygons(mask, downsample=16)
    assert len(polys) == 2
    ring = max(polys, key=lambda p: len(p.exterior))
    assert len(ring.holes) == 1
    drawn = _rasterise([[p.exterior, *p.holes] for p in polys], mask.shape, 16)
    assert _iou(drawn, mask) >= 0.97
    # The outline lies on the mask-pixel edges (bilinear 0.5 level), not on pixel centres:
    # the 3×3 square spans level-0 [32, 80) and its outline comes within ds/8 of that.
    small = min(polys, key=lambda p: len(p.exterior))
    lo, hi = small.exterior.min(axis=0), small.exterior.max(axis=0)
    assert np.all(np.abs(lo - 32) <= 4) and np.all(np.abs(hi - 80) <= 4)


def test_islands_inside_holes_are_dropped() -> None:
    mask = np.zeros((30, 30), dtype=bool)
    mask[5:25, 5:25] = True
    mask[10:20, 10:20] = False
    mask[14:16, 14:16] = True  # island in the hole
    mask[1:3, 27:29] = True  # separate region outside: kept
    cleaned = drop_nested_islands(mask)
    assert not cleaned[14:16, 14:16].any()
    assert cleaned[1:3, 27:29].all() and cleaned[5, 5:25].all()


@pytest.mark.slow
def test_partial_annotation_outlines_fewer_regions(tmp_path: Path) -> None:
    cfg = SMALL.model_copy(
        update={"tumour_fraction": 0.12, "tumour_foci": 5, "annotated_region_fraction": 0.4}
    )
    partial = generate_slide(tmp_path / "p", "p1", cfg, seed=21)
    full = generate_slide(
        tmp_path / "f", "p1", cfg.model_copy(update={"annotated_region_fraction": 1.0}), seed=21
    )
    assert partial.annotation_complete is False and full.annotation_complete is True
    tumour = _mask(partial.tumour_mask_path)
    assert np.array_equal(tumour, _mask(full.tumour_mask_path))
    p_rings, f_rings = _geojson_rings(partial.geojson_path), _geojson_rings(full.geojson_path)
    assert 1 <= len(p_rings) <= len(f_rings)
    drawn = _rasterise(p_rings, tumour.shape, 16)
    assert 0 < drawn.sum() < 0.9 * tumour.sum()
    assert (drawn & tumour).sum() >= 0.95 * drawn.sum()


def test_partial_mask_single_region_is_cut_not_dropped() -> None:
    tumour = np.zeros((50, 50), dtype=bool)
    tumour[10:40, 10:40] = True
    part = partial_annotation_mask(np.random.default_rng(0), tumour, 0.3)
    assert not (part & ~tumour).any()
    assert part.sum() == pytest.approx(0.3 * tumour.sum(), rel=0.1)
    several = tumour.copy()
    several[10:40, 24:26] = False
    several[24:26, 10:40] = False  # four separate squares
    part = partial_annotation_mask(np.random.default_rng(0), several, 0.5)
    n = cv2.connectedComponents(part.astype(np.uint8))[0] - 1
    assert 1 <= n <= 3


# --------------------------------------------------------------------------------------------
# Textures and stain
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize(("sx", "sy"), [(1, 1), (-1, 1), (1, -1), (-1, -1)])
def test_bank_view_tile_matches_the_coordinate_mapping(swap: bool, sx: int, sy: int) -> None:
    size = 512
    rng = np.random.default_rng(0)
    base = rng.random((size, size, 2), dtype=np.float32)
    bank = TextureBank(
        size=size,
        data=np.pad(base, ((0, TILE), (0, TILE), (0, 0)), mode="wrap"),
        mean=base.reshape(-1, 2).mean(axis=0),
    )
    view = BankView(offset_x=300, offset_y=451, sign_x=sx, sign_y=sy, swap=swap)
    for u0, v0 in [(0, 0), (256, 256), (-256, 768), (512, 256)]:
        tile = view.tile(bank, u0, v0)
        y, x = np.mgrid[v0 : v0 + TILE, u0 : u0 + TILE]
        a, b = (x, y) if swap else (y, x)
        rows, cols = (sy * a + 451) % size, (sx * b + 300) % size
        assert np.array_equal(tile, base[rows, cols])


def test_seam_weights_partition_unity() -> None:
    for start in (0, 256, 768, 1024, 1280):
        weights = _ramp_weights(start, 1024, 4)
        assert np.allclose(sum(w for _, w in weights), 1.0)
    inner = _ramp_weights(256, 1024, 4)
    assert len(inner) == 1 and inner[0][0] == 0
    border = _ramp_weights(768, 1024, 4)
    assert [c for c, _ in border] == [0, 1]
    assert (border[1][1] > 0).sum() == SEAM_BLEND_PX // 2


def test_banks_are_periodic_and_tumour_is_denser_in_haematoxylin() -> None:
    banks = build_banks(512, 0.5, np.random.SeedSequence(9))
    for bank in (banks.normal, banks.tumour):
        core = bank.data[:512, :512]
        assert np.array_equal(bank.data[512:, :512], core[:TILE])  # wrap padding
        # Periodic: the jump across the wrap is no larger than between neighbouring rows.
        wrap_jump = np.abs(core[0] - core[-1]).mean()
        inner_jump = np.abs(core[1:] - core[:-1]).mean()
        assert wrap_jump < 1.5 * inner_jump
    assert banks.tumour.mean[0] > 2 * banks.normal.mean[0]  # haematoxylin
    assert banks.normal.mean[1] > banks.tumour.mean[1]  # eosin
    again = build_banks(512, 0.5, np.random.SeedSequence(9))
    assert np.array_equal(again.tumour.data, banks.tumour.data)
    assert banks.low_grade is None


def test_low_grade_bank_is_extra_near_stroma_in_colour_and_leaves_the_others() -> None:
    """The subtle component's bank comes from a third seed child: the normal and tumour banks
    are the same bytes with it; its nuclei are pale (far less haematoxylin than high-grade)."""
    plain = build_banks(512, 0.5, np.random.SeedSequence(9))
    banks = build_banks(512, 0.5, np.random.SeedSequence(9), low_grade=True)
    assert np.array_equal(plain.normal.data, banks.normal.data)
    assert np.array_equal(plain.tumour.data, banks.tumour.data)
    subtle = banks.low_grade
    assert subtle is not None and subtle.size == 512
    assert np.array_equal(subtle.data[512:, :512], subtle.data[:TILE, :512])  # periodic
    # Subtle: in both stains its mean is nearer stroma's than the high-grade sheets'.
    near_normal = np.abs(subtle.mean - banks.normal.mean)
    assert (near_normal < 0.5 * np.abs(banks.tumour.mean - banks.normal.mean)).all()
    assert not np.array_equal(subtle.data, banks.normal.data)


def test_beer_lambert_and_stain_presets_shift_colour() -> None:
    ref = STAIN_PRESETS["reference"]
    m = stain_matrix(ref)
    assert np.allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-5)
    zero = concentrations_to_rgb(np.zeros((4, 4, 2), np.float32), m, ref.background_rgb)
    assert (zero == np.asarray(ref.background_rgb)).all()
    conc = np.zeros((2, 2, 2), np.float32)
    conc[0, 0] = (1.0, 0.0)
    conc[0, 1] = (0.0, 1.0)
    rgb = concentrations_to_rgb(conc, m, (255, 255, 255)).astype(np.float64)
    assert np.allclose(rgb[0, 0], 255 * np.exp(-m[0]), atol=1)
    assert np.allclose(rgb[0, 1], 255 * np.exp(-m[1]), atol=1)
    assert rgb[0, 1, 1] < rgb[0, 1, 0]  # eosin absorbs green: pink
    banks = build_banks(256, 0.5, np.random.SeedSequence(2))
    tissue = banks.normal.data[:256, :256]
    means = {}
    for name, stain in STAIN_PRESETS.items():
        sat = cv2.cvtColor(np.uint8([[stain.background_rgb]]), cv2.COLOR_RGB2HSV)[0, 0, 1]
        assert sat < 8, name
        means[name] = concentrations_to_rgb(tissue, stain_matrix(stain), stain.background_rgb)
        means[name] = means[name].reshape(-1, 3).mean(axis=0)
    names = sorted(means)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.linalg.norm(means[a] - means[b]) > 6, (a, b)
    stronger = StainConfig(h_scale=1.5)
    assert stain_matrix(stronger)[0] == pytest.approx(1.5 * stain_matrix(ref)[0], rel=1e-5)


def test_configs_are_validated() -> None:
    with pytest.raises(ValidationError):
        SynthSlideConfig(mask_downsample=12)
    with pytest.raises(ValidationError):
        SynthSlideConfig(bank_size=300)
    with pytest.raises(ValidationError, match="unknown stain preset"):
        SynthSlideConfig(stain="nope")
    with pytest.raises(ValidationError):
        SynthSlideConfig(colour="red")  # type: ignore[call-arg]
    assert SynthSlideConfig(stain="purple").stain == STAIN_PRESETS["purple"]
    assert SynthSlideConfig(mpp=0.25).resolved_objective == 40
    with pytest.raises(ValidationError):
        SynthSiteConfig(name="x", n_slides=2, width_range=(4000, 3000))
    site = SynthSiteConfig(name="x", n_slides=2)
    with pytest.raises(ValidationError, match="unique"):
        SynthCohortConfig(sites=(site, site))
    with pytest.raises(ConfigError, match="safe file name"):
        generate_slide(Path("/nonexistent"), "../evil", SMALL, seed=0)


# --------------------------------------------------------------------------------------------
# Cohorts
# --------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def test_default_cohort_plan_matches_the_reference_design() -> None:
    cohort = SynthCohortConfig()
    assert [s.name for s in cohort.sites] == ["site_a", "site_b", "site_c"]
    assert len({s.stain for s in DEFAULT_SITES}) == 3
    plans = {s.name: plan_site(s, cohort, seed=0) for s in cohort.sites}
    a = plans["site_a"]
    tumour = [p for p in a if p.config.tumour_fraction > 0]
    annotated = [p for p in tumour if p.config.annotate]
    assert len(tumour) == 6 and len(annotated) == round(0.3 * 6)
    assert sum(p.config.annotated_region_fraction < 1 for p in annotated) == 1
    for name in ("site_b", "site_c"):
        assert not any(p.config.annotate for p in plans[name])
    assert len(plans["site_c"]) < len(plans["site_b"])
    for plan in (p for site in plans.values() for p in site):
        cfg = plan.config
        approx_patches = cfg.width_px * cfg.height_px * cfg.tissue_fraction / 256**2
        assert 100 < approx_patches < 400
    again = plan_site(cohort.sites[0], cohort, seed=0)
    assert [p.seed for p in again] == [p.seed for p in a]


@pytest.fixture(scope="module")
def cohort_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Path]]:
    root = tmp_path_factory.mktemp("cohort")
    cfg = SynthCohortConfig(
        sites=(
            SynthSiteConfig(
                name="s1",
                n_slides=4,
                annotated_share=1.0,
                partial_share=0.5,
                stain="reference",
                width_range=(1024, 1536),
                height_range=(1024, 1280),
                seed_offset=0,
            ),
            SynthSiteConfig(
                name="s2",
                n_slides=4,
                tumour_share=0.25,
                stain="purple",
                width_range=(1024, 1280),
                height_range=(1024, 1024),
                seed_offset=1,
                slides_per_patient=2,
            ),
        ),
        bank_size=256,
    )
    reported: list[str] = []
    dirs = generate_cohort(
        root, cfg, seed=3, on_slide=lambda slide: reported.append(slide.slide_id)
    )
    manifests = [d / "slides.csv" for d in dirs]
    listed = [line.split(",")[0] for m in manifests for line in m.read_text().splitlines()[1:]]
    assert reported == listed  # one progress callback per slide, in manifest order
    yield dirs


def test_cohort_manifests_have_exact_columns_and_label_shares(cohort_dirs: list[Path]) -> None:
    s1, s2 = cohort_dirs
    assert [d.name for d in cohort_dirs] == ["s1", "s2"]
    assert (s1.parent / "cohort.json").exists()
    cols, rows = _read_csv(s1 / "slides.csv")
    assert tuple(cols) == MANIFEST_COLUMNS
    assert (s1 / "slides.csv").read_text().splitlines()[0] == ",".join(MANIFEST_COLUMNS)
    labels = [r["label"] for r in rows]
    assert labels.count("tumour") == 2 and labels.count("normal") == 2
    for r in rows:
        assert (s1 / r["path"]).is_file() and r["path"] == f"slides/{r['slide_id']}.tiff"
        if r["label"] == "tumour":
            assert r["annotation"] == f"annotations/{r['slide_id']}.geojson"
            assert (s1 / r["annotation"]).is_file()
            assert (s1 / r["annotation"]).with_suffix(".xml").is_file()
            assert r["annotation_complete"] in {"true", "false"}
        else:
            assert r["annotation"] == "" and r["annotation_complete"] == ""
    assert sorted(r["annotation_complete"] for r in rows if r["label"] == "tumour") == [
        "false",
        "true",
    ]
    _, rows2 = _read_csv(s2 / "slides.csv")
    assert [r["label"] for r in rows2].count("tumour") == 1
    assert all(r["annotation"] == "" for r in rows2)
    assert [r["patient_id"] for r in rows2] == ["s2_p000", "s2_p000", "s2_p001", "s2_p001"]

    gt_cols, truth = _read_csv(s1 / "ground_truth.csv")
    assert tuple(gt_cols) == GROUND_TRUTH_COLUMNS
    for r, m in zip(truth, rows, strict=True):
        assert r["slide_id"] == m["slide_id"] and r["label"] == m["label"]
        assert r["mask_downsample"] == "16" and float(r["level0_mpp"]) == 0.5
        tumour = _mask(s1 / r["tumour_mask"])
        tissue = _mask(s1 / r["tissue_mask"])
        assert float(r["tumour_fraction"]) == pytest.approx(tumour.sum() / tissue.sum(), abs=1e-6)
        assert (float(r["tumour_fraction"]) > 0) == (r["label"] == "tumour")


def test_sites_differ_in_stain(cohort_dirs: list[Path]) -> None:
    def tissue_colour(site: Path) -> list[np.ndarray]:
        _, rows = _read_csv(site / "ground_truth.csv")
        colours = []
        for r in rows:
            if r["label"] != "normal":
                continue
            with openslide.OpenSlide(str(site / "slides" / f"{r['slide_id']}.tiff")) as osr:
                thumb = np.asarray(
                    osr.read_region((0, 0), 1, osr.level_dimensions[1]).convert("RGB")
                )
            tissue = _mask(site / r["tissue_mask"]).astype(np.uint8)
            tissue = cv2.erode(tissue, np.ones((3, 3), np.uint8))
            size = (thumb.shape[1], thumb.shape[0])
            big = cv2.resize(tissue, size, interpolation=cv2.INTER_NEAREST) > 0
            mean = thumb[big].mean(axis=0)
            colours.append(mean / mean.sum())  # chromaticity: insensitive to thickness
        return colours

    a, b = tissue_colour(cohort_dirs[0]), tissue_colour(cohort_dirs[1])
    within = np.linalg.norm(a[0] - a[1])
    between = min(np.linalg.norm(x - y) for x in a for y in b)
    assert between > 0.01 and between > 3 * within


def test_regenerating_a_smaller_site_removes_stale_files(cohort_dirs: list[Path]) -> None:
    s1 = cohort_dirs[0]
    before = sorted(p.name for p in (s1 / "slides").iterdir())
    assert len(before) == 4
    site = SynthSiteConfig(
        name="s1",
        n_slides=2,
        tumour_share=0.0,
        width_range=(512, 512),
        height_range=(512, 512),
    )
    slides = generate_site(s1, site, SynthCohortConfig(sites=(site,), bank_size=256), seed=3)
    assert [s.label for s in slides] == ["normal", "normal"]
    assert sorted(p.name for p in (s1 / "slides").iterdir()) == ["s1_000.tiff", "s1_001.tiff"]
    assert not list((s1 / "annotations").glob("*"))
    assert len(list((s1 / "masks").glob("*.png"))) == 4
    _, rows = _read_csv(s1 / "slides.csv")
    assert [r["slide_id"] for r in rows] == ["s1_000", "s1_001"]
    assert not any(p.name.startswith(TMP_PREFIX) for p in s1.rglob("*"))


# --------------------------------------------------------------------------------------------
# Infiltrating (low-density) tumour
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_infiltrating_tumour_changes_only_tumour_pixels_and_keeps_the_truth(
    generated: Generated, tmp_path: Path
) -> None:
    """A density range below 1 leaves stroma and glass byte-for-byte as the solid slide and the
    ground truth unchanged, and puts stroma between the tumour nests (less haematoxylin)."""
    cfg = SMALL.model_copy(update={"tumour_density_range": (0.25, 1.0)})
    sparse = generate_slide(tmp_path, "s1", cfg, seed=11)
    solid = generated.first
    assert np.array_equal(_mask(sparse.tumour_mask_path), _mask(solid.tumour_mask_path))
    assert sparse.tumour_fraction == solid.tumour_fraction
    a, b = _level0(solid), _level0(sparse)
    h, w = a.shape[:2]
    tumour = _mask(solid.tumour_mask_path).astype(np.uint8)
    near = np.kron(cv2.dilate(tumour, np.ones((5, 5), np.uint8)), np.ones((16, 16), np.uint8))
    near = near[:h, :w].astype(bool)
    deep = np.kron(cv2.erode(tumour, np.ones((5, 5), np.uint8)), np.ones((16, 16), np.uint8))
    deep = deep[:h, :w].astype(bool)
    # JPEG blocks straddle the tumour edge, so compare away from it.
    assert np.array_equal(a[~near], b[~near])
    stain = SMALL.stain
    assert _haematoxylin(b[deep], stain).mean() < _haematoxylin(a[deep], stain).mean() - 0.02
    changed = np.abs(a[deep].astype(int) - b[deep].astype(int)).max(axis=1) > 20
    assert 0.1 < changed.mean() < 0.9  # nests kept, stroma in between


def _assert_range_refused(field: str, cases: tuple[tuple[tuple[float, float], str], ...]) -> None:
    """Each bad (low, high) is refused, with the given message, by slide and site configs."""
    for bad, why in cases:
        with pytest.raises(ValidationError, match=why):
            SynthSlideConfig.model_validate({field: bad})
        with pytest.raises(ValidationError, match=why):
            SynthSiteConfig.model_validate({"name": "x", "n_slides": 1, field: bad})


def test_default_density_is_solid_tumour_and_bounds_are_checked() -> None:
    assert SMALL.tumour_density_range == (1.0, 1.0)
    _assert_range_refused(
        "tumour_density_range",
        (
            ((0.0, 1.0), "tumour density"),
            ((0.5, 1.2), "tumour density"),
            ((1.0, 0.3), "not ordered"),
        ),
    )
    site = SynthSiteConfig(name="x", n_slides=4, tumour_density_range=(0.3, 0.9))
    plans = plan_site(site, SynthCohortConfig(sites=(site,)), seed=0)
    assert all(p.config.tumour_density_range == (0.3, 0.9) for p in plans)


def test_mask_polygons_never_cross_themselves() -> None:
    """8-connected pinches used to be traced as self-intersecting rings, which the annotation
    reader refuses: a generated tumour slide then failed preparation (1 in ~40 here)."""
    from shapely.geometry import Polygon as ShapelyPolygon

    rng = np.random.default_rng(0)
    for _ in range(20):
        noise = cv2.GaussianBlur(rng.standard_normal((48, 48)).astype(np.float32), (0, 0), 1.2)
        mask = noise > 0.15
        polys = mask_polygons(mask.astype(np.uint8), downsample=16)
        assert polys
        assert all(ShapelyPolygon(p.exterior, p.holes).is_valid for p in polys)
        drawn = _rasterise([[p.exterior, *p.holes] for p in polys], mask.shape, 16)
        assert _iou(drawn, mask) > 0.95  # pinch corners: a pixel or two each


# --------------------------------------------------------------------------------------------
# Heterogeneous tumour (low-grade component)
# --------------------------------------------------------------------------------------------


def test_low_grade_mask_takes_the_requested_share_in_contiguous_areas() -> None:
    tumour = np.zeros((96, 96), dtype=bool)
    tumour[10:80, 20:90] = True
    part = low_grade_mask(np.random.default_rng(3), tumour, 0.4, sigma_px=8.0)
    assert not (part & ~tumour).any()
    assert part.sum() == round(0.4 * tumour.sum())
    n_parts, _ = cv2.connectedComponents(part.astype(np.uint8))
    assert n_parts - 1 <= 8  # a few areas, not speckle
    again = low_grade_mask(np.random.default_rng(3), tumour, 0.4, sigma_px=8.0)
    assert np.array_equal(part, again)
    assert not low_grade_mask(np.random.default_rng(3), tumour, 0.0, sigma_px=8.0).any()


@pytest.mark.slow
def test_low_grade_changes_only_tumour_pixels_is_deterministic_and_keeps_the_truth(
    generated: Generated, tmp_path: Path
) -> None:
    """A low-grade share leaves stroma and glass byte-for-byte as the plain slide and the
    ground truth unchanged; the low-grade part (its own mask, inside the tumour) is paler in
    haematoxylin than the high-grade part, and the same seed gives the same bytes."""
    cfg = SMALL.model_copy(update={"low_grade_share_range": (0.4, 0.6)})
    mixed = generate_slide(tmp_path / "a", "s1", cfg, seed=11)
    again = generate_slide(tmp_path / "b", "s1", cfg, seed=11)
    plain = generated.first
    assert sha256_file(mixed.slide_path) == sha256_file(again.slide_path)
    assert mixed.low_grade_mask_path is not None and plain.low_grade_mask_path is None
    assert mixed.low_grade_mask_path.read_bytes() == again.low_grade_mask_path.read_bytes()
    tumour = _mask(plain.tumour_mask_path)
    assert np.array_equal(_mask(mixed.tumour_mask_path), tumour)
    assert mixed.tumour_fraction == plain.tumour_fraction
    low = _mask(mixed.low_grade_mask_path)
    assert not (low & ~tumour).any()
    assert 0.4 - 0.01 <= low.sum() / tumour.sum() <= 0.6 + 0.01

    a, b = _level0(plain), _level0(mixed)
    h, w = a.shape[:2]
    kernel = np.ones((5, 5), np.uint8)

    def level0(mask: np.ndarray) -> np.ndarray:
        return np.kron(mask.astype(np.uint8), np.ones((16, 16), np.uint8))[:h, :w].astype(bool)

    near = level0(cv2.dilate(low.astype(np.uint8), kernel))
    assert np.array_equal(a[~near], b[~near])  # normal tissue, glass and high-grade tumour
    deep_low = level0(cv2.erode(low.astype(np.uint8), kernel))
    assert deep_low.sum() > 5_000
    stain = SMALL.stain
    assert _haematoxylin(b[deep_low], stain).mean() < _haematoxylin(a[deep_low], stain).mean() - 0.1


@pytest.mark.slow
def test_low_grade_on_a_normal_slide_changes_nothing(tmp_path: Path) -> None:
    normal = SMALL.model_copy(update={"tumour_fraction": 0.0})
    with_option = normal.model_copy(update={"low_grade_share_range": (0.3, 0.6)})
    a = generate_slide(tmp_path / "a", "n1", normal, seed=5)
    b = generate_slide(tmp_path / "b", "n1", with_option, seed=5)
    assert sha256_file(a.slide_path) == sha256_file(b.slide_path)
    assert b.low_grade_mask_path is None
    assert not list((tmp_path / "b" / "masks").glob("*_low_grade.png"))


def test_low_grade_default_is_off_and_bounds_are_checked() -> None:
    assert SMALL.low_grade_share_range == (0.0, 0.0)
    assert SynthSiteConfig(name="x", n_slides=1).low_grade_share_range == (0.0, 0.0)
    _assert_range_refused(
        "low_grade_share_range",
        (
            ((-0.1, 0.5), "low-grade share"),
            ((0.2, 0.95), "low-grade share"),
            ((0.6, 0.3), "not ordered"),
        ),
    )


# --------------------------------------------------------------------------------------------
# Benign mimic of low-grade tumour in normal tissue
# --------------------------------------------------------------------------------------------

MIMIC = SMALL.model_copy(update={"mimic_share_range": (0.2, 0.3)})


def _nuclear_haematoxylin(bank: TextureBank) -> float:
    """Mean c_H of a bank's nuclei: pixels far above the stroma and cord cytoplasm (c_H
    0.05-0.1) that every nucleus of these textures exceeds."""
    haem = bank.data[: bank.size, : bank.size, 0]
    nuclei = haem > 0.15
    assert 0.005 < nuclei.mean() < 0.2  # nuclei, neither none nor the background
    return float(haem[nuclei].mean())


@pytest.mark.slow
def test_mimic_bank_shares_the_low_grade_architecture_with_darker_smaller_nuclei() -> None:
    """The mimic's bank is a fourth seed child: every other bank keeps its bytes. Its nuclei
    are the dark, small benign ones (darker than the low-grade bank's pale vesicular nuclei),
    and everything else is the low-grade texture's: given the low-grade nuclear constants
    (read at call time) the mimic texture is the low-grade texture, byte for byte."""
    plain = build_banks(512, 0.5, np.random.SeedSequence(9), low_grade=True)
    banks = build_banks(512, 0.5, np.random.SeedSequence(9), low_grade=True, mimic=True)
    for name in ("normal", "tumour", "low_grade"):
        assert np.array_equal(getattr(plain, name).data, getattr(banks, name).data), name
    assert plain.mimic is None
    mimic, low = banks.mimic, banks.low_grade
    assert mimic is not None and low is not None and mimic.size == 512
    assert np.array_equal(mimic.data[512:, :512], mimic.data[:TILE, :512])  # periodic
    assert _nuclear_haematoxylin(mimic) > 1.8 * _nuclear_haematoxylin(low)
    only_mimic = build_banks(512, 0.5, np.random.SeedSequence(9), mimic=True)
    assert only_mimic.low_grade is None and only_mimic.mimic is not None
    assert np.array_equal(only_mimic.mimic.data, mimic.data)

    def texture(fn: Callable[[np.random.Generator, int, float], np.ndarray]) -> np.ndarray:
        return fn(np.random.default_rng(4), 256, 0.5)

    lookalike = texture(synth_texture._mimic_texture)
    assert not np.array_equal(lookalike, texture(synth_texture._low_grade_texture))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synth_texture, "MIMIC_NUCLEUS_UM", synth_texture.LOW_GRADE_NUCLEUS_UM)
        mp.setattr(synth_texture, "MIMIC_NUCLEUS_H", synth_texture.LOW_GRADE_NUCLEUS_H)
        mp.setattr(synth_texture, "MIMIC_NUCLEUS_RIM", synth_texture.LOW_GRADE_NUCLEUS_RIM)
        same = texture(synth_texture._mimic_texture)
    assert np.array_equal(same, texture(synth_texture._low_grade_texture))


def test_mimic_mask_takes_the_requested_share_of_normal_tissue_only() -> None:
    tissue = np.zeros((96, 96), dtype=bool)
    tissue[8:90, 6:92] = True
    tumour = np.zeros_like(tissue)
    tumour[30:60, 30:70] = True
    normal = tissue & ~tumour
    part = mimic_mask(np.random.default_rng(3), tissue, tumour, 0.25, sigma_px=8.0)
    assert not (part & ~normal).any()  # never glass, never tumour
    assert part.sum() == round(0.25 * normal.sum())
    n_parts, _ = cv2.connectedComponents(part.astype(np.uint8))
    assert n_parts - 1 <= 10  # a few areas, not speckle
    again = mimic_mask(np.random.default_rng(3), tissue, tumour, 0.25, sigma_px=8.0)
    assert np.array_equal(part, again)
    assert not mimic_mask(np.random.default_rng(3), tissue, tumour, 0.0, sigma_px=8.0).any()
    everywhere = mimic_mask(np.random.default_rng(3), tissue, tissue, 0.3, sigma_px=8.0)
    assert not everywhere.any()  # all tissue tumour: no normal tissue to mimic in


def _level0_of(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    big = np.kron(mask.astype(np.uint8), np.ones((16, 16), np.uint8))
    return big[: shape[0], : shape[1]].astype(bool)


def _retextured(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Share of level-0 pixels well inside ``mask`` (mask px) that differ by more than a
    JPEG error between slides ``a`` and ``b``: another texture, not a tint."""
    inside = _level0_of(cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)), a.shape)
    assert inside.sum() > 5_000
    return float((np.abs(a[inside].astype(int) - b[inside].astype(int)).max(axis=1) > 20).mean())


@pytest.mark.slow
def test_mimic_changes_only_normal_tissue_and_keeps_the_truth(
    generated: Generated, tmp_path: Path
) -> None:
    """With a mimic share the tumour pixels and the glass stay byte-for-byte those of the
    plain slide, the ground truth (masks, fraction, outlines) is unchanged, the mimic mask
    covers the requested share of the non-tumour tissue, and the same seed gives the same
    bytes."""
    mixed = generate_slide(tmp_path / "a", "s1", MIMIC, seed=11)
    again = generate_slide(tmp_path / "b", "s1", MIMIC, seed=11)
    plain = generated.first
    assert sha256_file(mixed.slide_path) == sha256_file(again.slide_path)
    assert plain.mimic_mask_path is None and mixed.mimic_mask_path is not None
    assert again.mimic_mask_path is not None
    assert mixed.mimic_mask_path.read_bytes() == again.mimic_mask_path.read_bytes()
    assert mixed.mimic_mask_path == tmp_path / "a" / "masks" / "s1_mimic.png"
    assert mixed.label == "tumour" and mixed.tumour_fraction == plain.tumour_fraction
    tissue, tumour = _mask(plain.tissue_mask_path), _mask(plain.tumour_mask_path)
    assert np.array_equal(_mask(mixed.tissue_mask_path), tissue)
    assert np.array_equal(_mask(mixed.tumour_mask_path), tumour)
    assert mixed.geojson_path is not None and plain.geojson_path is not None
    assert mixed.geojson_path.read_bytes() == plain.geojson_path.read_bytes()
    mimic = _mask(mixed.mimic_mask_path)
    assert not (mimic & ~(tissue & ~tumour)).any()
    assert 0.2 - 0.01 <= mimic.sum() / (tissue & ~tumour).sum() <= 0.3 + 0.01

    a, b = _level0(plain), _level0(mixed)
    kernel = np.ones((5, 5), np.uint8)
    deep_tumour = _level0_of(cv2.erode(tumour.astype(np.uint8), kernel), a.shape)
    glass = _level0_of(1 - cv2.dilate(tissue.astype(np.uint8), kernel), a.shape)
    near = _level0_of(cv2.dilate(mimic.astype(np.uint8), kernel), a.shape)
    assert deep_tumour.sum() > 50_000 and glass.sum() > 50_000
    assert np.array_equal(a[deep_tumour], b[deep_tumour])
    assert np.array_equal(a[glass], b[glass])
    assert np.array_equal(a[~near], b[~near])  # JPEG blocks straddle the mimic's edge
    assert _retextured(a, b, mimic) > 0.3


@pytest.mark.slow
def test_mimic_appears_on_normal_slides_in_the_requested_share(tmp_path: Path) -> None:
    """A normal slide gets the mimic too (else the mimic would itself be normal-slide
    evidence); it stays a normal slide with an empty tumour mask and no outlines."""
    normal = SMALL.model_copy(update={"tumour_fraction": 0.0})
    plain = generate_slide(tmp_path / "a", "n1", normal, seed=5)
    cfg = normal.model_copy(update={"mimic_share_range": (0.25, 0.25)})
    slide = generate_slide(tmp_path / "b", "n1", cfg, seed=5)
    assert slide.label == "normal" and slide.tumour_fraction == 0.0
    assert not _mask(slide.tumour_mask_path).any()
    assert slide.geojson_path is None and slide.asap_xml_path is None
    tissue = _mask(slide.tissue_mask_path)
    assert np.array_equal(tissue, _mask(plain.tissue_mask_path))
    mimic = _mask(slide.mimic_mask_path)
    assert not (mimic & ~tissue).any()
    assert mimic.sum() / tissue.sum() == pytest.approx(0.25, abs=0.002)
    a, b = _level0(plain), _level0(slide)
    assert _retextured(a, b, mimic) > 0.3
    outside = _level0_of(cv2.dilate(mimic.astype(np.uint8), np.ones((5, 5), np.uint8)), a.shape)
    assert np.array_equal(a[~outside], b[~outside])


def test_mimic_default_is_off_and_bounds_are_checked(generated: Generated, tmp_path: Path) -> None:
    assert SMALL.mimic_share_range == (0.0, 0.0)
    assert SynthSiteConfig(name="x", n_slides=1).mimic_share_range == (0.0, 0.0)
    explicit_off = SMALL.model_copy(update={"mimic_share_range": (0.0, 0.0)})
    off = generate_slide(tmp_path / "off", "s1", explicit_off, seed=11)
    assert sha256_file(off.slide_path) == sha256_file(generated.first.slide_path)
    assert off.mimic_mask_path is None and generated.first.mimic_mask_path is None
    assert not list((tmp_path / "off" / "masks").glob("*_mimic.png"))
    _assert_range_refused(
        "mimic_share_range",
        (
            ((-0.1, 0.3), "mimic share"),
            ((0.2, 0.6), "mimic share"),
            ((0.4, 0.2), "not ordered"),
        ),
    )
    assert SynthSlideConfig(mimic_share_range=(0.5, 0.5)).mimic_share_range == (0.5, 0.5)


@pytest.mark.slow
def test_tumour_slides_can_carry_more_mimic_than_normal_slides(tmp_path: Path) -> None:
    """``tumour_slide_mimic_share_range`` sets the mimic's share on tumour slides only (a
    field effect the slide label goes with); normal slides keep ``mimic_share_range``, here
    none at all. Unset, a tumour slide is byte-for-byte the one ``mimic_share_range`` makes.
    A site passes the range to every slide, and its bounds are the mimic's."""
    field = {"mimic_share_range": (0.0, 0.0), "tumour_slide_mimic_share_range": (0.4, 0.4)}
    tumour_slide = generate_slide(tmp_path / "t", "t1", SMALL.model_copy(update=field), seed=11)
    tissue, tumour = _mask(tumour_slide.tissue_mask_path), _mask(tumour_slide.tumour_mask_path)
    assert tumour_slide.label == "tumour" and tumour_slide.mimic_mask_path is not None
    mimic = _mask(tumour_slide.mimic_mask_path)
    assert not (mimic & ~(tissue & ~tumour)).any()
    assert mimic.sum() / (tissue & ~tumour).sum() == pytest.approx(0.4, abs=0.002)
    same = SMALL.model_copy(update={"mimic_share_range": (0.4, 0.4)})
    reference = generate_slide(tmp_path / "r", "t1", same, seed=11)
    assert sha256_file(reference.slide_path) == sha256_file(tumour_slide.slide_path)

    normal_cfg = SMALL.model_copy(update={**field, "tumour_fraction": 0.0})
    normal = generate_slide(tmp_path / "n", "n1", normal_cfg, seed=5)
    assert normal.label == "normal" and normal.mimic_mask_path is None
    plain = generate_slide(
        tmp_path / "p", "n1", SMALL.model_copy(update={"tumour_fraction": 0.0}), 5
    )
    assert sha256_file(normal.slide_path) == sha256_file(plain.slide_path)

    assert SMALL.tumour_slide_mimic_share_range is None
    site = SynthSiteConfig(name="x", n_slides=3, tumour_share=0.5, **field)
    plans = plan_site(site, SynthCohortConfig(sites=(site,), bank_size=256), seed=0)
    assert all(p.config.tumour_slide_mimic_share_range == (0.4, 0.4) for p in plans)
    _assert_range_refused(
        "tumour_slide_mimic_share_range",
        (((0.2, 0.6), "mimic share"), ((0.4, 0.2), "not ordered")),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("field", "what", "tumour_share", "labels"),
    [
        ("low_grade_share_range", "low_grade", 1.0, ["tumour", "tumour"]),
        ("mimic_share_range", "mimic", 0.5, ["normal", "tumour"]),  # on both kinds of slide
    ],
)
def test_site_share_reaches_its_slides_and_stale_masks_are_removed(
    tmp_path: Path, field: str, what: str, tumour_share: float, labels: list[str]
) -> None:
    """A site's low-grade or mimic share reaches every slide's config, and each slide writes
    its ``_<what>.png`` mask. Regenerating one slide fewer without the option removes both
    the regenerated slide's mask and the mask of the slide that is gone (site clean-up)."""
    site = SynthSiteConfig.model_validate(
        {
            "name": "x",
            "n_slides": 2,
            "tumour_share": tumour_share,
            field: (0.1, 0.3),
            "width_range": (1024, 1024),
            "height_range": (1024, 1024),
            "tumour_fraction_range": (0.2, 0.3),
        }
    )
    cohort = SynthCohortConfig(sites=(site,), bank_size=256)
    assert all(getattr(p.config, field) == (0.1, 0.3) for p in plan_site(site, cohort, seed=0))
    slides = generate_site(tmp_path / "x", site, cohort, seed=0)
    assert sorted(s.label for s in slides) == labels
    masks = sorted(p.name for p in (tmp_path / "x" / "masks").glob(f"*_{what}.png"))
    assert masks == [f"{s.slide_id}_{what}.png" for s in slides]
    for s in slides:
        path = s.low_grade_mask_path if what == "low_grade" else s.mimic_mask_path
        assert path is not None and path.is_file()
    plain = site.model_copy(update={field: (0.0, 0.0), "n_slides": 1})
    (kept,) = generate_site(
        tmp_path / "x", plain, SynthCohortConfig(sites=(plain,), bank_size=256), 0
    )
    assert kept.low_grade_mask_path is None and kept.mimic_mask_path is None
    assert not list((tmp_path / "x" / "masks").glob(f"*_{what}.png"))
