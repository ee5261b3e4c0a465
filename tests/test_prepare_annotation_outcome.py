"""`fedpath prepare` never labels a tumour slide's patches all normal by default (issue 20, 1).

Run at the level the bug was found: the CLI's ``main`` on tiny real slides, a manifest and the
annotation files a pathologist would export from QuPath. A tumour slide whose outlines are all
"Stroma" (or unclassified, or an empty FeatureCollection) used to come out ``done`` with every
patch labelled normal.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpath.common.featurebag import read_feature_bag
from fedpath.deploy.cli import EXIT_OK, EXIT_PARTIAL, main
from tests.tiffs import write_pyramid

pytestmark = pytest.mark.integration

SIDE = 1024
APERIO = f"Aperio Image Library v10.0.0\n{SIDE}x{SIDE} |AppMag = 20|MPP = 0.5"
COLUMNS = ("slide_id", "path", "label", "annotation", "annotation_complete")


def _square(x: float, y: float, side: float) -> list[list[float]]:
    return [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]


def _feature(geometry: dict[str, Any], name: str | None) -> dict[str, Any]:
    props: dict[str, Any] = {"objectType": "annotation"}
    if name is not None:
        props["classification"] = {"name": name, "color": [0, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _polygon(x: float, y: float, side: float) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [_square(x, y, side)]}


def _write(path: Path, features: list[dict[str, Any]]) -> str:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path.name


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tissue slide, four annotation files, one manifest."""
    root = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(0)
    rgb = np.full((SIDE, SIDE, 3), 240, np.uint8)
    rgb[128:900, 100:950] = (200, 80, 170)
    rgb = (rgb + rng.integers(0, 20, rgb.shape)).astype(np.uint8)
    write_pyramid(root / "slide.tiff", rgb, levels=2, compression="jpeg", description=APERIO)
    stroma = [_feature(_polygon(200 + 50 * i, 200, 40), "Stroma") for i in range(3)]
    stroma.append(_feature(_polygon(600, 600, 40), None))
    files = {
        "stroma": _write(root / "stroma.geojson", stroma),
        "empty": _write(root / "empty.geojson", []),
        "point": _write(
            root / "point.geojson",
            [
                _feature(_polygon(256, 256, 512), "Tumor"),
                _feature({"type": "Point", "coordinates": [700, 700]}, "Tumor"),
            ],
        ),
    }
    rows = [
        ("tumour_stroma", "tumour", files["stroma"]),
        ("tumour_empty", "tumour", files["empty"]),
        ("tumour_point", "tumour", files["point"]),
        ("normal_stroma", "normal", files["stroma"]),
    ]
    with (root / "slides.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for slide_id, label, annotation in rows:
            writer.writerow([slide_id, "slide.tiff", label, annotation, "true"])
    return root


def _prepare(site: Path, out: Path, *extra: str) -> int:
    argv = ["prepare", "--manifest", str(site / "slides.csv"), "--out", str(out)]
    argv += ["--encoder", "tiny_cnn", "--tissue-preset", "biopsy", "--no-qc", *extra]
    return main(argv)


def _status(out: Path, slide_id: str) -> dict[str, Any]:
    return json.loads((out / "status" / f"{slide_id}.json").read_text())


def _index(out: Path) -> dict[str, dict[str, str]]:
    with (out / "prepared.csv").open() as fh:
        return {row["slide_id"]: row for row in csv.DictReader(fh)}


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # rich would wrap the reasons at 80 columns


def test_a_tumour_slide_whose_annotation_has_no_tumour_region_fails_by_default(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _prepare(site, out) == EXIT_PARTIAL
    text = capsys.readouterr().out
    stroma = _status(out, "tumour_stroma")
    assert stroma["state"] == "failed" and stroma["stage"] == "annotation"
    assert stroma["reason"] == (
        f"annotation {site / 'stroma.geojson'}: no tumour region on a tumour slide: classes "
        'found "Stroma" (3), unclassified (1); tumour classes are Tumor, Tumour, Carcinoma, '
        "Metastasis, metastases, _0, _1 (set [annotation] tumour_classes or --tumour-classes; "
        "or --on-no-tumour-region slide_label_only to prepare it with its slide label only)"
    )
    assert f"failed tumour_stroma (at annotation): {stroma['reason']}" in text
    # the failed slide's status holds what its annotation did hold, as a done slide's does
    assert stroma["annotation"]["tumour_regions"] == 0
    assert stroma["annotation"]["classes_found"]["Stroma"] == 3
    assert stroma["annotation"]["patch_labels"] is False
    assert stroma["annotation"]["file"] == "stroma.geojson"
    empty = _status(out, "tumour_empty")
    assert empty["state"] == "failed"
    assert "no tumour region on a tumour slide: the file holds no outline" in empty["reason"]
    assert not (out / "features" / "tiny_cnn" / "tumour_stroma.h5").exists()
    # A normal slide whose outlines hold no tumour is what one expects: every patch normal.
    normal = _status(out, "normal_stroma")
    assert normal["state"] == "done" and normal["has_patch_labels"] is True
    bag = read_feature_bag(out / "features" / "tiny_cnn" / "normal_stroma.h5")
    assert bag.patch_labels is not None and (bag.patch_labels == 0).all()
    assert "2 slide(s) failed" in text


def test_a_point_beside_a_tumour_polygon_is_reported_and_the_polygon_kept(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    _prepare(site, out)
    text = capsys.readouterr().out
    status = _status(out, "tumour_point")
    assert status["state"] == "done" and status["has_patch_labels"] is True
    assert status["annotation"] == {
        "file": "point.geojson",
        "tumour_regions": 1,
        "exclusion_regions": 0,
        "classes_found": {"Tumor": 2},
        "unknown_classes": [],
        "ignored_geometries": {"Point": 1},
        "patch_labels": True,
        "note": "annotation point.geojson: ignored (no area): 1 Point",
    }
    assert status["tumour_patches"] == 4  # the 512 px square covers 4 whole patches
    assert "annotation point.geojson: ignored (no area): 1 Point" in text
    bag = read_feature_bag(out / "features" / "tiny_cnn" / "tumour_point.h5")
    assert bag.patch_labels is not None and int((bag.patch_labels == 1).sum()) == 4


def test_slide_label_only_keeps_the_slide_without_patch_labels_and_says_so(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _prepare(site, out, "--on-no-tumour-region", "slide_label_only") == EXIT_OK
    text = capsys.readouterr().out
    for slide_id in ("tumour_stroma", "tumour_empty"):
        status = _status(out, slide_id)
        assert status["state"] == "done" and status["has_patch_labels"] is False
        assert status["annotation"]["patch_labels"] is False
        assert status["reason"].startswith("slide label only, no patch labels: annotation ")
        bag = read_feature_bag(out / "features" / "tiny_cnn" / f"{slide_id}.h5")
        assert bag.patch_labels is None and bag.attrs["has_patch_labels"] is False
        assert _index(out)[slide_id]["has_patch_labels"] == "false"
    assert _status(out, "tumour_stroma")["annotation"]["classes_found"] == {
        "Stroma": 3,
        "Unclassified": 1,
    }
    assert (
        "2 slide(s) prepared with their slide label only (their annotation has no tumour "
        "region): tumour_stroma, tumour_empty" in text
    )
    site_json = json.loads((out / "site.json").read_text())
    assert site_json["slides"]["with_patch_labels"] == 2  # tumour_point, normal_stroma


@pytest.mark.slow
def test_tumour_classes_option_and_toml_setting(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stroma declared tumour (on the command line or in [annotation]) labels those outlines."""
    out = tmp_path / "cli"
    _prepare(site, out, "--tumour-classes", "tumor, STROMA")
    capsys.readouterr()
    assert _status(out, "tumour_stroma")["state"] == "done"
    assert _status(out, "tumour_stroma")["annotation"]["tumour_regions"] == 3
    config = tmp_path / "prepare.toml"
    config.write_text('[annotation]\ntumour_classes = ["Stroma"]\n')
    out = tmp_path / "toml"
    _prepare(site, out, "--config", str(config))
    assert _status(out, "tumour_stroma")["annotation"]["tumour_regions"] == 3
    assert _status(out, "normal_stroma")["annotation"]["unknown_classes"] == []
    # With only Stroma as tumour, QuPath's "Tumor" is an unknown class: its slide fails.
    point = _status(out, "tumour_point")
    assert point["state"] == "failed"
    assert 'classes found "Tumor" (2, unknown); tumour classes are Stroma (set' in point["reason"]
