"""Tumour outlines (QuPath GeoJSON, ASAP XML) → per-patch tumour fraction → patch labels.

Pathologists annotate in QuPath or ASAP; both formats are read into one representation
(level-0 polygons with holes, split into tumour and exclusion sets) so that the rest of the
pipeline never needs to know where an outline came from. Fractions are computed by
rasterising the outlines once and taking box sums from an integral image: one pass for all
patches instead of a polygon clip per patch.
"""

from __future__ import annotations

import json
import math
import uuid
import xml.etree.ElementTree as ET
import xml.parsers.expat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import shapely
from shapely.errors import GEOSException
from shapely.geometry import Polygon as ShapelyPolygon
from shapely.geometry import box as shapely_box

from client.config import AnnotationConfig
from common.atomic import atomic_write_text
from common.errors import AnnotationError

MAX_ANNOTATION_BYTES = 200_000_000
"""Larger files are refused before reading: real outline files are a few MB, and parsing a
huge one would hold the whole document (several times its size) in memory."""

RASTER_TILE_PX = 1024
"""Side of the rasterisation tile in mask pixels: bounds memory (a few float64 tile-sized
arrays, ≈ 30 MB) whatever the annotated area, at the cost of clipping the outline per tile."""

_FRACTION_EPS = 1e-6
"""Fractions closer than this to 0 or 1 are snapped: they are interpolation round-off, and an
exact 0 matters because ``negative_fraction`` defaults to 0."""

QUPATH_CLASS_COLOURS: dict[str, list[int]] = {"tumor": [200, 0, 0], "tumour": [200, 0, 0]}
"""QuPath's own colour for its built-in Tumor class, so exported files look familiar."""

ASAP_EXCLUSION_GROUP = "_2"
"""Camelyon16 convention: group ``_2`` marks regions cut out of the tumour groups."""

_UUID_NAMESPACE = uuid.UUID("6c1f2a4e-5b0d-4d7e-9a51-fedba7c0ffee")


@dataclass(frozen=True, eq=False)
class Polygon:
    """One outline in level-0 pixels: an open exterior ring (no repeated closing vertex) and holes.

    Arrays are copied to read-only float64 so a polygon can be shared between threads and
    stored in a frozen annotation without anyone mutating it afterwards. ``eq=False`` because
    element-wise array comparison has no single truth value.
    """

    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "exterior", _as_ring(self.exterior, "exterior"))
        object.__setattr__(
            self, "holes", tuple(_as_ring(h, f"hole {i}") for i, h in enumerate(self.holes))
        )


@dataclass(frozen=True)
class TumourAnnotation:
    """Everything one annotation file says about tumour; empty ``tumour`` means no tumour."""

    source: Path
    tumour: tuple[Polygon, ...]
    exclusions: tuple[Polygon, ...]


def _as_ring(ring: object, what: str) -> np.ndarray:
    arr = np.array(ring, dtype=np.float64, copy=True)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what}: expected a K×2 array of (x, y), got shape {arr.shape}")
    if len(arr) > 1 and np.array_equal(arr[0], arr[-1]):
        arr = arr[:-1].copy()
    arr.setflags(write=False)
    return arr


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def _check_writable(path: Path, polygons: Sequence[Polygon], kind: str) -> None:
    """Refuse to write an outline that no reader could load back (JSON has no NaN)."""
    for i, poly in enumerate(polygons):
        for j, ring in enumerate((poly.exterior, *poly.holes)):
            part = "exterior" if j == 0 else f"hole {j - 1}"
            if len(ring) < 3:
                raise AnnotationError(
                    str(path), f"{kind} polygon {i} {part} has {len(ring)} points (need ≥ 3)"
                )
            if not np.isfinite(ring).all():
                raise AnnotationError(str(path), f"{kind} polygon {i} {part} is not finite")


def _closed(ring: np.ndarray) -> list[list[float]]:
    pts = ring.tolist()
    return [*pts, pts[0]]


def write_qupath_geojson(
    path: Path, polygons: Sequence[Polygon], class_name: str = "Tumor"
) -> None:
    """Write outlines as a QuPath-importable FeatureCollection (QuPath ≥ 0.2 layout).

    Feature ids are derived from the content so that re-running a generator gives byte-identical
    files (stable hashes), while still being the UUIDs QuPath expects.
    """
    path = Path(path)
    _check_writable(path, polygons, "tumour")
    colour = QUPATH_CLASS_COLOURS.get(class_name.lower(), [255, 200, 0])
    features = []
    for i, poly in enumerate(polygons):
        rings = [_closed(poly.exterior)] + [_closed(h) for h in poly.holes]
        feature_id = uuid.uuid5(_UUID_NAMESPACE, f"{class_name}:{i}:{json.dumps(rings)}")
        features.append(
            {
                "type": "Feature",
                "id": str(feature_id),
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": class_name, "color": colour},
                },
            }
        )
    doc = {"type": "FeatureCollection", "features": features}
    atomic_write_text(path, json.dumps(doc, allow_nan=False) + "\n")


def write_asap_xml(
    path: Path,
    polygons: Sequence[Polygon],
    group: str = "_0",
    exclusions: Sequence[Polygon] = (),
) -> None:
    """Write outlines in ASAP's XML (the Camelyon16 ground-truth format).

    ASAP polygons cannot have holes, so holes are written the Camelyon16 way: as polygons of the
    exclusion group ``_2``, which readers subtract from every tumour polygon. This is exact
    unless another tumour polygon lies inside a hole (an island), which Camelyon16 cannot
    express either. Exclusions themselves cannot have holes in this format: refused.
    """
    path = Path(path)
    _check_writable(path, polygons, "tumour")
    _check_writable(path, exclusions, "exclusion")
    for i, poly in enumerate(exclusions):
        if poly.holes:
            raise AnnotationError(
                str(path), f"exclusion polygon {i} has holes, which ASAP XML cannot represent"
            )
    root = ET.Element("ASAP_Annotations")
    annotations = ET.SubElement(root, "Annotations")
    entries: list[tuple[str, np.ndarray]] = [(group, p.exterior) for p in polygons]
    entries += [(ASAP_EXCLUSION_GROUP, h) for p in polygons for h in p.holes]
    entries += [(ASAP_EXCLUSION_GROUP, p.exterior) for p in exclusions]
    for n, (grp, ring) in enumerate(entries):
        colour = "#64FE2E" if grp == ASAP_EXCLUSION_GROUP else "#F4FA58"
        ann = ET.SubElement(
            annotations,
            "Annotation",
            Name=f"Annotation {n}",
            Type="Polygon",
            PartOfGroup=grp,
            Color=colour,
        )
        coords = ET.SubElement(ann, "Coordinates")
        for order, (x, y) in enumerate(ring.tolist()):
            ET.SubElement(coords, "Coordinate", Order=str(order), X=repr(x), Y=repr(y))
    groups = ET.SubElement(root, "AnnotationGroups")
    used = [group] + ([ASAP_EXCLUSION_GROUP] if len(entries) > len(polygons) else [])
    for grp in dict.fromkeys(used):
        colour = "#64FE2E" if grp == ASAP_EXCLUSION_GROUP else "#FF0000"
        g = ET.SubElement(groups, "Group", Name=grp, PartOfGroup="None", Color=colour)
        ET.SubElement(g, "Attributes")
    ET.indent(root, space="\t")
    text = '<?xml version="1.0"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
    atomic_write_text(path, text)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_annotation(
    path: Path, cfg: AnnotationConfig, slide_dims: tuple[int, int] | None = None
) -> TumourAnnotation:
    """Read a QuPath GeoJSON or ASAP XML file into tumour and exclusion polygons.

    The format is sniffed from the content (a ``.json`` saved from ASAP by mistake still
    loads). Only features of a tumour or exclusion class are validated: an unrelated outline
    (e.g. QuPath's "Tissue") cannot make a slide fail. With ``slide_dims`` polygons are clipped
    to the slide, and one lying wholly outside is an error, since it means the file belongs to
    another slide or uses other coordinates.
    """
    path = Path(path)
    data = _read_bounded(path)
    head = _sniff(data)
    if head == "<":
        raw = _parse_asap(data, path, cfg)
    elif head in "{[":
        raw = _parse_geojson(data, path, cfg)
    else:
        raise AnnotationError(str(path), "neither GeoJSON nor XML (unrecognised first character)")
    bounds = None
    if slide_dims is not None:
        width, height = slide_dims
        if width <= 0 or height <= 0:
            raise ValueError(f"slide_dims must be positive, got {slide_dims}")
        bounds = shapely_box(0, 0, width, height)
    tumour: list[Polygon] = []
    exclusions: list[Polygon] = []
    for where, kind, rings in raw:
        polys = _validated_polygons(rings, where, path, bounds)
        (tumour if kind == "tumour" else exclusions).extend(polys)
    return TumourAnnotation(source=path, tumour=tuple(tumour), exclusions=tuple(exclusions))


_RawPolygon = tuple[str, str, list[Any]]
"""(location for messages, "tumour" | "exclusion", [exterior, *holes] as parsed)."""


def _read_bounded(path: Path) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise AnnotationError(str(path), "file not found") from None
    except OSError as exc:
        raise AnnotationError(str(path), f"cannot access file ({exc.strerror})") from None
    if not path.is_file():
        raise AnnotationError(str(path), "not a regular file")
    if size > MAX_ANNOTATION_BYTES:
        raise AnnotationError(
            str(path),
            f"file is {size / 1e6:.0f} MB, over the {MAX_ANNOTATION_BYTES / 1e6:.0f} MB limit",
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AnnotationError(str(path), f"cannot read file ({exc.strerror})") from None


def _sniff(data: bytes) -> str:
    """First significant character, looking through a UTF-8/16 byte-order mark."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data[:4096].decode("utf-16", errors="ignore")
    else:
        text = data[:4096].decode("utf-8", errors="ignore")
    text = text.lstrip("\ufeff \t\r\n")
    return text[:1] if text else ""


def _classify(name: str | None, cfg: AnnotationConfig) -> str | None:
    """Match a class/group name case-insensitively; a QuPath derived class "Tumor: Positive"
    counts as its base class."""
    if not name:
        return None
    candidates = {name.strip().lower(), name.split(":", 1)[0].strip().lower()}
    if candidates & {c.lower() for c in cfg.tumour_classes}:
        return "tumour"
    if candidates & {c.lower() for c in cfg.exclusion_classes}:
        return "exclusion"
    return None


# GeoJSON ------------------------------------------------------------------------------------

_NO_AREA_GEOMETRIES = frozenset({"Point", "MultiPoint", "LineString", "MultiLineString"})


def _parse_geojson(data: bytes, path: Path, cfg: AnnotationConfig) -> list[_RawPolygon]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise AnnotationError(str(path), f"unparsable JSON ({exc})") from None
    if isinstance(doc, list):
        features = doc
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise AnnotationError(str(path), "FeatureCollection has no 'features' list")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    else:
        kind = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        raise AnnotationError(
            str(path), f"top-level {kind!r} is not a FeatureCollection, Feature or feature list"
        )
    out: list[_RawPolygon] = []
    for i, feature in enumerate(features):
        if not isinstance(feature, dict):
            raise AnnotationError(str(path), f"feature {i} is not a JSON object")
        props = feature.get("properties")
        name = _geojson_class(props if isinstance(props, dict) else {})
        kind = _classify(name, cfg)
        if kind is None:
            continue
        where = f"feature {i} ({name})"
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict):
            raise AnnotationError(str(path), f"{where}: missing geometry")
        for j, rings in enumerate(_geojson_polygons(geometry, where, path)):
            out.append((f"{where} polygon {j}", kind, rings))
    return out


def _geojson_class(props: dict[str, Any]) -> str | None:
    """QuPath ≥ 0.2 nests the class as ``classification.name`` (``names`` for derived classes);
    older exports and other tools use a plain string under ``classification``, ``class`` or
    ``name``. The classification, when present, wins over a free-text name."""
    cls = props.get("classification")
    if isinstance(cls, dict):
        if isinstance(cls.get("name"), str):
            return cls["name"]
        names = cls.get("names")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return ": ".join(names)
    elif isinstance(cls, str):
        return cls
    for key in ("class", "name"):
        if isinstance(props.get(key), str):
            return props[key]
    return None


def _geojson_polygons(geometry: dict[str, Any], where: str, path: Path) -> Iterator[list[Any]]:
    gtype = geometry.get("type")
    if gtype == "GeometryCollection":
        parts = geometry.get("geometries")
        if not isinstance(parts, list):
            raise AnnotationError(str(path), f"{where}: GeometryCollection without 'geometries'")
        for part in parts:
            if not isinstance(part, dict):
                raise AnnotationError(str(path), f"{where}: malformed geometry in collection")
            yield from _geojson_polygons(part, where, path)
        return
    if gtype in _NO_AREA_GEOMETRIES:
        raise AnnotationError(
            str(path), f"{where}: geometry {gtype} has no area; outline regions as polygons"
        )
    if gtype not in ("Polygon", "MultiPolygon"):
        raise AnnotationError(str(path), f"{where}: unsupported geometry type {gtype!r}")
    coords = geometry.get("coordinates")
    if not isinstance(coords, list) or not coords:
        raise AnnotationError(str(path), f"{where}: missing coordinates")
    if gtype == "Polygon":
        yield coords
        return
    for j, poly in enumerate(coords):
        if not isinstance(poly, list) or not poly:
            raise AnnotationError(str(path), f"{where}: MultiPolygon part {j} has no coordinates")
        yield poly


# ASAP XML -----------------------------------------------------------------------------------

_ASAP_AREA_TYPES = frozenset({"polygon", "spline", "rectangle"})


def _refuse_dtd(data: bytes, path: Path) -> None:
    """Reject any DTD before ElementTree sees the document.

    Entity expansion (billion laughs, quadratic blow-up) and external entities all need a
    DOCTYPE; ASAP never writes one, so refusing it outright is both safe and lossless. Done
    with expat's own handlers so that every encoding is covered, not just a byte search.
    """

    def refuse(*_args: object) -> None:
        raise AnnotationError(str(path), "XML with DOCTYPE/ENTITY declarations is refused")

    parser = xml.parsers.expat.ParserCreate()
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as exc:
        raise AnnotationError(str(path), f"unparsable XML ({exc})") from None


def _parse_asap(data: bytes, path: Path, cfg: AnnotationConfig) -> list[_RawPolygon]:
    _refuse_dtd(data, path)
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise AnnotationError(str(path), f"unparsable XML ({exc})") from None
    if root.tag.lower() != "asap_annotations":
        raise AnnotationError(
            str(path), f"XML root <{root.tag}> is not <ASAP_Annotations> (not an ASAP file)"
        )
    out: list[_RawPolygon] = []
    for i, ann in enumerate(root.iter("Annotation")):
        group = ann.get("PartOfGroup", "None")
        kind = _classify(group, cfg)
        if kind is None:
            continue
        where = f"annotation {i} ({ann.get('Name', 'unnamed')!r}, group {group})"
        atype = ann.get("Type", "Polygon")
        if atype.lower() not in _ASAP_AREA_TYPES:
            raise AnnotationError(
                str(path), f"{where}: type {atype} has no area; outline regions as polygons"
            )
        out.append((where, kind, [_asap_ring(ann, where, path)]))
    return out


def _asap_ring(ann: ET.Element, where: str, path: Path) -> list[tuple[float, float]]:
    """Vertices sorted by ``Order``: files edited by hand or by scripts do not keep them sorted."""
    coordinates = ann.find("Coordinates")
    points = [] if coordinates is None else list(coordinates.iter("Coordinate"))
    if not points:
        raise AnnotationError(str(path), f"{where}: missing coordinates")
    keyed: list[tuple[float, int, float, float]] = []
    for k, pt in enumerate(points):
        try:
            order = float(pt.get("Order", k))
            x = _asap_number(pt.get("X"))
            y = _asap_number(pt.get("Y"))
        except (TypeError, ValueError):
            raise AnnotationError(
                str(path), f"{where}: coordinate {k} has a missing or non-numeric Order/X/Y"
            ) from None
        keyed.append((order, k, x, y))
    keyed.sort()
    return [(x, y) for _, _, x, y in keyed]


def _asap_number(text: str | None) -> float:
    """ASAP writes the locale's decimal separator: some Camelyon files use ``12345,67``."""
    if text is None:
        raise ValueError("missing")
    text = text.strip()
    if "," in text and "." not in text:
        text = text.replace(",", ".")
    return float(text)


# Validation ---------------------------------------------------------------------------------


def _validated_polygons(
    rings: list[Any], where: str, path: Path, bounds: ShapelyPolygon | None
) -> list[Polygon]:
    arrays = [
        _validated_ring(ring, f"{where} {_ring_name(k)}", path) for k, ring in enumerate(rings)
    ]
    geom = ShapelyPolygon(arrays[0], arrays[1:])
    if not geom.is_valid:
        reason = shapely.is_valid_reason(geom)
        raise AnnotationError(str(path), f"{where}: invalid polygon: {reason}")
    if bounds is None or bounds.contains(geom):
        return [Polygon(arrays[0], tuple(arrays[1:]))]
    clipped = geom.intersection(bounds)
    parts = [g for g in shapely.get_parts(clipped) if g.geom_type == "Polygon" and g.area > 0]
    if not parts:
        xmax, ymax = bounds.bounds[2:]
        raise AnnotationError(
            str(path),
            f"{where}: polygon lies entirely outside the slide ({xmax:.0f}×{ymax:.0f} px); "
            "wrong slide or wrong coordinate units?",
        )
    return [
        Polygon(
            np.asarray(p.exterior.coords)[:, :2],
            tuple(np.asarray(h.coords)[:, :2] for h in p.interiors),
        )
        for p in parts
    ]


def _ring_name(k: int) -> str:
    return "exterior" if k == 0 else f"hole {k - 1}"


def _validated_ring(ring: Any, where: str, path: Path) -> np.ndarray:
    try:
        arr = np.asarray(ring, dtype=np.float64)
    except (TypeError, ValueError):
        raise AnnotationError(
            str(path), f"{where}: coordinates are not numeric (x, y) pairs"
        ) from None
    if arr.size == 0:
        raise AnnotationError(str(path), f"{where}: missing coordinates")
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise AnnotationError(str(path), f"{where}: coordinates are not a list of (x, y) pairs")
    arr = arr[:, :2]
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise AnnotationError(str(path), f"{where}: vertex {bad} has a non-finite coordinate")
    if len(np.unique(arr, axis=0)) < 3:
        raise AnnotationError(str(path), f"{where}: fewer than 3 distinct points")
    if np.array_equal(arr[0], arr[-1]):
        arr = arr[:-1]
    return arr


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
    then one box sum on the tile's integral image. Exact coverage rather than ``cv2.fillPoly``:
    fillPoly fills every pixel an edge touches, so even with sub-pixel ``shift`` it
    overestimates tumour by half a pixel along every edge (up to 0.05 error at 32 px per patch)
    and an outline lying on a patch border leaks into the neighbour, turning a certain 0 into
    −1. With exact coverage, grid-aligned outlines give exactly 0 and 1.
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be N×2, got shape {coords.shape}")
    if patch_size_level0 <= 0:
        raise ValueError(f"patch_size_level0 must be positive, got {patch_size_level0}")
    fraction = np.zeros(len(coords), dtype=np.float32)
    if len(coords) == 0 or not annotation.tumour:
        return fraction
    region = _tumour_region(annotation, slide_dims)
    if region.is_empty:
        return fraction
    ps = int(patch_size_level0)
    r = cfg.raster_px_per_patch
    x = coords[:, 0].astype(np.int64)
    y = coords[:, 1].astype(np.int64)
    bx0, by0, bx1, by1 = region.bounds
    touching = np.flatnonzero((x < bx1) & (x + ps > bx0) & (y < by1) & (y + ps > by0))
    if len(touching) == 0:
        return fraction

    # Raster origin on a patch corner so that grid-aligned patches have integer pixel corners:
    # (x - ox) * r is an integer, and dividing by ps last keeps it exact when it divides.
    ox, oy = int(x[touching].min()), int(y[touching].min())
    region_w = math.ceil((min(float(x[touching].max() + ps), bx1) - ox) * r / ps)
    region_h = math.ceil((min(float(y[touching].max() + ps), by1) - oy) * r / ps)
    u0 = (x[touching] - ox) * r / ps
    v0 = (y[touching] - oy) * r / ps
    px = ps / r  # level-0 px per mask px

    tile = max(r, (RASTER_TILE_PX // r) * r)
    sums = np.zeros(len(touching), dtype=np.float64)
    for ty in range(0, region_h, tile):
        th = min(tile, region_h - ty)
        for tx in range(0, region_w, tile):
            tw = min(tile, region_w - tx)
            pu0, pv0 = u0 - tx, v0 - ty
            sel = np.flatnonzero((pu0 < tw) & (pu0 + r > 0) & (pv0 < th) & (pv0 + r > 0))
            if len(sel) == 0:
                continue
            # One mask pixel of margin: clipping makes artificial edges, which must fall
            # outside the tile (left of it they still add coverage to the right, as they must).
            x0 = ox + (tx - 1) * px
            y0 = oy + (ty - 1) * px
            part = shapely.clip_by_rect(region, x0, y0, x0 + (tw + 2) * px, y0 + (th + 2) * px)
            rings = [
                np.column_stack(((ring[:, 0] - ox) * r / ps - tx, (ring[:, 1] - oy) * r / ps - ty))
                for ring in _oriented_rings(part)
            ]
            if not rings:
                continue
            integral = cv2.integral(_coverage(rings, (th, tw)), sdepth=cv2.CV_64F)
            sums[sel] += _box_sums(integral, pu0[sel], pv0[sel], float(r))
    frac = np.clip(sums / (r * r), 0.0, 1.0)
    frac[frac < _FRACTION_EPS] = 0.0
    frac[frac > 1.0 - _FRACTION_EPS] = 1.0
    fraction[touching] = frac
    return fraction


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


def _oriented_rings(geom: Any) -> list[np.ndarray]:
    """Open rings of every polygonal part, oriented so that ``_coverage`` counts exteriors as
    +1 and holes as −1 (shapely's ``exterior_cw=True``, i.e. anticlockwise on screen, y down)."""
    rings: list[np.ndarray] = []
    for part in shapely.get_parts(geom):
        if part.geom_type != "Polygon" or part.is_empty:
            continue
        oriented = shapely.orient_polygons(part, exterior_cw=True)
        rings.append(np.asarray(oriented.exterior.coords)[:-1, :2])
        rings.extend(np.asarray(h.coords)[:-1, :2] for h in oriented.interiors)
    return rings


def _coverage(rings: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Exact area coverage of pixels [i, i+1]×[j, j+1] by the rings (signed-area accumulation).

    Every edge is cut into pieces, one per pixel it crosses; a piece of signed height dy whose
    mean x lies a fraction f into pixel column i covers dy·(1−f) of that pixel and dy of every
    pixel to its right. Accumulating dy·(1−f) at i and dy·f at i+1, then a cumulative sum along
    the row, gives the exact covered area of every pixel (the font-rasteriser technique), all
    vectorised. Edges left of the tile land in two spare columns so their coverage still
    reaches the tile; rows outside the tile are simply skipped.
    """
    th, tw = shape
    pad = 2
    width = tw + 2 * pad + 1
    p0 = np.concatenate(rings)
    p1 = np.concatenate([np.roll(ring, -1, axis=0) for ring in rings])
    x0, y0, x1, y1 = p0[:, 0], p0[:, 1], p1[:, 0], p1[:, 1]
    moving = y0 != y1
    x0, y0, x1, y1 = x0[moving], y0[moving], x1[moving], y1[moving]
    direction = np.sign(y1 - y0)
    ylo, yhi = np.minimum(y0, y1), np.maximum(y0, y1)
    row_first = np.clip(np.floor(ylo), 0, th).astype(np.int64)
    row_end = np.clip(np.ceil(yhi), 0, th).astype(np.int64)
    seg, row = _expand(row_first, np.maximum(row_end - row_first, 0))
    ya = np.maximum(ylo[seg], row)
    yb = np.minimum(yhi[seg], row + 1)
    keep = yb > ya
    seg, row, ya, yb = seg[keep], row[keep], ya[keep], yb[keep]
    slope = (x1[seg] - x0[seg]) / (y1[seg] - y0[seg])
    xa = x0[seg] + (ya - y0[seg]) * slope
    xb = x0[seg] + (yb - y0[seg]) * slope
    dy = (yb - ya) * direction[seg]
    xl, xr = np.minimum(xa, xb), np.maximum(xa, xb)
    col_first = np.floor(xl)
    col_last = np.maximum(np.ceil(xr) - 1, col_first)
    col_first = np.clip(col_first, -pad, tw + pad - 1).astype(np.int64)
    col_last = np.clip(col_last, -pad, tw + pad - 1).astype(np.int64)
    piece, col = _expand(col_first, col_last - col_first + 1)
    cl = np.clip(xl[piece], col, col + 1)
    cr = np.clip(xr[piece], col, col + 1)
    span = xr[piece] - xl[piece]
    share = np.divide(cr - cl, span, out=np.ones_like(span), where=span > 0)
    dy_part = dy[piece] * share
    f = np.clip((cl + cr) / 2 - col, 0.0, 1.0)
    flat = row[piece] * width + col + pad
    acc = np.bincount(
        np.concatenate([flat, flat + 1]),
        weights=np.concatenate([dy_part * (1 - f), dy_part * f]),
        minlength=th * width,
    )[: th * width].reshape(th, width)
    coverage = np.cumsum(acc, axis=1)[:, pad : pad + tw]
    return np.ascontiguousarray(np.clip(coverage, 0.0, 1.0))


def _expand(first: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For items with ranges [first, first+count): (item index, value) for every element."""
    owner = np.repeat(np.arange(len(first)), count)
    starts = np.cumsum(count) - count
    return owner, first[owner] + (np.arange(len(owner)) - starts[owner])


def _box_sums(integral: np.ndarray, u0: np.ndarray, v0: np.ndarray, side: float) -> np.ndarray:
    """Sums over boxes [u0, u0+side] × [v0, v0+side] (clipped to the tile) of the coverage.

    The integral image is interpolated bilinearly, which is exact for a piecewise-constant
    raster, so grids with overlap, whose patch edges fall inside pixels, still sum correctly.
    """
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    ua, ub = np.clip(u0, 0, w), np.clip(u0 + side, 0, w)
    va, vb = np.clip(v0, 0, h), np.clip(v0 + side, 0, h)
    return (
        _interp(integral, ub, vb)
        - _interp(integral, ua, vb)
        - _interp(integral, ub, va)
        + _interp(integral, ua, va)
    )


def _interp(integral: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    i = np.minimum(np.floor(u).astype(np.int64), max(w - 1, 0))
    j = np.minimum(np.floor(v).astype(np.int64), max(h - 1, 0))
    fu, fv = u - i, v - j
    i1, j1 = np.minimum(i + 1, w), np.minimum(j + 1, h)
    return (
        integral[j, i] * (1 - fu) * (1 - fv)
        + integral[j, i1] * fu * (1 - fv)
        + integral[j1, i] * (1 - fu) * fv
        + integral[j1, i1] * fu * fv
    )


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
