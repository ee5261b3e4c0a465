"""Per-slide quality-control outputs a person can check: a PNG and editable tissue contours.

Automatic tissue detection fails in known ways (pen marks, bubbles, faint stains, folds), and
the person who can tell is a pathologist or technician at the hospital, not the code. The PNG
shows the thumbnail with the detected tissue outline and every kept patch (coloured by label
when labels exist) so a glance over a folder of PNGs finds bad slides. The GeoJSON carries the
same outline in level-0 coordinates as QuPath annotations, so a wrong mask can be corrected in
QuPath rather than by tuning thresholds.

Drawing uses OpenCV only (no matplotlib figure machinery: faster, and no global pyplot state
when slides are prepared in threads).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fedpath.client.wsi.patching import PatchGrid
from fedpath.client.wsi.reader import WsiReader
from fedpath.client.wsi.tissue import TissueMask, choose_segmentation_level, read_thumbnail
from fedpath.common.atomic import atomic_write_bytes
from fedpath.common.errors import FedpathError

QC_MIN_SIDE = 800
"""Small masks (a 2,000 px slide gives a 35-px mask at 64×) are enlarged to be readable."""

QC_MAX_SIDE = 2000
"""Large thumbnails are shrunk so a QC folder stays small."""

# Colours in BGR (OpenCV's order).
TISSUE_OUTLINE = (0, 170, 0)
PATCH_UNLABELLED = (200, 90, 0)
LABEL_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (40, 40, 230),  # tumour: red
    0: (200, 90, 0),  # normal: blue
    -1: (0, 200, 230),  # unknown: yellow
}
LABEL_NAMES: dict[int, str] = {1: "tumour", 0: "normal", -1: "unknown"}
_BANNER_PX = 56
_FILL_ALPHA = 0.35


def _canvas_scale(height: int, width: int) -> float:
    longest = max(height, width, 1)
    if longest < QC_MIN_SIDE:
        return float(math.ceil(QC_MIN_SIDE / longest))
    if longest > QC_MAX_SIDE:
        return QC_MAX_SIDE / longest
    return 1.0


def _patch_rectangles(grid: PatchGrid, downsample: tuple[float, float], scale: float) -> np.ndarray:
    """N×4×2 int32 corners of each patch on the canvas (``downsample``: level-0 px per px)."""
    dx, dy = downsample
    x0 = grid.coords[:, 0] / dx * scale
    y0 = grid.coords[:, 1] / dy * scale
    x1 = (grid.coords[:, 0] + grid.patch_size_level0) / dx * scale
    y1 = (grid.coords[:, 1] + grid.patch_size_level0) / dy * scale
    corners = np.stack(
        (
            np.stack((x0, y0), axis=1),
            np.stack((x1, y0), axis=1),
            np.stack((x1, y1), axis=1),
            np.stack((x0, y1), axis=1),
        ),
        axis=1,
    )
    return np.round(corners).astype(np.int32)


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only; anything else becomes '?'."""
    return text.encode("ascii", errors="replace").decode("ascii")


def render_qc_image(
    mask: TissueMask,
    grid: PatchGrid,
    *,
    title: str,
    patch_labels: np.ndarray | None = None,
    background: tuple[np.ndarray, tuple[float, float]] | None = None,
) -> np.ndarray:
    """The QC picture as an H×W×3 uint8 RGB array (what ``render_qc_png`` encodes).

    ``background`` is a sharper RGB picture of the slide with its level-0 px per pixel
    (see :func:`qc_background`); by default the segmentation thumbnail is used.
    """
    if patch_labels is not None and patch_labels.shape != (len(grid),):
        raise ValueError(f"patch_labels has shape {patch_labels.shape}, expected ({len(grid)},)")
    base, base_ds = (mask.thumbnail, mask.downsample) if background is None else background
    height, width = base.shape[:2]
    scale = _canvas_scale(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_NEAREST if scale > 1 else cv2.INTER_AREA
    image = cv2.resize(cv2.cvtColor(base, cv2.COLOR_RGB2BGR), size, interpolation=interpolation)
    rects = _patch_rectangles(grid, base_ds, scale)
    if len(grid):
        groups: list[tuple[np.ndarray, tuple[int, int, int]]]
        if patch_labels is None:
            groups = [(rects, PATCH_UNLABELLED)]
        else:
            groups = [
                (rects[patch_labels == value], colour) for value, colour in LABEL_COLOURS.items()
            ]
        overlay = image.copy()
        for group, colour in groups:
            if len(group):
                cv2.fillPoly(overlay, list(group), colour)
        image = cv2.addWeighted(overlay, _FILL_ALPHA, image, 1.0 - _FILL_ALPHA, 0.0)
        thickness = 1
        for group, colour in groups:
            if len(group):
                cv2.polylines(image, list(group), True, colour, thickness)
    # The mask covers level-0 (0, 0) to (mask px × its downsample): map it onto the canvas.
    outline_size = (
        max(1, round(mask.mask.shape[1] * mask.downsample[0] / base_ds[0] * scale)),
        max(1, round(mask.mask.shape[0] * mask.downsample[1] / base_ds[1] * scale)),
    )
    big = np.zeros((size[1], size[0]), dtype=np.uint8)
    resized = cv2.resize(mask.mask.astype(np.uint8), outline_size, interpolation=cv2.INTER_NEAREST)
    rows, cols = min(size[1], resized.shape[0]), min(size[0], resized.shape[1])
    big[:rows, :cols] = resized[:rows, :cols]
    contours, _ = cv2.findContours(big, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, TISSUE_OUTLINE, max(2, round(size[0] / 500)))
    return cv2.cvtColor(_with_banner(image, title, grid, patch_labels), cv2.COLOR_BGR2RGB)


def _with_banner(
    image: np.ndarray, title: str, grid: PatchGrid, patch_labels: np.ndarray | None
) -> np.ndarray:
    banner = np.full((_BANNER_PX, image.shape[1], 3), 255, dtype=np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(banner, _ascii(title), (8, 22), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    summary = f"{len(grid)} patches"
    if patch_labels is not None:
        counts = [
            f"{name} {int(np.count_nonzero(patch_labels == value))}"
            for value, name in LABEL_NAMES.items()
        ]
        summary += " | " + ", ".join(counts)
    cv2.putText(banner, summary, (8, 46), font, 0.5, (60, 60, 60), 1, cv2.LINE_AA)
    return np.vstack((banner, image))


def render_qc_png(
    path: Path,
    mask: TissueMask,
    grid: PatchGrid,
    *,
    title: str,
    patch_labels: np.ndarray | None = None,
    background: tuple[np.ndarray, tuple[float, float]] | None = None,
) -> None:
    """Write the QC picture (thumbnail, tissue outline, patch grid, title) as a PNG, atomically."""
    rgb = render_qc_image(mask, grid, title=title, patch_labels=patch_labels, background=background)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise FedpathError(f"QC image {path}: OpenCV could not encode it as PNG")
    atomic_write_bytes(path, encoded.tobytes())


def qc_background(
    reader: WsiReader, mask: TissueMask
) -> tuple[np.ndarray, tuple[float, float]] | None:
    """A thumbnail sharp enough for a pathologist to judge the tissue outline, or None.

    The segmentation thumbnail (~64× downsample) is plenty for a resection; for a small
    specimen it is a few dozen pixels wide and would be shown as blocks. Then a finer level
    is read, sized to about ``QC_MIN_SIDE`` px on its long side.
    """
    if max(mask.thumbnail.shape[:2]) >= QC_MIN_SIDE:
        return None
    return slide_thumbnail(reader, QC_MIN_SIDE)


def slide_thumbnail(reader: WsiReader, longest_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """The whole slide as RGB with about ``longest_side`` px on its long side, and its scale.

    Returns the image and its level-0 px per pixel (x, y). Read from the pyramid level nearest
    the wanted scale and shrunk by an integer factor (see ``choose_segmentation_level``), so
    the size is within about √2 of ``longest_side``; never upsampled beyond level 0. Shared by
    the QC pictures and the heatmaps so both show a slide the same way.
    """
    if longest_side < 1:
        raise ValueError(f"longest_side must be positive, got {longest_side}")
    width, height = reader.info.dimensions
    wanted = max(width, height) / longest_side
    level, factor = choose_segmentation_level(reader.info.level_downsamples, max(1.0, wanted))
    image = read_thumbnail(reader, level, factor)
    ds = reader.info.level_downsamples[level] * factor
    return image, (ds, ds)


def _ring_level0(points: np.ndarray, downsample: tuple[float, float]) -> list[list[float]]:
    """Closed ring in level-0 px from mask-pixel points (taken at pixel centres)."""
    dx, dy = downsample
    xy = np.column_stack(((points[:, 0] + 0.5) * dx, (points[:, 1] + 0.5) * dy))
    ring = [[round(float(x), 2), round(float(y), 2)] for x, y in xy]
    ring.append(ring[0])
    return ring


def _box_ring(contour: np.ndarray) -> np.ndarray:
    """Pixel-edge box around a contour too thin to be a polygon (a 1-px line or dot)."""
    x, y, w, h = cv2.boundingRect(contour)
    return np.array(
        [
            [x - 0.5, y - 0.5],
            [x + w - 0.5, y - 0.5],
            [x + w - 0.5, y + h - 0.5],
            [x - 0.5, y + h - 0.5],
        ],
        dtype=np.float64,
    )


def tissue_contours_geojson(mask: TissueMask) -> dict[str, Any]:
    """Tissue outline as a QuPath-importable FeatureCollection of Polygons in level-0 px.

    One Polygon per tissue component, its holes as interior rings. Contours follow the
    centres of boundary mask pixels (OpenCV's convention), i.e. half a mask pixel inside the
    pixel edges; components too thin to have an area become their pixel-edge bounding box.
    """
    contours, hierarchy = cv2.findContours(
        mask.mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    features: list[dict[str, Any]] = []
    if hierarchy is None:
        return {"type": "FeatureCollection", "features": features}
    links = hierarchy[0]  # [next, previous, first_child, parent]
    for index, contour in enumerate(contours):
        if links[index][3] != -1:
            continue  # a hole; emitted with its parent
        outer = contour[:, 0, :].astype(np.float64)
        if len(np.unique(outer, axis=0)) < 3:
            outer = _box_ring(contour)
        rings = [_ring_level0(outer, mask.downsample)]
        child = links[index][2]
        while child != -1:
            hole = contours[child][:, 0, :].astype(np.float64)
            if len(np.unique(hole, axis=0)) >= 3:
                rings.append(_ring_level0(hole, mask.downsample))
            child = links[child][0]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tissue"},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}
