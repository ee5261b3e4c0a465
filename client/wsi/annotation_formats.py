"""Reading and writing tumour outlines in QuPath GeoJSON and ASAP XML.

Pathologists annotate in QuPath or ASAP; both formats are read here into one representation
(:class:`~client.wsi.polygons.Polygon`, split into tumour and exclusion sets) so that nothing
downstream needs to know where an outline came from. Everything about the files themselves
lives here: the format is sniffed from the content, oversized files are refused before
reading and XML with a DTD while parsing (defusedxml), class names are matched to
tumour/exclusion, and every ring and
polygon is validated (and clipped to the slide) with a message naming the offending feature.
What the file held besides (every class found, points and lines drawn in a tumour class, which
have no area and are ignored) is counted, so that the pipeline can say it instead of guessing.
The writers produce files the readers, QuPath and ASAP all load back.
"""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import defusedxml.ElementTree as DefusedET
import numpy as np
import shapely
from defusedxml import DefusedXmlException
from shapely.geometry import Polygon as ShapelyPolygon
from shapely.geometry import box as shapely_box

from fedpath.client.config import UNCLASSIFIED, AnnotationConfig
from fedpath.client.wsi.polygons import Polygon, TumourAnnotation
from fedpath.common.atomic import atomic_write_text
from fedpath.common.errors import AnnotationError

MAX_ANNOTATION_BYTES = 200_000_000
"""Larger files are refused before reading: real outline files are a few MB, and parsing a
huge one would hold the whole document (several times its size) in memory."""

QUPATH_CLASS_COLOURS: dict[str, list[int]] = {"tumor": [200, 0, 0], "tumour": [200, 0, 0]}
"""QuPath's own colour for its built-in Tumor class, so exported files look familiar."""

ASAP_EXCLUSION_GROUP = "_2"
"""Camelyon16 convention: group ``_2`` marks regions cut out of the tumour groups."""

_UUID_NAMESPACE = uuid.UUID("6c1f2a4e-5b0d-4d7e-9a51-fedba7c0ffee")


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
    (e.g. QuPath's "Tissue") cannot make a slide fail. Points and lines of those classes have
    no area and are skipped, counted by geometry type in ``ignored_geometries``: a QuPath
    point annotation beside a tumour outline must not cost the outline. With ``slide_dims``
    polygons are clipped to the slide, and one lying wholly outside is an error, since it means
    the file belongs to another slide or uses other coordinates.
    """
    path = Path(path)
    data = _read_bounded(path)
    head = _sniff(data)
    found = _Found()
    if head == "<":
        raw = _parse_asap(data, path, cfg, found)
    elif head in "{[":
        raw = _parse_geojson(data, path, cfg, found)
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
    return TumourAnnotation(
        source=path,
        tumour=tuple(tumour),
        exclusions=tuple(exclusions),
        classes_found=dict(found.classes),
        unknown_classes=tuple(found.unknown),
        ignored_geometries=dict(found.ignored),
    )


@dataclass
class _Found:
    """What a parser saw besides the polygons it returns, in file order."""

    classes: Counter[str] = field(default_factory=Counter)
    """Outlines per class name as written (``UNCLASSIFIED`` for those without one)."""
    ignored: Counter[str] = field(default_factory=Counter)
    """Outlines of a tumour or exclusion class skipped for having no area, by geometry type."""
    unknown: dict[str, None] = field(default_factory=dict)
    """Class names in none of the configured lists (an ordered set)."""

    def saw(self, name: str, chain: Sequence[str], cfg: AnnotationConfig) -> str | None:
        """Count one outline of class ``name`` and classify it by the first name of ``chain``
        (the name, then any parent groups) that a configured list knows."""
        self.classes[name] += 1
        for link in chain:
            kind = _classify(link, cfg)
            if kind is not None:
                return kind
            if _matches(link, cfg.other_classes):
                return None
        if name != UNCLASSIFIED:
            self.unknown[name] = None
        return None


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


def _class_name(name: str | None) -> str:
    """The name reported and matched: stripped, ``UNCLASSIFIED`` when there is none."""
    name = (name or "").strip()
    return name or UNCLASSIFIED


def _candidates(name: str) -> set[str]:
    """A QuPath derived class "Tumor: Positive" also counts as its base class "Tumor"."""
    return {name.lower(), name.split(":", 1)[0].strip().lower()}


def _matches(name: str, classes: Sequence[str]) -> bool:
    return bool(_candidates(name) & {c.strip().lower() for c in classes})


def _classify(name: str, cfg: AnnotationConfig) -> str | None:
    """Match a class/group name case-insensitively: "tumour", "exclusion" or None (ignored)."""
    if _matches(name, cfg.tumour_classes):
        return "tumour"
    if _matches(name, cfg.exclusion_classes):
        return "exclusion"
    return None


# GeoJSON ------------------------------------------------------------------------------------

_NO_AREA_GEOMETRIES = frozenset({"Point", "MultiPoint", "LineString", "MultiLineString"})


def _parse_geojson(
    data: bytes, path: Path, cfg: AnnotationConfig, found: _Found
) -> list[_RawPolygon]:
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
        name = _class_name(_geojson_class(props if isinstance(props, dict) else {}))
        kind = found.saw(name, [name], cfg)
        if kind is None:
            continue
        where = f"feature {i} ({name})"
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict):
            raise AnnotationError(str(path), f"{where}: missing geometry")
        for j, rings in enumerate(_geojson_polygons(geometry, where, path, found)):
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


def _geojson_polygons(
    geometry: dict[str, Any], where: str, path: Path, found: _Found
) -> Iterator[list[Any]]:
    gtype = geometry.get("type")
    if gtype == "GeometryCollection":
        parts = geometry.get("geometries")
        if not isinstance(parts, list):
            raise AnnotationError(str(path), f"{where}: GeometryCollection without 'geometries'")
        for part in parts:
            if not isinstance(part, dict):
                raise AnnotationError(str(path), f"{where}: malformed geometry in collection")
            yield from _geojson_polygons(part, where, path, found)
        return
    if gtype in _NO_AREA_GEOMETRIES:
        found.ignored[str(gtype)] += 1
        return
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
_ASAP_NO_GROUP = "None"
"""ASAP's group of an annotation put in no group: reported as unclassified."""


def _parse_xml(data: bytes, path: Path) -> ET.Element:
    """The document's root, parsed by defusedxml with every DTD refused.

    Entity expansion (billion laughs, quadratic blow-up) and external entities all need a
    DOCTYPE; ASAP never writes one, so refusing it outright is both safe and lossless.
    defusedxml refuses it from expat's own handlers during the one parse, in every encoding.
    """
    try:
        return DefusedET.fromstring(data, forbid_dtd=True)
    except DefusedXmlException:
        raise AnnotationError(
            str(path), "XML with DOCTYPE/ENTITY declarations is refused"
        ) from None
    except ET.ParseError as exc:
        raise AnnotationError(str(path), f"unparsable XML ({exc})") from None
    except LookupError as exc:  # expat asks Python for the codec the declaration names
        raise AnnotationError(str(path), f"unparsable XML ({exc} in the XML declaration)") from None


def _parse_asap(data: bytes, path: Path, cfg: AnnotationConfig, found: _Found) -> list[_RawPolygon]:
    root = _parse_xml(data, path)
    if root.tag.lower() != "asap_annotations":
        raise AnnotationError(
            str(path), f"XML root <{root.tag}> is not <ASAP_Annotations> (not an ASAP file)"
        )
    parents = {g.get("Name", "").strip(): g.get("PartOfGroup", "") for g in root.iter("Group")}
    out: list[_RawPolygon] = []
    for i, ann in enumerate(root.iter("Annotation")):
        group = ann.get("PartOfGroup", _ASAP_NO_GROUP)
        name = _class_name(None if group.strip() == _ASAP_NO_GROUP else group)
        kind = found.saw(name, _asap_group_chain(name, parents), cfg)
        if kind is None:
            continue
        where = f"annotation {i} ({ann.get('Name', 'unnamed')!r}, group {group})"
        atype = ann.get("Type", "Polygon")
        if atype.lower() not in _ASAP_AREA_TYPES:
            found.ignored[atype] += 1  # Dot, PointSet, Measurement: no area
            continue
        out.append((where, kind, [_asap_ring(ann, where, path)]))
    return out


def _asap_group_chain(name: str, parents: dict[str, str]) -> list[str]:
    """A group and the groups it is part of, innermost first: ASAP nests groups, so regions
    drawn in a group "region 1" inside a group "Tumor" are tumour."""
    chain = [name]
    parent = parents.get(name, "").strip()
    while parent and parent != _ASAP_NO_GROUP and parent not in chain:
        chain.append(parent)
        parent = parents.get(parent, "").strip()
    return chain


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
