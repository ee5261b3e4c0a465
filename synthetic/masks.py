"""Ground-truth geometry of a synthetic slide, defined on a coarse mask grid.

Tissue and tumour are decided once, at ``downsample`` level-0 px per mask px, and everything
else follows from these two masks: the renderer upsamples them (bilinear, threshold 0.5) to
decide each level-0 pixel, and the annotations are the contours of that same upsampled
surface. So the written masks, the outlines and the pixels can never disagree by more than
the contour tracing step.

Areas are set by quantiles of a random "distance-like" field rather than by drawing shapes
of a guessed size: thresholding at the right quantile gives exactly the requested share of
pixels while the field's noise makes the outline irregular.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import shapely
from shapely.geometry import Polygon as ShapelyPolygon

from fedpath.client.wsi.annotations import Polygon

MAX_CONTOUR_RASTER_PX = 16_000_000
"""Largest upsampled component raster traced at once (float32: 64 MB)."""


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian-smoothed noise; coarse grid + resize when σ is large."""
    h, w = shape
    factor = 1
    while factor * 2 <= sigma_px / 3.0:
        factor *= 2
    sigma = max(sigma_px / factor, 0.5)
    pad = 2
    hc, wc = math.ceil(h / factor) + 2 * pad, math.ceil(w / factor) + 2 * pad
    coarse = cv2.GaussianBlur(
        rng.standard_normal((hc, wc), dtype=np.float32),
        (0, 0),
        sigma,
        borderType=cv2.BORDER_REFLECT,
    )
    if factor > 1:
        coarse = cv2.resize(coarse, (wc * factor, hc * factor), interpolation=cv2.INTER_CUBIC)
    start = pad * factor
    field = np.ascontiguousarray(coarse[start : start + h, start : start + w])
    mean, std = cv2.meanStdDev(field)
    field -= np.float32(mean[0, 0])
    return field / np.float32(std[0, 0]) if std[0, 0] > 0 else field


def _ellipse_distance(
    shape: tuple[int, int],
    center: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
    wobble: np.ndarray,
) -> np.ndarray:
    """Normalised elliptic distance (1 on the outline) with a radius that varies with bearing.

    ``wobble`` holds (amplitude, phase) pairs of harmonics 2, 3, …: a noisy-radius blob.
    """
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = x - np.float32(center[0]), y - np.float32(center[1])
    ca, sa = math.cos(angle), math.sin(angle)
    u = (dx * ca + dy * sa) / np.float32(radii[0])
    v = (-dx * sa + dy * ca) / np.float32(radii[1])
    dist = np.sqrt(u * u + v * v)
    bearing = np.arctan2(v, u)
    radius = np.ones_like(dist)
    for k, (amp, phase) in enumerate(wobble, start=2):
        radius += np.float32(amp) * np.cos(k * bearing + np.float32(phase))
    return dist / np.maximum(radius, 0.3)


def _keep_top(field: np.ndarray, allowed: np.ndarray, count: int) -> np.ndarray:
    """Mask of the ``count`` largest ``field`` values among ``allowed`` pixels."""
    values = field[allowed]
    count = int(min(max(count, 1), values.size))
    threshold = np.partition(values, values.size - count)[values.size - count]
    return allowed & (field >= threshold)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill every hole: background not 4-connected to the image border becomes foreground."""
    padded = np.pad(mask.astype(np.uint8), 1)
    outside = padded.copy()
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), dtype=np.uint8)
    cv2.floodFill(outside, flood, (0, 0), 2, flags=4)
    return (outside != 2)[1:-1, 1:-1]


def drop_small_components(mask: np.ndarray, min_share_of_largest: float) -> np.ndarray:
    """Remove crumbs: components smaller than a share of the largest one."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask.copy()
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n, dtype=bool)
    keep[1:] = areas >= min_share_of_largest * areas.max()
    return keep[labels]


def drop_nested_islands(mask: np.ndarray) -> np.ndarray:
    """Remove components that sit inside a hole of another component.

    ASAP XML (Camelyon16) writes holes as exclusion polygons subtracted from every tumour
    polygon, so an island inside a hole would vanish from that format; removing such islands
    keeps the mask, GeoJSON and XML describing the same region.
    """
    m = mask.astype(np.uint8)
    padded = np.pad(m, 1)
    outside = padded.copy()
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), dtype=np.uint8)
    cv2.floodFill(outside, flood, (0, 0), 2, flags=4)
    outer = (outside == 2)[1:-1, 1:-1].astype(np.uint8)
    touches = cv2.dilate(outer, np.ones((3, 3), np.uint8)).astype(bool) & mask
    n, labels = cv2.connectedComponents(m, connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[np.unique(labels[touches])] = True
    keep[0] = False
    return keep[labels]


COARSE_FIELD_SIDE = 1024
"""Shape fields are smooth, so they are computed on a grid of at most about this many pixels
per side and interpolated up: a 60,000-pixel slide's masks then cost seconds and ~300 MB
instead of a dozen full-resolution float temporaries."""


def _coarse_factor(shape: tuple[int, int], finest_sigma_px: float) -> int:
    """Grid reduction keeping at least two coarse pixels per σ of the finest noise."""
    by_size = max(shape) // COARSE_FIELD_SIDE
    return int(max(1, min(by_size, finest_sigma_px // 2)))


def _upsample(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if field.shape == shape:
        return field
    return cv2.resize(field, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def make_tissue_mask(
    rng: np.random.Generator, shape: tuple[int, int], fraction: float, pieces: int
) -> np.ndarray:
    """Irregular tissue pieces covering about ``fraction`` of the slide, clear of its edges."""
    h, w = shape
    cols = math.ceil(math.sqrt(pieces * w / max(h, 1)))
    rows = math.ceil(pieces / cols)
    scale = min(w / cols, h / rows)
    f = _coarse_factor(shape, 0.025 * scale)
    ch, cw = math.ceil(h / f), math.ceil(w / f)
    cell_w, cell_h = cw / cols, ch / rows
    cells = rng.permutation(rows * cols)[:pieces]
    field = np.full((ch, cw), -np.inf, dtype=np.float32)
    for cell in cells:
        r, c = divmod(int(cell), cols)
        center = (
            (c + 0.5 + rng.uniform(-0.12, 0.12)) * cell_w,
            (r + 0.5 + rng.uniform(-0.12, 0.12)) * cell_h,
        )
        radii = (cell_w * rng.uniform(0.33, 0.48), cell_h * rng.uniform(0.33, 0.48))
        wobble = np.stack([rng.uniform(0, 0.12, 4), rng.uniform(0, 2 * math.pi, 4)], axis=1)
        dist = _ellipse_distance((ch, cw), center, radii, rng.uniform(0, math.pi), wobble)
        field = np.maximum(field, 1.0 - dist)
    coarse_scale = min(cell_w, cell_h)
    field += 0.3 * smooth_noise(rng, (ch, cw), 0.12 * coarse_scale)
    field += 0.06 * smooth_noise(rng, (ch, cw), 0.025 * coarse_scale)
    # Keep glass around the tissue, as on a real slide: a hard margin, and a soft band that
    # bends outlines away from the slide edge instead of cutting them straight.
    side = min(ch, cw)
    y, x = np.ogrid[0:ch, 0:cw]
    edge = np.minimum(np.minimum(x, cw - 1 - x), np.minimum(y, ch - 1 - y)).astype(np.float32)
    field -= 10.0 * np.clip(1.0 - edge / np.float32(max(2.0, 0.03 * side)), 0.0, None)
    field -= 1.5 * np.clip(1.0 - edge / np.float32(max(3.0, 0.15 * side)), 0.0, None) ** 2
    field = _upsample(field, shape)
    mask = _keep_top(field, np.ones(shape, dtype=bool), round(fraction * h * w))
    del field
    mask = drop_small_components(mask, 0.05)
    return fill_holes(mask)


def make_tumour_mask(
    rng: np.random.Generator, tissue: np.ndarray, fraction: float, foci: int
) -> np.ndarray:
    """Tumour covering ``fraction`` of the tissue pixels, grown from ``foci`` seeds.

    Seeds are drawn preferentially deep inside the tissue (weight ∝ distance to the edge²);
    each focus is a noisy-radius blob whose size is proportional to its share, and the
    union is cut at the quantile that gives the requested area, so a single small focus is
    a micro-metastasis and a large fraction swallows most of the tissue.
    """
    if fraction <= 0 or not tissue.any():
        return np.zeros_like(tissue, dtype=bool)
    shape = tissue.shape
    n_tissue = int(tissue.sum())
    base = math.sqrt(fraction * n_tissue / (math.pi * foci))
    f = _coarse_factor(shape, 0.08 * base)
    ch, cw = math.ceil(shape[0] / f), math.ceil(shape[1] / f)
    coarse_tissue = tissue
    if f > 1:
        small = cv2.resize(tissue.astype(np.float32), (cw, ch), interpolation=cv2.INTER_AREA)
        coarse_tissue = small >= 0.5
        if not coarse_tissue.any():
            coarse_tissue = small > 0
    depth = cv2.distanceTransform(np.pad(coarse_tissue.astype(np.uint8), 1), cv2.DIST_L2, 5)
    weights = depth[1:-1, 1:-1][coarse_tissue].astype(np.float64) ** 2
    ys, xs = np.nonzero(coarse_tissue)
    picks = rng.choice(len(ys), size=foci, replace=True, p=weights / weights.sum())
    shares = rng.uniform(0.6, 1.4, foci)
    coarse_base = base / f
    field = np.full((ch, cw), -np.inf, dtype=np.float32)
    for pick, share in zip(picks, shares, strict=True):
        radius = max(coarse_base * share, 1.0 / f)
        aspect = rng.uniform(1.0, 1.8)
        wobble = np.stack([rng.uniform(0, 0.1, 4), rng.uniform(0, 2 * math.pi, 4)], axis=1)
        dist = _ellipse_distance(
            (ch, cw),
            (float(xs[pick]), float(ys[pick])),
            (radius * math.sqrt(aspect), radius / math.sqrt(aspect)),
            rng.uniform(0, math.pi),
            wobble,
        )
        field = np.maximum(field, 1.0 - dist)
    field += 0.22 * smooth_noise(rng, (ch, cw), max(0.35 * coarse_base, 1.0))
    field += 0.07 * smooth_noise(rng, (ch, cw), max(0.08 * coarse_base, 0.7))
    field = _upsample(field, shape)
    mask = _keep_top(field, tissue, round(fraction * n_tissue))
    return drop_nested_islands(mask)


def contiguous_share(
    rng: np.random.Generator, region: np.ndarray, share: float, sigma_px: float
) -> np.ndarray:
    """The ``share`` of ``region``'s pixels where a smooth random field is lowest.

    The field's correlation ``sigma_px`` (mask px) makes the result contiguous areas, a few
    patches across, rather than speckle, and the quantile cut makes it exactly the requested
    share. Empty when the share rounds to no pixel (or the region is empty).
    """
    count = round(share * int(region.sum()))
    if count <= 0:
        return np.zeros_like(region, dtype=bool)
    field = smooth_noise(rng, region.shape, sigma_px)
    return _keep_top(-field, region.astype(bool), count)


def low_grade_mask(
    rng: np.random.Generator, tumour: np.ndarray, share: float, sigma_px: float
) -> np.ndarray:
    """The part of ``tumour`` rendered with the subtle (low-grade) morphology.

    Contiguous areas covering exactly ``share`` of the tumour (``contiguous_share``), so the
    rest (at least ``1 − share``) stays conspicuous.
    """
    return contiguous_share(rng, tumour, share, sigma_px)


def mimic_mask(
    rng: np.random.Generator,
    tissue: np.ndarray,
    tumour: np.ndarray,
    share: float,
    sigma_px: float,
) -> np.ndarray:
    """The part of the non-tumour tissue rendered as the benign mimic of low-grade tumour.

    Contiguous areas covering ``share`` of ``tissue & ~tumour``, on normal slides and in the
    normal tissue of tumour slides alike: the mimic must not be what tells tumour slides
    apart, only the cells inside the cords may. Never inside the tumour, whose truth it leaves
    unchanged.
    """
    return contiguous_share(rng, tissue.astype(bool) & ~tumour.astype(bool), share, sigma_px)


def partial_annotation_mask(
    rng: np.random.Generator, tumour: np.ndarray, fraction: float
) -> np.ndarray:
    """The part of the tumour a hurried pathologist outlined: some regions, not all.

    Whole regions (connected components) are taken in random order until about ``fraction``
    of the tumour area is covered, never all of them; a single region is cut to a disc around
    one of its pixels instead, so even a one-focus slide has a genuinely partial outline.
    """
    if fraction >= 1.0 or not tumour.any():
        return tumour.copy()
    n, labels, stats, _ = cv2.connectedComponentsWithStats(tumour.astype(np.uint8), connectivity=8)
    total = float(stats[1:, cv2.CC_STAT_AREA].sum())
    if n > 2:
        chosen: list[int] = []
        covered = 0.0
        for label in rng.permutation(np.arange(1, n)):
            if covered >= fraction * total or len(chosen) == n - 2:
                break
            chosen.append(int(label))
            covered += float(stats[label, cv2.CC_STAT_AREA])
        return np.isin(labels, chosen)
    ys, xs = np.nonzero(tumour)
    pick = int(rng.integers(len(ys)))
    y, x = np.ogrid[0 : tumour.shape[0], 0 : tumour.shape[1]]
    dist2 = (x - xs[pick]) ** 2 + (y - ys[pick]) ** 2
    inside = dist2[tumour]
    k = max(1, min(len(inside) - 1, round(fraction * total)))
    radius2 = np.partition(inside, k - 1)[k - 1]
    return tumour & (dist2 <= radius2)


def thickness_field(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Slow ±10 % variation of section thickness / staining intensity across the slide."""
    scale = 0.25 * min(shape)
    return (1.0 + 0.1 * smooth_noise(rng, shape, max(scale, 1.0))).astype(np.float32)


def mask_polygons(mask: np.ndarray, downsample: int) -> list[Polygon]:
    """Level-0 outlines (with holes) of a mask, matching the rendered boundary.

    The renderer decides a level-0 pixel by bilinear interpolation of the mask (mask pixel
    centres at level-0 ((j + ½)·ds, (i + ½)·ds)) thresholded at ½. Each connected component
    is upsampled the same way by a factor k and traced with ``cv2.findContours``
    (RETR_CCOMP: outer boundaries and their holes), so vertices lie within ds/(2k) level-0 px
    of the rendered edge, and rasterising the outlines at mask resolution gives the mask.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    polygons: list[Polygon] = []
    margin = 2
    for label in range(1, n):
        x0, y0, bw, bh = (int(v) for v in stats[label, :4])
        area = (bw + 2 * margin) * (bh + 2 * margin)
        k = int(max(1, min(4, math.floor(math.sqrt(MAX_CONTOUR_RASTER_PX / area)))))
        crop = (labels[y0 : y0 + bh, x0 : x0 + bw] == label).astype(np.float32)
        crop = np.pad(crop, margin)
        up = crop
        if k > 1:
            up = cv2.resize(crop, None, fx=k, fy=k, interpolation=cv2.INTER_LINEAR)
        binary = (up >= 0.5).astype(np.uint8)
        contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        if hierarchy is None:
            continue
        origin = np.array([x0 - margin, y0 - margin], dtype=np.float64)

        def to_level0(contour: np.ndarray, origin: np.ndarray = origin, k: int = k) -> np.ndarray:
            pts = contour[:, 0, :].astype(np.float64)
            return (origin + (pts + 0.5) / k) * downsample

        links = hierarchy[0]
        for i, contour in enumerate(contours):
            if links[i][3] != -1 or len(contour) < 3:
                continue
            holes = []
            child = links[i][2]
            while child != -1:
                if len(contours[child]) >= 3:
                    holes.append(to_level0(contours[child]))
                child = links[child][0]
            polygons += _valid_parts(to_level0(contour), holes)
    return polygons


def _valid_parts(exterior: np.ndarray, holes: list[np.ndarray]) -> list[Polygon]:
    """The traced polygon, split into valid simple polygons where it touches itself.

    ``findContours`` walks an 8-connected pinch (two lobes meeting at a pixel corner) as one
    ring that crosses itself there; annotation readers rightly refuse such rings
    ("Ring Self-intersection"), so a generated outline must not contain one. ``make_valid``
    splits the ring at the pinch into polygons covering the same area.
    """
    geom = ShapelyPolygon(exterior, holes)
    if geom.is_valid:
        return [Polygon(exterior=exterior, holes=tuple(holes))]
    # make_valid may nest (a GeometryCollection holding a MultiPolygon): flatten fully.
    pending, parts = [shapely.make_valid(geom)], []
    while pending:
        g = pending.pop()
        if g.geom_type == "Polygon":
            if g.area > 0:
                parts.append(g)
        elif hasattr(g, "geoms"):
            pending.extend(g.geoms)
    return [
        Polygon(
            exterior=np.asarray(g.exterior.coords[:-1], dtype=np.float64),
            holes=tuple(np.asarray(r.coords[:-1], dtype=np.float64) for r in g.interiors),
        )
        for g in parts
    ]
