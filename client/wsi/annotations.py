"""Tumour outlines (QuPath GeoJSON, ASAP XML) → per-patch tumour fraction → patch labels.

The entry point the rest of the pipeline imports, kept small by splitting the work by job:
:mod:`client.wsi.polygons` holds the one in-memory outline form (so nothing downstream needs
to know whether an outline came from QuPath or ASAP), :mod:`client.wsi.annotation_formats`
reads and writes the two file formats, and :mod:`client.wsi.coverage` turns a region into
per-patch coverage in one rasterisation pass instead of a polygon clip per patch. What stays
here is what is specific to tumour labelling: combining tumour and exclusion outlines into one
region, snapping fractions, and thresholding them into labels. The names that moved are
re-exported so that ``from client.wsi.annotations import …`` keeps working.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import shapely
from shapely.errors import GEOSException
from shapely.geometry import Polygon as ShapelyPolygon

from client.config import AnnotationConfig
from client.wsi.annotation_formats import (
    ASAP_EXCLUSION_GROUP,
    MAX_ANNOTATION_BYTES,
    QUPATH_CLASS_COLOURS,
    load_annotation,
    write_asap_xml,
    write_qupath_geojson,
)
from client.wsi.coverage import box_fractions
from client.wsi.polygons import Polygon, TumourAnnotation
from common.errors import AnnotationError

__all__ = [
    "ASAP_EXCLUSION_GROUP",
    "MAX_ANNOTATION_BYTES",
    "QUPATH_CLASS_COLOURS",
    "RASTER_TILE_PX",
    "Polygon",
    "TumourAnnotation",
    "load_annotation",
    "patch_labels",
    "tumour_fraction",
    "write_asap_xml",
    "write_qupath_geojson",
]

RASTER_TILE_PX = 1024
"""Side of the rasterisation tile in mask pixels: bounds memory (a few float64 tile-sized
arrays, ≈ 30 MB) whatever the annotated area, at the cost of clipping the outline per tile."""

_FRACTION_EPS = 1e-6
"""Fractions closer than this to 0 or 1 are snapped: they are interpolation round-off, and an
exact 0 matters because ``negative_fraction`` defaults to 0."""


# --------------------------------------------------------------------------------------------
# Per-patch tumour fraction
# --------------------------------------------------------------------------------------------


def tumour_fraction(
    annotation: TumourAnnotation,
    coords: np.ndarray,
    patch_size_level0: int,
    slide_dims: tuple[int, int],
    cfg: AnnotationConfig,
) -> np.ndarray:
    """Share of each patch footprint covered by tumour (holes and exclusions removed).

    The tumour region (union of tumour polygons minus the union of exclusions, clipped to the
    slide) is rasterised at ``cfg.raster_px_per_patch`` pixels per patch side as *exact* area
    coverage, tile by tile over the part of the slide both annotated and patched; each patch is
    then one box sum on the tile's integral image (see :mod:`client.wsi.coverage`). Exact
    coverage matters here because an outline lying on a patch border must not leak into the
    neighbour and turn a certain 0 into −1: grid-aligned outlines give exactly 0 and 1.
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be N×2, got shape {coords.shape}")
    if patch_size_level0 <= 0:
        raise ValueError(f"patch_size_level0 must be positive, got {patch_size_level0}")
    if len(coords) == 0 or not annotation.tumour:
        return np.zeros(len(coords), dtype=np.float32)
    region = _tumour_region(annotation, slide_dims)
    fraction = box_fractions(
        region, coords, int(patch_size_level0), cfg.raster_px_per_patch, RASTER_TILE_PX
    )
    fraction[fraction < _FRACTION_EPS] = 0.0
    fraction[fraction > 1.0 - _FRACTION_EPS] = 1.0
    return fraction.astype(np.float32)


def _tumour_region(annotation: TumourAnnotation, slide_dims: tuple[int, int]) -> Any:
    """One geometry with no overlaps, so that coverage adds up: overlapping tumour outlines
    (common when a pathologist draws in several strokes) would otherwise count twice."""
    width, height = slide_dims
    try:
        tumour = shapely.union_all([_to_shapely(p) for p in annotation.tumour])
        if annotation.exclusions:
            tumour = tumour.difference(
                shapely.union_all([_to_shapely(p) for p in annotation.exclusions])
            )
        return shapely.clip_by_rect(tumour, 0.0, 0.0, float(width), float(height))
    except GEOSException as exc:
        raise AnnotationError(
            str(annotation.source), f"cannot combine tumour and exclusion outlines ({exc})"
        ) from None


def _to_shapely(poly: Polygon) -> ShapelyPolygon:
    return ShapelyPolygon(poly.exterior, poly.holes)


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def patch_labels(fraction: np.ndarray, complete: bool, cfg: AnnotationConfig) -> np.ndarray:
    """1 tumour, 0 normal, −1 unknown.

    A patch below ``negative_fraction`` is only a reliable negative when the pathologist
    outlined *every* tumour region; with a partial annotation an unoutlined patch may still be
    tumour, so it stays unknown. Patches between the thresholds are ambiguous either way, and a
    NaN fraction compares false everywhere and so is unknown too.
    """
    fraction = np.asarray(fraction, dtype=np.float64)
    if fraction.ndim != 1:
        raise ValueError(f"fraction must be 1-D, got shape {fraction.shape}")
    labels = np.full(fraction.shape, -1, dtype=np.int8)
    if complete:
        labels[fraction <= cfg.negative_fraction] = 0
    labels[fraction >= cfg.positive_fraction] = 1
    return labels
