"""Tumour outlines (QuPath GeoJSON, ASAP XML) → per-patch tumour fraction → patch labels.

The entry point the rest of the pipeline imports, kept small by splitting the work by job:
:mod:`fedpath.client.wsi.polygons` holds the one in-memory outline form (so nothing downstream needs
to know whether an outline came from QuPath or ASAP), :mod:`fedpath.client.wsi.annotation_formats`
reads and writes the two file formats, and :mod:`fedpath.client.wsi.coverage` turns a region into
per-patch coverage in one rasterisation pass instead of a polygon clip per patch. What stays
here is what is specific to tumour labelling: combining tumour and exclusion outlines into one
region, snapping fractions, thresholding them into labels, and deciding whether a slide's
annotation may give patch labels at all (:func:`annotation_outcome`: a tumour slide whose
outlines hold no tumour must not become a slide of normal patches). The names that moved are
re-exported so that ``from fedpath.client.wsi.annotations import …`` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.errors import GEOSException
from shapely.geometry import Polygon as ShapelyPolygon

from fedpath.client.config import UNCLASSIFIED, AnnotationConfig
from fedpath.client.wsi.annotation_formats import (
    ASAP_EXCLUSION_GROUP,
    MAX_ANNOTATION_BYTES,
    QUPATH_CLASS_COLOURS,
    load_annotation,
    write_asap_xml,
    write_qupath_geojson,
)
from fedpath.client.wsi.coverage import box_fractions
from fedpath.client.wsi.polygons import Polygon, TumourAnnotation
from fedpath.common.errors import AnnotationError

__all__ = [
    "ASAP_EXCLUSION_GROUP",
    "MAX_ANNOTATION_BYTES",
    "QUPATH_CLASS_COLOURS",
    "RASTER_TILE_PX",
    "AnnotationOutcome",
    "Polygon",
    "TumourAnnotation",
    "annotation_outcome",
    "describe_found",
    "load_annotation",
    "patch_labels",
    "slide_patch_labels",
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
    then one box sum on the tile's integral image (see :mod:`fedpath.client.wsi.coverage`). Exact
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


# --------------------------------------------------------------------------------------------
# Whether an annotation may label a slide's patches
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotationOutcome:
    """What one slide's annotation gave: its outlines, and whether they may label patches.

    ``patch_labels`` is False when a tumour slide's annotation holds no tumour region and the
    user chose ``on_no_tumour_region = "slide_label_only"``; ``note`` then says why, for the
    slide's status and the summary.
    """

    annotation: TumourAnnotation
    tumour_slide: bool
    patch_labels: bool
    note: str | None = None
    tumour_patches: int | None = None

    def summary(self) -> dict[str, Any]:
        """The facts written to ``status/<id>.json`` (no coordinates, nothing to trust blindly)."""
        a = self.annotation
        return {
            "file": a.source.name,
            "tumour_regions": len(a.tumour),
            "exclusion_regions": len(a.exclusions),
            "classes_found": dict(a.classes_found),
            "unknown_classes": list(a.unknown_classes),
            "ignored_geometries": dict(a.ignored_geometries),
            "patch_labels": self.patch_labels,
            "note": self.note,
        }


class NoTumourRegionError(AnnotationError):
    """A tumour slide's annotation gives no tumour region; ``summary`` is what it did hold
    (classes found, unknown ones, ignored geometries), for the failed slide's status file."""

    def __init__(self, path: str, reason: str, summary: dict[str, Any]) -> None:
        super().__init__(path, reason)
        self.summary = summary


def annotation_outcome(
    path: Path,
    cfg: AnnotationConfig,
    slide_dims: tuple[int, int],
    *,
    tumour_slide: bool,
) -> AnnotationOutcome:
    """Load a slide's annotation and decide whether it may label the slide's patches.

    A slide labelled tumour whose annotation yields no tumour region (no outline of a tumour
    class, an empty file, outlines wholly cut out by exclusions) would otherwise be prepared
    as every patch normal: a wrong label that mixed supervision trusts. It raises
    ``AnnotationError`` naming the classes found, or, with ``on_no_tumour_region =
    "slide_label_only"``, gives an outcome without patch labels. On a normal slide an
    annotation without tumour is what one expects: every patch normal.
    """
    annotation = load_annotation(path, cfg, slide_dims)
    if not tumour_slide:
        return AnnotationOutcome(annotation, tumour_slide, patch_labels=True)
    problem = _no_tumour_problem(annotation, slide_dims)
    if problem is None:
        return AnnotationOutcome(annotation, tumour_slide, patch_labels=True)
    return _without_patch_labels(annotation, problem, cfg)


def slide_patch_labels(
    outcome: AnnotationOutcome,
    coords: np.ndarray,
    patch_size_level0: int,
    slide_dims: tuple[int, int],
    complete: bool,
    cfg: AnnotationConfig,
) -> tuple[AnnotationOutcome, np.ndarray | None, np.ndarray | None]:
    """Per-patch tumour fractions and labels of a slide, or ``(outcome, None, None)``.

    A tumour slide whose outlines exist but touch no tissue patch (drawn beside the tissue,
    or with other coordinates) would be all normal too: it is handled like a slide without
    tumour region, and the returned outcome says so. Outlines that touch patches but fill
    none to ``positive_fraction`` (a micrometastasis smaller than a patch) are kept: those
    patches are unknown (−1), which is true.
    """
    if not outcome.patch_labels:
        return outcome, None, None
    fraction = tumour_fraction(outcome.annotation, coords, patch_size_level0, slide_dims, cfg)
    labels = patch_labels(fraction, complete, cfg)
    tumour_patches = int((labels == 1).sum())
    if outcome.tumour_slide and len(fraction) and not fraction.any():
        problem = (
            f"{_NO_TUMOUR} (its {len(outcome.annotation.tumour)} tumour outline(s) touch none "
            f"of its {len(fraction)} tissue patches: wrong slide or wrong coordinates?)"
        )
        return _without_patch_labels(outcome.annotation, problem, cfg), None, None
    notes = [outcome.note] if outcome.note else []
    name = outcome.annotation.source.name
    if not outcome.tumour_slide and tumour_patches:
        # Not refused: with labels such as "luad,lusc" the first label has tumour too.
        notes.append(
            f"annotation {name} outlines tumour on {tumour_patches} patch(es) of a slide with "
            "the first (normal) label: check the slide's label"
        )
    ignored = outcome.annotation.ignored_geometries
    if ignored:
        listed = ", ".join(f"{n} {kind}" for kind, n in ignored.items())
        notes.append(f"annotation {name}: ignored (no area): {listed}")
    note = "; ".join(notes) or None
    kept = AnnotationOutcome(outcome.annotation, outcome.tumour_slide, True, note, tumour_patches)
    return kept, fraction, labels


def _no_tumour_problem(annotation: TumourAnnotation, slide_dims: tuple[int, int]) -> str | None:
    """Why this annotation holds no tumour region, or None when it holds one."""
    if not annotation.tumour:
        return _NO_TUMOUR
    if _tumour_region(annotation, slide_dims).area <= 0:
        return f"{_NO_TUMOUR} (every tumour outline lies inside an exclusion outline)"
    return None


_NO_TUMOUR = "no tumour region on a tumour slide"


def _without_patch_labels(
    annotation: TumourAnnotation, problem: str, cfg: AnnotationConfig
) -> AnnotationOutcome:
    """Fail, or keep only the slide label, as ``cfg.on_no_tumour_region`` says."""
    found = describe_found(annotation)
    if cfg.on_no_tumour_region == "fail":
        raise NoTumourRegionError(
            str(annotation.source),
            f"{problem}: {found}; tumour classes are "
            f"{', '.join(cfg.tumour_classes)} (set [annotation] tumour_classes or "
            "--tumour-classes; or --on-no-tumour-region slide_label_only to prepare it "
            "with its slide label only)",
            AnnotationOutcome(annotation, True, patch_labels=False, note=problem).summary(),
        )
    note = (
        f"slide label only, no patch labels: annotation {annotation.source.name}: "
        f"{problem}: {found}"
    )
    return AnnotationOutcome(annotation, True, patch_labels=False, note=note)


def describe_found(annotation: TumourAnnotation) -> str:
    """'classes found "Stroma" (3), "Tumorgewebe" (1, unknown), unclassified (1)', and the
    outlines ignored for having no area. "unknown": in none of the configured class lists."""
    if annotation.classes_found:
        unknown = set(annotation.unknown_classes)
        parts = [
            f"unclassified ({n})"
            if name == UNCLASSIFIED
            else f'"{name}" ({n}{", unknown" if name in unknown else ""})'
            for name, n in annotation.classes_found.items()
        ]
        text = "classes found " + ", ".join(parts)
    else:
        text = "the file holds no outline"
    if annotation.ignored_geometries:
        ignored = ", ".join(f"{n} {kind}" for kind, n in annotation.ignored_geometries.items())
        text += f"; ignored (no area): {ignored}"
    return text
