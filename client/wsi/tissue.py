"""Tissue segmentation on a low-resolution view of the slide (DESIGN §4.1, after CLAM).

Stained tissue is coloured and glass is grey-white, so the HSV saturation channel separates
them robustly across stains and scanners. The steps and defaults are CLAM's (median blur 7,
threshold 8, closing 4 px, drop components < a_t·512² level-0 px, fill holes < a_h·512²) but the
result is a raster mask rather than contours: the patch grid then measures the tissue fraction
of every patch with one integral image instead of point-in-polygon tests.

CLAM's a_t is absolute (100·512² = 26 Mpx): on a biopsy or a small region the whole specimen is
below it and nothing is found. By default the threshold is therefore ``min(a_t·512², 1 % of
the largest component)``: identical to CLAM on a resection whose largest piece is at least 100×
a_t·512², and proportionate on smaller specimens (``TissueConfig.min_tissue_area_relative``;
0 restores the absolute rule).

Areas are filtered on connected components (foreground 8-connected, background 4-connected:
the pairing that makes "hole" a well-defined, topologically consistent notion). A component's
area is its pixel count, which already excludes its holes, matching CLAM's contour area minus
hole areas. Small components are dropped first, then small holes filled, so a speck inside a
hole does not keep that hole open.

The mask is computed at about ``seg_downsample``× (64× by default: 32 µm/px at 0.5 µm/px).
When the slide has no level that coarse (single-level files, or pyramids that stop at 16×),
the finest level coarser-or-equal than needed is read in horizontal strips, each shrunk with
``cv2.INTER_AREA`` by an integer factor, so memory stays bounded by one strip whatever the
slide's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from fedpath.client.config import TissueConfig
from fedpath.client.wsi.reader import WsiReader

REF_PATCH_AREA_LEVEL0 = 512 * 512
"""CLAM's reference area: a_t and a_h are multiples of a 512×512 level-0 patch."""

STRIP_BUDGET_BYTES = 32 * 1024 * 1024
"""Upper bound on one RGBA strip read from the slide while building the thumbnail."""

_LEVEL_SLACK = math.sqrt(2.0)
"""A level up to √2× coarser than wanted is still "nearest" (e.g. 90× when 64× is wanted)."""


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask, the level-0 scale of its pixels, and the image it came from."""

    mask: np.ndarray
    downsample: tuple[float, float]
    thumbnail: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.mask.shape[0]), int(self.mask.shape[1])

    @property
    def tissue_area_level0(self) -> float:
        """Tissue area in level-0 px² (mask pixels × pixel area)."""
        return float(np.count_nonzero(self.mask)) * self.downsample[0] * self.downsample[1]


def _close(mask: np.ndarray, size: int) -> np.ndarray:
    """Morphological closing with a size×size square that does not move the mask.

    ``cv2.MORPH_CLOSE`` dilates and erodes with the same anchor; for an even kernel (CLAM's
    default is 4) that shifts every edge by one pixel right and down, i.e. 64 level-0 px at
    64×. Eroding with the mirrored anchor makes the closing exact.
    """
    kernel = np.ones((size, size), dtype=np.uint8)
    centre = size // 2
    mirrored = size - 1 - centre
    dilated = cv2.dilate(mask, kernel, anchor=(centre, centre))
    return cv2.erode(dilated, kernel, anchor=(mirrored, mirrored))


def _median_then_threshold(channel: np.ndarray, kernel: int, threshold: int) -> np.ndarray:
    """``medianBlur(channel, kernel) > threshold`` as uint8 0/1, computed as a majority vote.

    Thresholding commutes with the median (the median exceeds t exactly when more than half
    of the window does), so counting above-threshold pixels with a box filter gives the same
    mask as CLAM's median blur followed by the threshold, bit for bit (same replicated
    border), without the O(k²) histogram median: ~35 ms → ~1 ms on a 1200×900 thumbnail.
    """
    above = (channel > threshold).astype(np.uint8)
    if kernel <= 1:
        return above
    counts = cv2.boxFilter(
        above, cv2.CV_16U, (kernel, kernel), normalize=False, borderType=cv2.BORDER_REPLICATE
    )
    return (counts > (kernel * kernel) // 2).astype(np.uint8)


def _drop_small_components(
    mask: np.ndarray, cfg: TissueConfig, px_per_ref_area: float
) -> np.ndarray:
    """Drop components below ``cfg.min_component_px`` (relative to the largest one)."""
    if cfg.min_tissue_area * px_per_ref_area <= 1:
        return mask  # nothing can be below the threshold (it is at most the absolute one)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if areas.size == 0:
        return mask
    min_area_px = cfg.min_component_px(float(areas.max()), px_per_ref_area)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False  # label 0 is the background
    return keep[labels].astype(np.uint8)


def _fill_small_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    if max_hole_px <= 1:
        return mask
    background = (mask == 0).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
    border = np.unique(np.concatenate((labels[0, :], labels[-1, :], labels[:, 0], labels[:, -1])))
    fill = stats[:, cv2.CC_STAT_AREA] < max_hole_px
    fill[0] = False  # label 0 of the inverted image is the tissue itself
    fill[border] = False  # background touching the edge is glass, not a hole
    if not fill.any():
        return mask
    return (mask.astype(bool) | fill[labels]).astype(np.uint8)


def segment_tissue(rgb: np.ndarray, downsample: float, cfg: TissueConfig) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image whose pixels are ``downsample`` level-0 px wide.

    ``downsample`` only converts the a_t / a_h areas (given in level-0 px) into mask pixels.
    With Otsu, the automatic threshold is floored at ``saturation_threshold`` so a blank
    (all-glass) image does not split its noise into "tissue".
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    if not (math.isfinite(downsample) and downsample > 0):
        raise ValueError(f"downsample must be positive, got {downsample}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        return np.zeros(rgb.shape[:2], dtype=bool)
    saturation = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]
    if cfg.use_otsu:
        if cfg.median_kernel > 1:
            saturation = cv2.medianBlur(saturation, cfg.median_kernel)
        otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = max(float(cfg.saturation_threshold), float(otsu))
        mask = (saturation > threshold).astype(np.uint8)
    else:
        mask = _median_then_threshold(saturation, cfg.median_kernel, cfg.saturation_threshold)
    if cfg.closing_px > 1:
        mask = _close(mask, cfg.closing_px)
    px_per_ref_area = REF_PATCH_AREA_LEVEL0 / (downsample * downsample)
    mask = _drop_small_components(mask, cfg, px_per_ref_area)
    mask = _fill_small_holes(mask, cfg.max_hole_area * px_per_ref_area)
    return mask.astype(bool)


def choose_segmentation_level(
    level_downsamples: tuple[float, ...], wanted: float
) -> tuple[int, int]:
    """(level, integer shrink factor) whose product is nearest ``wanted`` without reading more
    than needed: the coarsest level at most √2× coarser than wanted, then shrunk by the integer
    factor that brings it closest to ``wanted``."""
    eligible = [i for i, d in enumerate(level_downsamples) if d <= wanted * _LEVEL_SLACK]
    if not eligible:  # every level is far coarser than wanted: use the finest as it is
        finest = min(range(len(level_downsamples)), key=lambda i: level_downsamples[i])
        return finest, 1
    level = max(eligible, key=lambda i: level_downsamples[i])
    factor = max(1, math.floor(wanted / level_downsamples[level] + 0.5))
    return level, factor


def read_thumbnail(reader: WsiReader, level: int, factor: int) -> np.ndarray:
    """The whole of ``level`` shrunk ``factor``× (INTER_AREA), read in bounded strips.

    The level is padded up to a multiple of ``factor`` on the right and bottom; OpenSlide
    returns transparent pixels there, which the reader composites to white (glass), so the
    padding never looks like tissue and every output pixel averages exactly factor² inputs.
    """
    width, height = reader.info.level_dimensions[level]
    level_ds = reader.info.level_downsamples[level]
    out_w, out_h = math.ceil(width / factor), math.ceil(height / factor)
    padded_w = out_w * factor
    rows_per_block = max(1, STRIP_BUDGET_BYTES // (padded_w * 4 * factor))
    thumbnail = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for out_row in range(0, out_h, rows_per_block):
        n_out = min(rows_per_block, out_h - out_row)
        y_level = out_row * factor
        location = (0, round(y_level * level_ds))
        strip = reader.read_region(location, level, (padded_w, n_out * factor))
        if factor > 1:
            strip = cv2.resize(strip, (out_w, n_out), interpolation=cv2.INTER_AREA)
        thumbnail[out_row : out_row + n_out] = strip
    return thumbnail


def tissue_mask_for_slide(reader: WsiReader, cfg: TissueConfig) -> TissueMask:
    """Segment a slide at about ``cfg.seg_downsample``× and record the mask's level-0 scale."""
    info = reader.info
    level, factor = choose_segmentation_level(info.level_downsamples, cfg.seg_downsample)
    thumbnail = read_thumbnail(reader, level, factor)
    level_w, level_h = info.level_dimensions[level]
    downsample = (
        info.dimensions[0] / level_w * factor,
        info.dimensions[1] / level_h * factor,
    )
    mask = segment_tissue(thumbnail, math.sqrt(downsample[0] * downsample[1]), cfg)
    return TissueMask(mask=mask, downsample=downsample, thumbnail=thumbnail)
