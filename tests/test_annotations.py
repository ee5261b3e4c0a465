"""Annotation loading (QuPath GeoJSON, ASAP XML), tumour fractions, patch labels and writers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely

import fedpath.client.wsi.annotations as ann
from fedpath.client.config import AnnotationConfig
from fedpath.client.wsi.annotations import (
    Polygon,
    TumourAnnotation,
    load_annotation,
    patch_labels,
    tumour_fraction,
    write_asap_xml,
    write_qupath_geojson,
)
from fedpath.common.errors import AnnotationError

CFG = AnnotationConfig()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def square(x0: float, y0: float, side: float) -> list[list[float]]:
    return [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]]


def closed(ring: list[list[float]]) -> list[list[float]]:
    return [*ring, ring[0]]


def feature(geometry: dict[str, Any] | None, **properties: Any) -> dict[str, Any]:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def polygon_geometry(*rings: list[list[float]]) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [closed(r) for r in rings]}


def write_json(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc))
    return path


def asap_doc(annotations: list[tuple[str, str, list[tuple[Any, Any, Any]]]]) -> str:
    """(group, type, [(order, x, y), ...]) → ASAP XML text, written by hand like ASAP does."""
    parts = []
    for i, (group, atype, pts) in enumerate(annotations):
        coords = "".join(f'<Coordinate Order="{o}" X="{x}" Y="{y}" />' for o, x, y in pts)
        parts.append(
            f'<Annotation Name="Annotation {i}" Type="{atype}" PartOfGroup="{group}" '
            f'Color="#F4FA58"><Coordinates>{coords}</Coordinates></Annotation>'
        )
    return (
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        + "".join(parts)
        + '</Annotations><AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#ff0000">'
        "<Attributes /></Group></AnnotationGroups></ASAP_Annotations>"
    )


def grid(width: int, height: int, size: int, step: int) -> np.ndarray:
    xs = np.arange(0, width - size + 1, step)
    ys = np.arange(0, height - size + 1, step)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.column_stack([xx.ravel(), yy.ravel()]).astype(np.int64)


def exact_fractions(region: Any, coords: np.ndarray, size: int) -> np.ndarray:
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + size, coords[:, 1] + size)
    return shapely.area(shapely.intersection(boxes, region)) / float(size * size)


def random_star(rng: np.random.Generator, centre: np.ndarray, radius: float) -> np.ndarray:
    """A random simple polygon: star-shaped around its centre, so never self-intersecting."""
    while True:
        k = int(rng.integers(5, 40))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = radius * rng.uniform(0.3, 1.0, k)
        pts = np.column_stack(
            [centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)]
        )
        if shapely.Polygon(pts).is_valid:
            return pts


def random_annotation(
    rng: np.random.Generator, extent: float, size: float
) -> tuple[TumourAnnotation, Any]:
    """Random tumour polygons (some with holes, some overlapping) and an exclusion, together
    with the exact shapely region they describe."""
    tumour, geoms = [], []
    for _ in range(int(rng.integers(1, 4))):
        centre = rng.uniform(0.25 * extent, 0.75 * extent, 2)
        radius = float(rng.uniform(0.5 * size, 4 * size))
        ext = random_star(rng, centre, radius)
        hole = random_star(rng, centre, 0.2 * radius)
        geom = shapely.Polygon(ext, [hole])
        if geom.is_valid:
            tumour.append(Polygon(ext, (hole,)))
        else:
            geom = shapely.Polygon(ext)
            tumour.append(Polygon(ext))
        geoms.append(geom)
    excl = random_star(rng, rng.uniform(0.25 * extent, 0.75 * extent, 2), 1.5 * size)
    region = shapely.union_all(geoms).difference(shapely.Polygon(excl))
    return TumourAnnotation(Path("random"), tuple(tumour), (Polygon(excl),)), region


# --------------------------------------------------------------------------------------------
# Writers and round trips
# --------------------------------------------------------------------------------------------


def test_qupath_geojson_round_trip(tmp_path: Path) -> None:
    polys = [
        Polygon(np.array(square(100.5, 200.25, 400)), (np.array(square(200, 300, 50)),)),
        Polygon(np.array([[1000, 1000], [1300, 1100], [1100, 1400]])),
    ]
    path = tmp_path / "gt.geojson"
    write_qupath_geojson(path, polys)

    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 2
    first = doc["features"][0]
    assert first["properties"]["classification"]["name"] == "Tumor"
    assert first["properties"]["objectType"] == "annotation"
    ring = first["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1], "GeoJSON rings must be closed"
    assert len(first["geometry"]["coordinates"]) == 2

    loaded = load_annotation(path, CFG)
    assert loaded.exclusions == ()
    assert len(loaded.tumour) == 2
    for got, want in zip(loaded.tumour, polys, strict=True):
        np.testing.assert_array_equal(got.exterior, want.exterior)
        assert len(got.holes) == len(want.holes)
        for gh, wh in zip(got.holes, want.holes, strict=True):
            np.testing.assert_array_equal(gh, wh)
    # Deterministic output: re-writing gives identical bytes (stable hashes downstream).
    before = path.read_bytes()
    write_qupath_geojson(path, polys)
    assert path.read_bytes() == before


def test_qupath_custom_class_is_read_back_as_configured(tmp_path: Path) -> None:
    path = tmp_path / "x.geojson"
    write_qupath_geojson(path, [Polygon(np.array(square(0, 0, 10)))], class_name="Carcinoma")
    assert len(load_annotation(path, CFG).tumour) == 1
    write_qupath_geojson(path, [Polygon(np.array(square(0, 0, 10)))], class_name="Stroma")
    assert load_annotation(path, CFG).tumour == ()


def test_asap_xml_round_trip_with_holes_and_exclusions(tmp_path: Path) -> None:
    holed = Polygon(np.array(square(0, 0, 1024)), (np.array(square(256, 256, 256)),))
    plain = Polygon(np.array([[1100.0, 100.0], [1900.5, 150.0], [1500.25, 900.75]]))
    exclusion = Polygon(np.array(square(1200, 300, 256)))
    path = tmp_path / "gt.xml"
    write_asap_xml(path, [holed, plain], exclusions=[exclusion])

    text = path.read_text()
    assert text.startswith('<?xml version="1.0"?>')
    assert 'PartOfGroup="_0"' in text and 'PartOfGroup="_2"' in text

    loaded = load_annotation(path, CFG)
    assert [p.holes for p in loaded.tumour] == [(), ()]
    np.testing.assert_array_equal(loaded.tumour[0].exterior, holed.exterior)
    np.testing.assert_array_equal(loaded.tumour[1].exterior, plain.exterior)
    # The hole became an exclusion (Camelyon16 convention), as did the exclusion itself.
    assert len(loaded.exclusions) == 2
    np.testing.assert_array_equal(loaded.exclusions[0].exterior, holed.holes[0])
    np.testing.assert_array_equal(loaded.exclusions[1].exterior, exclusion.exterior)

    # Same patch fractions as the in-memory original.
    coords = grid(2048, 1280, 256, 256)
    original = TumourAnnotation(Path("mem"), (holed, plain), (exclusion,))
    np.testing.assert_allclose(
        tumour_fraction(loaded, coords, 256, (2048, 1280), CFG),
        tumour_fraction(original, coords, 256, (2048, 1280), CFG),
        atol=1e-6,
    )


def test_asap_writer_refuses_exclusion_with_holes(tmp_path: Path) -> None:
    excl = Polygon(np.array(square(0, 0, 100)), (np.array(square(10, 10, 10)),))
    with pytest.raises(AnnotationError, match="exclusion polygon 0 has holes"):
        write_asap_xml(tmp_path / "x.xml", [], exclusions=[excl])
    assert not (tmp_path / "x.xml").exists()


@pytest.mark.parametrize("writer", [write_qupath_geojson, write_asap_xml])
def test_writers_refuse_non_finite_and_leave_nothing(tmp_path: Path, writer: Any) -> None:
    bad = Polygon(np.array([[0.0, 0.0], [np.nan, 1.0], [1.0, 1.0]]))
    good = Polygon(np.array(square(0, 0, 5)))
    target = tmp_path / "out.file"
    with pytest.raises(AnnotationError, match="polygon 1 exterior is not finite"):
        writer(target, [good, bad])
    assert list(tmp_path.iterdir()) == [], "no partial or temporary file may be left behind"


def test_polygon_normalises_and_freezes_arrays() -> None:
    ring = [[0, 0], [4, 0], [4, 4], [0, 0]]
    poly = Polygon(ring)  # type: ignore[arg-type]
    assert poly.exterior.dtype == np.float64
    assert poly.exterior.shape == (3, 2), "the repeated closing vertex is dropped"
    with pytest.raises(ValueError):
        poly.exterior[0, 0] = 1.0
    with pytest.raises(ValueError, match="K×2"):
        Polygon(np.zeros((4, 3)))


# --------------------------------------------------------------------------------------------
# GeoJSON loading
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "properties",
    [
        {"classification": {"name": "Tumor", "color": [200, 0, 0]}},  # QuPath ≥ 0.2
        {"classification": {"names": ["Tumor", "Positive"]}},  # derived class
        {"classification": "tumour"},
        {"name": "TUMOR"},
        {"class": "Metastasis"},
        {"classification": {"name": "Tumor: Positive"}},
    ],
)
def test_geojson_classification_forms(tmp_path: Path, properties: dict[str, Any]) -> None:
    doc = {
        "type": "FeatureCollection",
        "features": [feature(polygon_geometry(square(0, 0, 10)), **properties)],
    }
    loaded = load_annotation(write_json(tmp_path / "a.geojson", doc), CFG)
    assert len(loaded.tumour) == 1 and loaded.exclusions == ()


def test_geojson_classification_beats_free_text_name(tmp_path: Path) -> None:
    doc = [feature(polygon_geometry(square(0, 0, 10)), classification="Stroma", name="Tumor")]
    assert load_annotation(write_json(tmp_path / "a.json", doc), CFG).tumour == ()


@pytest.mark.parametrize("shape", ["collection", "feature", "list"])
def test_geojson_top_level_shapes(tmp_path: Path, shape: str) -> None:
    feat = feature(polygon_geometry(square(5, 5, 10)), classification={"name": "Tumor"})
    doc: Any = {
        "collection": {"type": "FeatureCollection", "features": [feat]},
        "feature": feat,
        "list": [feat],
    }[shape]
    loaded = load_annotation(write_json(tmp_path / "a.geojson", doc), CFG)
    np.testing.assert_array_equal(loaded.tumour[0].exterior, square(5, 5, 10))


def test_geojson_multipolygon_holes_exclusions_and_ignored_classes(tmp_path: Path) -> None:
    multi = {
        "type": "MultiPolygon",
        "coordinates": [
            [closed(square(0, 0, 100)), closed(square(25, 25, 50))],
            [closed(square(200, 0, 50))],
        ],
    }
    collection = {
        "type": "GeometryCollection",
        "geometries": [polygon_geometry(square(400, 400, 10))],
    }
    doc = {
        "type": "FeatureCollection",
        "features": [
            feature(multi, classification={"name": "Tumor"}),
            feature(polygon_geometry(square(0, 0, 1000)), classification={"name": "Tissue"}),
            # An unrelated class is not even validated: a broken "Tissue" outline is harmless.
            feature({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}, name="Tissue"),
            feature(None, classification={"name": "Other"}),
            feature(polygon_geometry(square(10, 10, 5)), classification={"name": "Exclusion"}),
            feature(collection, classification={"name": "Tumour"}),
        ],
    }
    loaded = load_annotation(write_json(tmp_path / "a.geojson", doc), CFG)
    assert len(loaded.tumour) == 3
    assert len(loaded.tumour[0].holes) == 1 and loaded.tumour[1].holes == ()
    np.testing.assert_array_equal(loaded.tumour[0].holes[0], square(25, 25, 50))
    assert len(loaded.exclusions) == 1


def test_empty_annotation_is_a_complete_negative(tmp_path: Path) -> None:
    doc = {
        "type": "FeatureCollection",
        "features": [feature(polygon_geometry(square(0, 0, 900)), classification="Tissue")],
    }
    loaded = load_annotation(write_json(tmp_path / "a.geojson", doc), CFG, slide_dims=(1000, 1000))
    assert loaded.tumour == () and loaded.exclusions == ()
    coords = grid(1000, 1000, 256, 256)
    frac = tumour_fraction(loaded, coords, 256, (1000, 1000), CFG)
    assert frac.dtype == np.float32 and not frac.any()
    assert (patch_labels(frac, True, CFG) == 0).all()
    assert (patch_labels(frac, False, CFG) == -1).all()


def test_format_is_sniffed_from_content_not_suffix(tmp_path: Path) -> None:
    xml_in_json = tmp_path / "mislabelled.json"
    xml_in_json.write_text(asap_doc([("_0", "Polygon", [(0, 0, 0), (1, 10, 0), (2, 10, 10)])]))
    assert len(load_annotation(xml_in_json, CFG).tumour) == 1
    bom_json = tmp_path / "bom.txt"
    doc = [feature(polygon_geometry(square(0, 0, 10)), classification="Tumor")]
    bom_json.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())
    assert len(load_annotation(bom_json, CFG).tumour) == 1


# --------------------------------------------------------------------------------------------
# ASAP loading
# --------------------------------------------------------------------------------------------


def test_asap_types_order_groups_and_decimal_commas(tmp_path: Path) -> None:
    text = asap_doc(
        [
            # Coordinates listed out of order: Order decides (else this would be a bow-tie).
            ("_0", "Polygon", [(2, 100, 100), (0, 0, 0), (3, 0, 100), (1, 100, 0)]),
            ("_1", "Spline", [(0, 200, 0), (1, 300, 0), (2, 250, 80)]),
            ("Tumor", "Rectangle", [(0, 400, 0), (1, 500, 0), (2, 500, 50), (3, 400, 50)]),
            ("metastases", "Polygon", [(0, "600,5", "0,25"), (1, "700,5", 0), (2, 650, 90)]),
            ("_2", "Polygon", [(0, 10, 10), (1, 20, 10), (2, 20, 20)]),
            ("None", "Polygon", [(0, 0, 0), (1, 1, 1)]),  # ignored group, not validated
            ("Stroma", "Dot", [(0, 5, 5)]),  # ignored group, so its type is not checked
        ]
    )
    path = tmp_path / "camelyon.xml"
    path.write_text(text)
    loaded = load_annotation(path, CFG)
    assert len(loaded.tumour) == 4 and len(loaded.exclusions) == 1
    np.testing.assert_array_equal(loaded.tumour[0].exterior, square(0, 0, 100))
    np.testing.assert_array_equal(loaded.tumour[3].exterior[0], [600.5, 0.25])


def test_asap_exclusion_inside_tumour_gives_negative_patches(tmp_path: Path) -> None:
    """Camelyon16: a _2 region inside a _0 region is not tumour."""
    text = asap_doc(
        [
            ("_0", "Polygon", [(0, 0, 0), (1, 1024, 0), (2, 1024, 1024), (3, 0, 1024)]),
            ("_2", "Polygon", [(0, 256, 256), (1, 768, 256), (2, 768, 768), (3, 256, 768)]),
        ]
    )
    path = tmp_path / "c16.xml"
    path.write_text(text)
    loaded = load_annotation(path, CFG, slide_dims=(1536, 1024))
    coords = grid(1536, 1024, 256, 256)
    frac = tumour_fraction(loaded, coords, 256, (1536, 1024), CFG).reshape(4, 6)
    expected = np.zeros((4, 6), dtype=np.float32)
    expected[:, :4] = 1.0
    expected[1:3, 1:3] = 0.0
    np.testing.assert_array_equal(frac, expected)
    labels = patch_labels(frac.ravel(), True, CFG).reshape(4, 6)
    assert (labels[1:3, 1:3] == 0).all() and (labels[0, :4] == 1).all()
    assert (labels[:, 4:] == 0).all()


def test_billion_laughs_is_refused_quickly(tmp_path: Path) -> None:
    lol = "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10}">' for i in range(1, 10))
    path = tmp_path / "bomb.xml"
    path.write_text(
        f'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol0 "lol">{lol}]>'
        "<ASAP_Annotations>&lol9;</ASAP_Annotations>"
    )
    with pytest.raises(AnnotationError, match="DOCTYPE/ENTITY"):
        load_annotation(path, CFG)


def test_external_entity_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    path = tmp_path / "xxe.xml"
    path.write_text(
        f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e SYSTEM "file://{secret}">]>'
        "<ASAP_Annotations>&e;</ASAP_Annotations>"
    )
    with pytest.raises(AnnotationError, match="DOCTYPE/ENTITY"):
        load_annotation(path, CFG)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_a_doctype_is_refused_in_any_encoding(tmp_path: Path, encoding: str) -> None:
    """Even a DTD that declares nothing: ASAP never writes one, and a byte search for
    ``<!DOCTYPE`` would miss it in UTF-16."""
    path = tmp_path / "dtd.xml"
    path.write_bytes(
        f'<?xml version="1.0" encoding="{encoding}"?><!DOCTYPE ASAP_Annotations>'
        "<ASAP_Annotations/>".encode(encoding)
    )
    with pytest.raises(AnnotationError, match="DOCTYPE/ENTITY"):
        load_annotation(path, CFG)


def test_an_unknown_encoding_in_the_xml_declaration_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bogus.xml"
    path.write_text('<?xml version="1.0" encoding="bogus"?><ASAP_Annotations/>')
    with pytest.raises(AnnotationError, match="unknown encoding: bogus in the XML declaration"):
        load_annotation(path, CFG)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _tumour_doc(geometry: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [
        feature(polygon_geometry(square(0, 0, 10)), classification="Tumor"),
        feature(geometry, classification={"name": "Tumor"}),
    ]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "unparsable JSON"),
        ("<ASAP_Annotations><Annotations>", "unparsable XML"),
        ("<Other/>", "not an ASAP file"),
        ("hello", "neither GeoJSON nor XML"),
        (json.dumps({"type": "Polygon", "coordinates": []}), "top-level 'Polygon'"),
        (json.dumps(_tumour_doc(None)), "feature 1 \\(Tumor\\): missing geometry"),
        (
            json.dumps(_tumour_doc({"type": "Polygon"})),
            "feature 1 \\(Tumor\\): missing coordinates",
        ),
        (
            json.dumps(_tumour_doc(polygon_geometry([[0, 0], [5, 5], [0, 0]]))),
            "feature 1 \\(Tumor\\) polygon 0 exterior: fewer than 3 distinct points",
        ),
        (
            json.dumps(_tumour_doc(polygon_geometry([[0, 0], [5, 0], [5, float("nan")]]))),
            "feature 1 .* vertex 2 has a non-finite coordinate",
        ),
        (
            json.dumps(_tumour_doc(polygon_geometry([[0, 0], [10, 10], [10, 0], [0, 10]]))),
            r"feature 1 \(Tumor\) polygon 0: invalid polygon: Self-intersection\[5 5\]",
        ),
        (
            json.dumps(_tumour_doc(polygon_geometry(square(0, 0, 10), square(50, 50, 5)))),
            "feature 1 .*invalid polygon: Hole lies outside shell",
        ),
        (
            json.dumps(_tumour_doc({"type": "Circle", "coordinates": [0, 0]})),
            "unsupported geometry type 'Circle'",
        ),
        (
            json.dumps(_tumour_doc({"type": "Polygon", "coordinates": [[["a", "b"]] * 3]})),
            "coordinates are not numeric",
        ),
        (
            asap_doc([("_0", "Polygon", [(0, 0, 0), (1, "inf", 0), (2, 5, 5)])]),
            "annotation 0 .* vertex 1 has a non-finite coordinate",
        ),
        (
            asap_doc([("_0", "Polygon", [(0, 0, 0), (1, "abc", 0), (2, 5, 5)])]),
            "annotation 0 .*coordinate 1 has a missing or non-numeric",
        ),
        (asap_doc([("_0", "Polygon", [])]), "annotation 0 .*missing coordinates"),
        (
            asap_doc(
                [
                    ("_0", "Polygon", [(0, 0, 0), (1, 9, 0), (2, 9, 9)]),
                    ("_2", "Polygon", [(0, 0, 0), (1, 9, 9), (2, 9, 0), (3, 0, 9)]),
                ]
            ),
            r"annotation 1 \('Annotation 1', group _2\): invalid polygon: Self-intersection",
        ),
    ],
)
def test_malformed_files_raise_annotation_error(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.annotation"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=match) as info:
        load_annotation(path, CFG)
    assert str(path) in str(info.value), "the message names the file"


def test_polygon_entirely_outside_slide_is_an_error(tmp_path: Path) -> None:
    doc = [feature(polygon_geometry(square(5000, 5000, 100)), classification="Tumor")]
    path = write_json(tmp_path / "a.geojson", doc)
    assert len(load_annotation(path, CFG).tumour) == 1  # without slide size nothing to check
    with pytest.raises(AnnotationError, match=r"feature 0 .*entirely outside the slide"):
        load_annotation(path, CFG, slide_dims=(1000, 1000))


def test_polygon_partially_outside_slide_is_clipped(tmp_path: Path) -> None:
    ext = [[-100.0, -100.0], [500.0, -100.0], [500.0, 300.0], [-100.0, 300.0]]
    doc = [feature(polygon_geometry(ext, square(100, 100, 50)), classification="Tumor")]
    loaded = load_annotation(write_json(tmp_path / "a.geojson", doc), CFG, slide_dims=(400, 200))
    (poly,) = loaded.tumour
    geom = shapely.Polygon(poly.exterior, poly.holes)
    assert geom.bounds == (0.0, 0.0, 400.0, 200.0)
    assert geom.area == pytest.approx(400 * 200 - 50 * 50)


def test_clipping_can_split_a_polygon(tmp_path: Path) -> None:
    # A U shape whose base lies outside the slide becomes two separate polygons.
    u_shape = [[0, 0], [30, 0], [30, 150], [70, 150], [70, 0], [100, 0], [100, 200], [0, 200]]
    doc = [feature(polygon_geometry(u_shape), classification="Tumor")]
    loaded = load_annotation(write_json(tmp_path / "a.geojson", doc), CFG, slide_dims=(100, 140))
    assert len(loaded.tumour) == 2


def test_missing_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="file not found"):
        load_annotation(tmp_path / "absent.geojson", CFG)
    with pytest.raises(AnnotationError, match="not a regular file"):
        load_annotation(tmp_path, CFG)
    huge = tmp_path / "huge.geojson"
    with open(huge, "wb") as fh:  # sparse: no 200 MB actually written
        fh.truncate(ann.MAX_ANNOTATION_BYTES + 1)
    with pytest.raises(AnnotationError, match="over the 200 MB limit"):
        load_annotation(huge, CFG)


# --------------------------------------------------------------------------------------------
# Tumour fraction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_fraction_matches_shapely_on_aligned_grid(seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = 256
    dims = (size * 12, size * 10)
    coords = grid(*dims, size, size)
    for _ in range(5):
        annotation, region = random_annotation(rng, dims[1], size)
        got = tumour_fraction(annotation, coords, size, dims, CFG)
        want = exact_fractions(region, coords, size)
        assert got.dtype == np.float32 and got.shape == (len(coords),)
        # Exact-coverage rasterisation: only float rounding separates it from shapely.
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert ((want == 0) == (got == 0)).all(), "zero must stay exactly zero"


@pytest.mark.parametrize(
    ("size", "step", "raster"),
    [(256, 192, 32), (1000, 700, 32), (300, 250, 16), (512, 512, 24)],
)
def test_fraction_matches_shapely_on_unaligned_grids(size: int, step: int, raster: int) -> None:
    """Overlapping grids put patch edges inside mask pixels; still within the spec's 0.02."""
    rng = np.random.default_rng(size + step)
    cfg = AnnotationConfig(raster_px_per_patch=raster)
    dims = (size * 9, size * 8)
    coords = grid(*dims, size, step) + np.array([3, 7])
    for _ in range(4):
        annotation, region = random_annotation(rng, dims[1], size)
        got = tumour_fraction(annotation, coords, size, dims, cfg)
        want = exact_fractions(region, coords, size)
        assert np.abs(got - want).max() < 0.02
        assert abs(float(np.mean(got - want))) < 1e-3, "no systematic bias"


def test_fraction_does_not_depend_on_tiling(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    size, dims = 256, (256 * 12, 256 * 12)
    coords = grid(*dims, size, 128)
    annotation, _ = random_annotation(rng, dims[0], size)
    whole = tumour_fraction(annotation, coords, size, dims, CFG)
    monkeypatch.setattr(ann, "RASTER_TILE_PX", 32)  # one patch per tile: many tile borders
    tiled = tumour_fraction(annotation, coords, size, dims, CFG)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    assert whole.any()


def test_grid_aligned_rectangle_gives_exact_zero_and_one() -> None:
    """An outline on patch borders must not leak into neighbours (label 0 needs exactly 0)."""
    # L-shape: its concave corner edges lie on patch borders too.
    l_shape = np.array([[256, 256], [1024, 256], [1024, 512], [512, 512], [512, 1024], [256, 1024]])
    annotation = TumourAnnotation(Path("l"), (Polygon(l_shape),), ())
    coords = grid(1280, 1280, 256, 256)
    frac = tumour_fraction(annotation, coords, 256, (1280, 1280), CFG).reshape(5, 5)
    expected = np.zeros((5, 5), dtype=np.float32)
    expected[1, 1:4] = 1
    expected[1:4, 1] = 1
    np.testing.assert_array_equal(frac, expected)


def test_overlapping_tumour_polygons_are_not_double_counted() -> None:
    a = Polygon(np.array(square(0, 0, 200)))
    b = Polygon(np.array(square(100, 0, 200)))
    annotation = TumourAnnotation(Path("o"), (a, b), ())
    coords = np.array([[0, 0], [256, 0]])
    frac = tumour_fraction(annotation, coords, 256, (1024, 1024), CFG)
    np.testing.assert_allclose(frac, [256 * 200 / 256**2, 44 * 200 / 256**2], atol=1e-6)


def test_island_inside_hole_counts_as_tumour() -> None:
    ring = Polygon(np.array(square(0, 0, 768)), (np.array(square(256, 256, 256)),))
    island = Polygon(np.array(square(320, 320, 128)))
    annotation = TumourAnnotation(Path("i"), (ring, island), ())
    frac = tumour_fraction(annotation, np.array([[256, 256], [0, 0]]), 256, (768, 768), CFG)
    np.testing.assert_allclose(frac, [0.25, 1.0], atol=1e-6)


def test_tumour_beyond_the_slide_edge_is_ignored() -> None:
    # Loaded without slide_dims, so unclipped: the part beyond x = 300 must not count.
    annotation = TumourAnnotation(Path("b"), (Polygon(np.array(square(0, 0, 1000))),), ())
    frac = tumour_fraction(annotation, np.array([[0, 0], [200, 0]]), 200, (300, 1000), CFG)
    np.testing.assert_allclose(frac, [1.0, 0.5], atol=1e-6)


def test_huge_slide_with_small_tumour_is_fast_and_local() -> None:
    """Only the annotated, patched area is rasterised, not the 2-gigapixel-wide slide."""
    dims = (2_000_000, 1_500_000)
    tumour = Polygon(random_star(np.random.default_rng(3), np.array([1_500_000, 1_000_000]), 900))
    annotation = TumourAnnotation(Path("h"), (tumour,), ())
    near = grid(2048 * 2, 2048 * 2, 512, 512) + np.array([1_498_976, 998_976])
    far = np.array([[0, 0], [1_900_000, 10_000]])
    coords = np.concatenate([far, near])
    frac = tumour_fraction(annotation, coords, 512, dims, CFG)
    assert frac[:2].tolist() == [0.0, 0.0]
    want = exact_fractions(shapely.Polygon(tumour.exterior), near, 512)
    np.testing.assert_allclose(frac[2:], want, atol=1e-5)


def test_fraction_input_checks() -> None:
    annotation = TumourAnnotation(Path("x"), (Polygon(np.array(square(0, 0, 10))),), ())
    assert tumour_fraction(annotation, np.zeros((0, 2), np.int64), 256, (10, 10), CFG).shape == (0,)
    with pytest.raises(ValueError, match="N×2"):
        tumour_fraction(annotation, np.zeros((3,), np.int64), 256, (10, 10), CFG)
    with pytest.raises(ValueError, match="positive"):
        tumour_fraction(annotation, np.zeros((1, 2), np.int64), 0, (10, 10), CFG)


# --------------------------------------------------------------------------------------------
# Patch labels
# --------------------------------------------------------------------------------------------


def test_patch_labels_every_branch() -> None:
    frac = np.array([0.0, 0.0001, 0.3, 0.4999, 0.5, 0.9, 1.0, np.nan], dtype=np.float32)
    complete = patch_labels(frac, True, CFG)
    partial = patch_labels(frac, False, CFG)
    assert complete.dtype == np.int8 and partial.dtype == np.int8
    assert complete.tolist() == [0, -1, -1, -1, 1, 1, 1, -1]
    assert partial.tolist() == [-1, -1, -1, -1, 1, 1, 1, -1]


def test_patch_labels_custom_thresholds() -> None:
    cfg = AnnotationConfig(positive_fraction=0.8, negative_fraction=0.1)
    frac = np.array([0.05, 0.1, 0.11, 0.79, 0.8])
    assert patch_labels(frac, True, cfg).tolist() == [0, 0, -1, -1, 1]
    assert patch_labels(frac, False, cfg).tolist() == [-1, -1, -1, -1, 1]
    with pytest.raises(ValueError, match="1-D"):
        patch_labels(np.zeros((2, 2)), True, cfg)


def test_partial_annotation_end_to_end(tmp_path: Path) -> None:
    """Outlined tumour is trusted; unoutlined tissue of a partial annotation stays unknown."""
    path = tmp_path / "partial.geojson"
    write_qupath_geojson(path, [Polygon(np.array(square(0, 0, 512)))])
    loaded = load_annotation(path, CFG, slide_dims=(1024, 512))
    coords = grid(1024, 512, 256, 256)
    frac = tumour_fraction(loaded, coords, 256, (1024, 512), CFG)
    assert patch_labels(frac, False, CFG).tolist() == [1, 1, -1, -1, 1, 1, -1, -1]
    assert patch_labels(frac, True, CFG).tolist() == [1, 1, 0, 0, 1, 1, 0, 0]


# --------------------------------------------------------------------------------------------
# What a file holds besides tumour, and whether it may label a tumour slide (issue 20, point 1)
# --------------------------------------------------------------------------------------------


def test_points_and_lines_beside_a_tumour_polygon_are_ignored_and_counted(tmp_path: Path) -> None:
    point = {"type": "Point", "coordinates": [5, 5]}
    collection = {
        "type": "GeometryCollection",
        "geometries": [
            polygon_geometry(square(50, 50, 10)),
            {"type": "Point", "coordinates": [1, 1]},
        ],
    }
    doc = {
        "type": "FeatureCollection",
        "features": [
            feature(polygon_geometry(square(0, 0, 10)), classification={"name": "Tumor"}),
            feature(point, classification={"name": "Tumor"}),
            feature(
                {"type": "LineString", "coordinates": [[0, 0], [9, 9]]}, classification="Tumor"
            ),
            feature(collection, classification={"name": "Tumor"}),
            feature({"type": "MultiPoint", "coordinates": [[1, 1]]}, classification="Stroma"),
        ],
    }
    loaded = load_annotation(write_json(tmp_path / "a.geojson", doc), CFG)
    assert len(loaded.tumour) == 2  # the polygons are kept
    # Only outlines of a tumour or exclusion class are counted: a Stroma point is not ours.
    assert loaded.ignored_geometries == {"Point": 2, "LineString": 1}
    assert loaded.classes_found == {"Tumor": 4, "Stroma": 1}


def test_asap_dots_and_point_sets_of_a_tumour_group_are_ignored_and_counted(
    tmp_path: Path,
) -> None:
    text = asap_doc(
        [
            ("_0", "Polygon", [(0, 0, 0), (1, 100, 0), (2, 100, 100)]),
            ("_0", "Dot", [(0, 5, 5)]),
            ("_1", "PointSet", [(0, 5, 5), (1, 6, 6)]),
            ("None", "Polygon", [(0, 0, 0), (1, 1, 1)]),
        ]
    )
    path = tmp_path / "a.xml"
    path.write_text(text)
    loaded = load_annotation(path, CFG)
    assert len(loaded.tumour) == 1
    assert loaded.ignored_geometries == {"Dot": 1, "PointSet": 1}
    # ASAP's group "None" is no class: reported as unclassified, not as an unknown class.
    assert loaded.classes_found == {"_0": 2, "_1": 1, "Unclassified": 1}
    assert loaded.unknown_classes == ()


def test_classes_found_and_unknown_classes_are_reported(tmp_path: Path) -> None:
    doc = [
        feature(polygon_geometry(square(0, 0, 10)), classification={"name": "Stroma"}),
        feature(polygon_geometry(square(0, 0, 10)), classification={"name": "Tumorgewebe"}),
        feature(polygon_geometry(square(0, 0, 10)), classification={"name": "Stroma"}),
        feature(polygon_geometry(square(0, 0, 10))),
        feature(polygon_geometry(square(0, 0, 10)), classification={"name": "Tissue"}),
        feature(polygon_geometry(square(0, 0, 10)), classification={"name": "Stroma"}),
    ]
    loaded = load_annotation(write_json(tmp_path / "a.geojson", doc), CFG)
    assert loaded.tumour == ()
    assert loaded.classes_found == {"Stroma": 3, "Tumorgewebe": 1, "Unclassified": 1, "Tissue": 1}
    assert loaded.unknown_classes == ("Tumorgewebe",)  # Stroma, Tissue: QuPath's known classes
    assert ann.describe_found(loaded) == (
        'classes found "Stroma" (3), "Tumorgewebe" (1, unknown), unclassified (1), "Tissue" (1)'
    )


def test_tumour_classes_are_a_setting_matched_case_insensitively(tmp_path: Path) -> None:
    doc = [
        feature(polygon_geometry(square(0, 0, 10)), classification={"name": "TUMORGEWEBE"}),
        feature(polygon_geometry(square(20, 0, 10))),
        feature(polygon_geometry(square(40, 0, 10)), classification={"name": "Tumor"}),
    ]
    path = write_json(tmp_path / "a.geojson", doc)
    german = load_annotation(path, AnnotationConfig(tumour_classes=("Tumorgewebe",)))
    assert len(german.tumour) == 1 and german.unknown_classes == ("Tumor",)
    unclassified = load_annotation(path, AnnotationConfig(tumour_classes=("unclassified",)))
    assert len(unclassified.tumour) == 1


def _stroma_only(tmp_path: Path) -> Path:
    doc = {
        "type": "FeatureCollection",
        "features": [
            *[feature(polygon_geometry(square(0, 0, 10)), classification="Stroma")] * 3,
            feature(polygon_geometry(square(0, 0, 10))),
        ],
    }
    return write_json(tmp_path / "x.geojson", doc)


def test_a_tumour_slide_without_tumour_region_fails_naming_the_classes_found(
    tmp_path: Path,
) -> None:
    path = _stroma_only(tmp_path)
    with pytest.raises(AnnotationError) as info:
        ann.annotation_outcome(path, CFG, (1000, 1000), tumour_slide=True)
    assert str(info.value) == (
        f"annotation {path}: no tumour region on a tumour slide: classes found "
        '"Stroma" (3), unclassified (1); tumour classes are Tumor, Tumour, Carcinoma, '
        "Metastasis, metastases, _0, _1 (set [annotation] tumour_classes or --tumour-classes; "
        "or --on-no-tumour-region slide_label_only to prepare it with its slide label only)"
    )


def test_a_tumour_slide_without_tumour_region_can_keep_its_slide_label_only(
    tmp_path: Path,
) -> None:
    cfg = AnnotationConfig(on_no_tumour_region="slide_label_only")
    outcome = ann.annotation_outcome(_stroma_only(tmp_path), cfg, (1000, 1000), tumour_slide=True)
    assert not outcome.patch_labels
    summary = outcome.summary()
    assert summary["patch_labels"] is False and summary["tumour_regions"] == 0
    assert summary["classes_found"] == {"Stroma": 3, "Unclassified": 1}
    assert summary["note"].startswith("slide label only, no patch labels: annotation x.geojson")
    coords = grid(1000, 1000, 256, 256)
    kept, fraction, labels = ann.slide_patch_labels(outcome, coords, 256, (1000, 1000), True, cfg)
    assert kept is outcome and fraction is None and labels is None


def test_a_normal_slide_without_tumour_region_is_all_normal(tmp_path: Path) -> None:
    outcome = ann.annotation_outcome(_stroma_only(tmp_path), CFG, (1000, 1000), tumour_slide=False)
    coords = grid(1000, 1000, 256, 256)
    outcome, _fraction, labels = ann.slide_patch_labels(
        outcome, coords, 256, (1000, 1000), True, CFG
    )
    assert outcome.patch_labels and labels is not None and (labels == 0).all()


@pytest.mark.parametrize(
    ("doc", "found"),
    [
        ({"type": "FeatureCollection", "features": []}, "the file holds no outline"),
        (
            [feature({"type": "Point", "coordinates": [5, 5]}, classification="Tumor")],
            'classes found "Tumor" (1); ignored (no area): 1 Point',
        ),
    ],
    ids=["empty_collection", "tumour_point_only"],
)
def test_an_annotation_with_nothing_of_tumour_area_fails_a_tumour_slide(
    tmp_path: Path, doc: Any, found: str
) -> None:
    path = write_json(tmp_path / "a.geojson", doc)
    with pytest.raises(AnnotationError, match="no tumour region on a tumour slide") as info:
        ann.annotation_outcome(path, CFG, (1000, 1000), tumour_slide=True)
    assert f"tumour slide: {found}; tumour classes are" in str(info.value)


def test_tumour_wholly_inside_an_exclusion_is_no_tumour_region(tmp_path: Path) -> None:
    doc = [
        feature(polygon_geometry(square(10, 10, 10)), classification="Tumor"),
        feature(polygon_geometry(square(0, 0, 100)), classification="_2"),
    ]
    path = write_json(tmp_path / "a.geojson", doc)
    with pytest.raises(AnnotationError, match="inside an exclusion outline"):
        ann.annotation_outcome(path, CFG, (1000, 1000), tumour_slide=True)


def test_tumour_outlines_touching_no_patch_are_no_tumour_region(tmp_path: Path) -> None:
    doc = [feature(polygon_geometry(square(900, 900, 50)), classification="Tumor")]
    path = write_json(tmp_path / "a.geojson", doc)
    coords = np.array([[0, 0], [256, 0]])  # the only tissue patches, far from the outline
    outcome = ann.annotation_outcome(path, CFG, (1000, 1000), tumour_slide=True)
    with pytest.raises(AnnotationError, match="touch none of its 2 tissue patches"):
        ann.slide_patch_labels(outcome, coords, 256, (1000, 1000), True, CFG)
    # A tumour smaller than half a patch touches one: that patch is unknown (-1), which is true.
    small = [feature(polygon_geometry(square(10, 10, 20)), classification="Tumor")]
    outcome = ann.annotation_outcome(
        write_json(tmp_path / "s.geojson", small), CFG, (1000, 1000), tumour_slide=True
    )
    _, _, labels = ann.slide_patch_labels(outcome, coords, 256, (1000, 1000), True, CFG)
    assert labels is not None and labels.tolist() == [-1, 0]


def test_class_lists_are_checked() -> None:
    with pytest.raises(ValueError, match=r"'_0'.* in both tumour_classes and exclusion_classes"):
        AnnotationConfig(exclusion_classes=("_0",))
    with pytest.raises(ValueError, match="at least 1 item"):
        AnnotationConfig(tumour_classes=())
    with pytest.raises(ValueError, match="tumour_classes holds an empty name"):
        AnnotationConfig(tumour_classes=("Tumor", " "))
    # A tumour class that QuPath ships as "other" simply becomes tumour.
    assert AnnotationConfig(tumour_classes=("Stroma",)).tumour_classes == ("Stroma",)


def test_tumour_outlined_on_a_normal_slide_is_said(tmp_path: Path) -> None:
    doc = [
        feature(polygon_geometry(square(0, 0, 512)), classification="Tumor"),
        feature({"type": "Point", "coordinates": [900, 900]}, classification="Tumor"),
    ]
    path = write_json(tmp_path / "n.geojson", doc)
    outcome = ann.annotation_outcome(path, CFG, (1000, 1000), tumour_slide=False)
    coords = grid(1000, 1000, 256, 256)
    outcome, _, labels = ann.slide_patch_labels(outcome, coords, 256, (1000, 1000), True, CFG)
    assert labels is not None and int((labels == 1).sum()) == 4
    assert outcome.note == (
        "annotation n.geojson outlines tumour on 4 patch(es) of a slide with the first (normal) "
        "label: check the slide's label; annotation n.geojson: ignored (no area): 1 Point"
    )


def test_asap_nested_groups_take_the_class_of_their_parent_group(tmp_path: Path) -> None:
    text = asap_doc(
        [
            ("region 1", "Polygon", [(0, 0, 0), (1, 100, 0), (2, 100, 100)]),
            ("loop a", "Polygon", [(0, 0, 0), (1, 50, 0), (2, 50, 50)]),
            ("lymph", "Polygon", [(0, 0, 0), (1, 50, 0), (2, 50, 50)]),
        ]
    ).replace(
        "</AnnotationGroups>",
        '<Group Name="region 1" PartOfGroup="Tumor" Color="#f00"><Attributes /></Group>'
        '<Group Name="Tumor" PartOfGroup="None" Color="#f00"><Attributes /></Group>'
        # A cycle (a hand-edited file) must end, and leave the group unknown.
        '<Group Name="loop a" PartOfGroup="loop b" Color="#f00"><Attributes /></Group>'
        '<Group Name="loop b" PartOfGroup="loop a" Color="#f00"><Attributes /></Group>'
        "</AnnotationGroups>",
    )
    path = tmp_path / "nested.xml"
    path.write_text(text)
    loaded = load_annotation(path, CFG)
    assert len(loaded.tumour) == 1
    assert loaded.classes_found == {"region 1": 1, "loop a": 1, "lymph": 1}
    assert loaded.unknown_classes == ("loop a", "lymph")
