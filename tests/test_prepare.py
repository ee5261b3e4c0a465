"""End-to-end preparation on generated slides: real TIFFs, real OpenSlide, real HDF5.

Checks the outputs against the generator's ground truth, resume, and that bad slides are
reported and skipped without leaving partial files.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from fedpath.client.config import EmbeddingConfig, PrepareConfig, TissueConfig
from fedpath.client.prepare.pipeline import prepare_site
from fedpath.common.atomic import TMP_PREFIX
from fedpath.common.featurebag import read_feature_bag
from fedpath.synthetic.slides import SynthSlide, SynthSlideConfig, generate_slide
from tests.tiffs import write_pyramid

pytestmark = pytest.mark.integration

# Generated slides are biopsy-sized: CLAM's default a_t would drop them as debris.
TINY = PrepareConfig(
    embedding=EmbeddingConfig(encoder="tiny_cnn", batch_size=32),
    tissue=TissueConfig.preset("biopsy"),
)


def _slide(root: Path, slide_id: str, seed: int, **kwargs: object) -> SynthSlide:
    cfg = SynthSlideConfig(width_px=3072, height_px=2560, **kwargs)  # type: ignore[arg-type]
    return generate_slide(root, slide_id, cfg, seed)


def _manifest(root: Path, rows: list[dict[str, str]]) -> Path:
    columns = ["slide_id", "path", "label", "annotation", "annotation_complete", "mpp"]
    path = root / "slides.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def _row(slide: SynthSlide, root: Path) -> dict[str, str]:
    row = {
        "slide_id": slide.slide_id,
        "path": str(slide.slide_path.relative_to(root)),
        "label": slide.label,
    }
    if slide.geojson_path is not None:
        row["annotation"] = str(slide.geojson_path.relative_to(root))
        row["annotation_complete"] = str(slide.annotation_complete).lower()
    return row


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SynthSlide]:
    root = tmp_path_factory.mktemp("site")
    return {
        "tumour_full": _slide(root, "tumour_full", 1, tumour_fraction=0.35),
        "tumour_partial": _slide(
            root,
            "tumour_partial",
            2,
            tumour_fraction=0.4,
            annotated_region_fraction=0.5,
            tumour_foci=3,
        ),
        "normal": _slide(root, "normal", 3, tumour_fraction=0.0),
    }


@pytest.fixture(scope="module")
def prepared(site: dict[str, SynthSlide], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = site["normal"].slide_path.parents[1]
    manifest = _manifest(root, [_row(s, root) for s in site.values()])
    out = tmp_path_factory.mktemp("prepared")
    summary = prepare_site(manifest, out, TINY)
    assert [r.state for r in summary.records] == ["done", "done", "done"], summary.records
    return out


def _mask_fraction(mask_path: Path, downsample: int, coords: np.ndarray, size: int) -> np.ndarray:
    """Share of each patch footprint covered by a ground-truth mask (mask resolution)."""
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) > 127
    cell = size // downsample
    out = np.empty(len(coords))
    for i, (x, y) in enumerate(coords):
        row, col = y // downsample, x // downsample
        out[i] = mask[row : row + cell, col : col + cell].mean()
    return out


def test_outputs_and_provenance(prepared: Path, site: dict[str, SynthSlide]) -> None:
    site_json = json.loads((prepared / "site.json").read_text())
    assert site_json["encoder"] == "tiny_cnn" and site_json["feature_dim"] == 64
    assert site_json["slides"] == {
        "usable": 3,
        "failed": 0,
        "by_label": {"normal": 1, "tumour": 2},
        "with_patch_labels": 2,
    }
    assert "tumour_full" not in json.dumps(site_json)  # no slide ids leave in site.json
    for slide_id in site:
        bag = read_feature_bag(prepared / "features" / "tiny_cnn" / f"{slide_id}.h5")
        assert bag.attrs["encoder_sha256"] == site_json["encoder_sha256"]
        assert bag.attrs["target_mpp"] == 0.5 and bag.attrs["patch_size_px"] == 256
        assert len(bag.attrs["config_sha256"]) == 64
        with h5py.File(prepared / "patches" / f"{slide_id}.h5") as fh:
            np.testing.assert_array_equal(fh["coords"][()], bag.coords)
            assert fh["coords"].attrs["patch_level"] == 0
            assert fh["coords"].attrs["patch_size_level0"] == 256
        assert (prepared / "qc" / f"{slide_id}.png").stat().st_size > 1000
        contours = json.loads((prepared / "contours" / f"{slide_id}.geojson").read_text())
        assert contours["type"] == "FeatureCollection" and contours["features"]
        status = json.loads((prepared / "status" / f"{slide_id}.json").read_text())
        assert status["state"] == "done" and status["num_patches"] == bag.num_patches
    assert read_feature_bag(prepared / "features/tiny_cnn/normal.h5").patch_labels is None
    with (prepared / "prepared.csv").open() as fh:
        index = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in index] == list(site)
    assert index[0]["has_patch_labels"] == "true" and index[2]["has_patch_labels"] == "false"
    assert not list(prepared.rglob(f"{TMP_PREFIX}*"))


def test_patches_agree_with_ground_truth(prepared: Path, site: dict[str, SynthSlide]) -> None:
    for slide in site.values():
        bag = read_feature_bag(prepared / "features" / "tiny_cnn" / f"{slide.slide_id}.h5")
        tissue = _mask_fraction(slide.tissue_mask_path, slide.mask_downsample, bag.coords, 256)
        # Kept patches are on tissue, and nearly all mostly-tissue patches were kept.
        # The 64x mask with closing rounds concave edges: a few edge patches are mostly glass.
        assert (tissue >= 0.2).mean() >= 0.95, slide.slide_id
        assert slide.tumour_mask_path is not None
        if bag.patch_labels is None:
            continue
        tumour = _mask_fraction(slide.tumour_mask_path, slide.mask_downsample, bag.coords, 256)
        truth = (tumour >= 0.5).astype(np.int8)
        known = bag.patch_labels != -1
        agreement = (bag.patch_labels[known] == truth[known]).mean()
        assert agreement >= 0.98, (slide.slide_id, agreement)
        if slide.annotation_complete:
            # Only patches straddling the tumour border (0 < fraction < 0.5) stay unknown.
            assert known.mean() >= 0.8
            assert ((tumour[~known] > 0) & (tumour[~known] < 0.6)).all()
        else:
            assert (~known).any() and (bag.patch_labels == 0).sum() == 0
        assert (bag.patch_labels == 1).sum() > 0


@pytest.mark.slow
def test_resume_skips_finished_slides_and_redoes_changed_ones(
    site: dict[str, SynthSlide], tmp_path: Path
) -> None:
    root = site["normal"].slide_path.parents[1]
    manifest = _manifest(root, [_row(site["tumour_full"], root), _row(site["normal"], root)])
    out = tmp_path / "out"
    first = prepare_site(manifest, out, TINY)
    assert [r.state for r in first.records] == ["done", "done"]
    bag_path = out / "features" / "tiny_cnn" / "normal.h5"
    stamp = bag_path.stat().st_mtime_ns
    second = prepare_site(manifest, out, TINY)
    assert [r.state for r in second.records] == ["reused", "reused"]
    assert second.records[1].num_patches == first.records[1].num_patches
    assert bag_path.stat().st_mtime_ns == stamp
    stricter = TINY.tissue.model_copy(update={"min_tissue_fraction": 0.5})
    changed = TINY.model_copy(update={"tissue": stricter})
    third = prepare_site(manifest, out, changed)
    assert [r.state for r in third.records] == ["done", "done"]
    assert third.records[1].num_patches <= first.records[1].num_patches


def _blank_tiff(path: Path) -> None:
    write_pyramid(
        path,
        np.full((1024, 1024, 3), 245, np.uint8),
        levels=1,
        compression="jpeg",
        description="Aperio Image Library v10.0.0\n1024x1024 |AppMag = 20|MPP = 0.5",
    )


def _tiff_with_corrupt_tile(path: Path) -> None:
    """A slide that opens (first and last tiles fine) but has one undecodable tile inside."""
    import tifffile

    rng = np.random.default_rng(0)
    image = np.full((1024, 1024, 3), 240, np.uint8)
    image[128:900, 100:950] = (200, 80, 170)
    image = (image + rng.integers(0, 20, image.shape)).astype(np.uint8)
    write_pyramid(
        path,
        image,
        levels=2,
        compression="jpeg",
        description="Aperio Image Library v10.0.0\n1024x1024 |AppMag = 20|MPP = 0.5",
    )
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(count)
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_bad_slides_are_reported_skipped_and_leave_nothing(
    site: dict[str, SynthSlide], tmp_path: Path
) -> None:
    root = site["normal"].slide_path.parents[1]
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "empty.svs").write_bytes(b"")
    (bad / "text.svs").write_text("this is not a slide\n")
    data = site["normal"].slide_path.read_bytes()
    (bad / "truncated.tiff").write_bytes(data[: len(data) // 3])
    _blank_tiff(bad / "blank.tiff")
    _tiff_with_corrupt_tile(bad / "corrupt_tile.tiff")
    no_mpp = _slide(bad, "no_mpp", 5, write_mpp=False, write_objective=False)
    (bad / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    rows = [
        {"slide_id": "empty", "path": "bad/empty.svs", "label": "normal"},
        {"slide_id": "text", "path": "bad/text.svs", "label": "normal"},
        {"slide_id": "truncated", "path": "bad/truncated.tiff", "label": "normal"},
        {"slide_id": "blank", "path": "bad/blank.tiff", "label": "normal"},
        {"slide_id": "corrupt_tile", "path": "bad/corrupt_tile.tiff", "label": "normal"},
        {"slide_id": "no_mpp", "path": str(no_mpp.slide_path.relative_to(root)), "label": "normal"},
        {
            "slide_id": "no_mpp_override",
            "path": str(no_mpp.slide_path.relative_to(root)),
            "label": "normal",
            "mpp": "0.5",
        },
        {
            "slide_id": "broken_annotation",
            "path": str(site["tumour_full"].slide_path.relative_to(root)),
            "label": "tumour",
            "annotation": "bad/broken.geojson",
            "annotation_complete": "true",
        },
        _row(site["normal"], root),
    ]
    out = tmp_path / "out"
    summary = prepare_site(_manifest(root, rows), out, TINY)
    states = {r.slide_id: (r.state, r.stage, r.reason or "") for r in summary.records}
    assert states["normal"][0] == "done"
    assert states["no_mpp_override"][0] == "done"
    assert summary.records[6].mpp_source == "override"
    expected = {
        "empty": ("open", "empty"),
        "text": ("open", ""),
        "truncated": ("open", ""),
        "blank": ("tissue", "no tissue found"),
        "corrupt_tile": ("embedding", "cannot decode region"),
        "no_mpp": ("open", "mpp"),
        "broken_annotation": ("annotation", ""),
    }
    for slide_id, (stage, fragment) in expected.items():
        state, got_stage, reason = states[slide_id]
        assert state == "failed", slide_id
        assert got_stage == stage, (slide_id, got_stage, reason)
        assert fragment.lower() in reason.lower(), (slide_id, reason)
        assert reason, slide_id
        for sub in ("features/tiny_cnn", "patches", "qc", "contours"):
            assert not list((out / sub).glob(f"{slide_id}.*")), (slide_id, sub)
        status = json.loads((out / "status" / f"{slide_id}.json").read_text())
        assert status["state"] == "failed" and status["reason"] == reason
    site_json = json.loads((out / "site.json").read_text())
    assert site_json["slides"]["usable"] == 2 and site_json["slides"]["failed"] == 7
    assert not list(out.rglob(f"{TMP_PREFIX}*"))


SHARED_SLIDES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "slides"


@pytest.mark.slow
def test_real_slides_with_and_without_mpp(tmp_path: Path) -> None:
    """CMU-1-Small-Region declares 0.499 µm/px; the TCGA frozen section declares nothing."""
    if not SHARED_SLIDES.is_dir():
        pytest.skip(f"real slides not available at {SHARED_SLIDES}")
    rows = [
        {"slide_id": "cmu", "path": "cmu-1-small-region.svs", "label": "normal"},
        {"slide_id": "tcga", "path": "tcga-cr-7395-01a-01-ts1.svs", "label": "tumour"},
    ]
    sheet = tmp_path / "sheet"
    sheet.mkdir()
    manifest = sheet / "slides.csv"
    header = "slide_id,path,label,mpp\n"
    body = "".join(f"{r['slide_id']},{SHARED_SLIDES / r['path']},{r['label']},\n" for r in rows)
    manifest.write_text(header + body)
    # Both are small regions (a few mm² of tissue): CLAM's absolute a_t called them debris;
    # the default tissue settings (relative to the largest piece) must find their tissue.
    cfg = PrepareConfig(embedding=TINY.embedding)
    summary = prepare_site(manifest, tmp_path / "out", cfg, slide_root=SHARED_SLIDES)
    cmu, tcga = summary.records
    assert cmu.state == "done" and cmu.mpp == pytest.approx(0.499) and cmu.mpp_source == "slide"
    assert cmu.num_patches > 20
    assert tcga.state == "failed" and tcga.stage == "open"
    assert "mpp" in (tcga.reason or "").lower()
    # With the override (about 1 µm/px, 10x) it prepares; level 0 is upsampled to 0.5 µm/px.
    manifest.write_text(header + body.replace(f"{rows[1]['label']},\n", "tumour,1.0\n"))
    summary = prepare_site(manifest, tmp_path / "out", cfg, slide_root=SHARED_SLIDES)
    cmu, tcga = summary.records
    assert cmu.state == "reused"
    assert tcga.state == "done" and tcga.mpp_source == "override" and tcga.num_patches > 20
    bag = read_feature_bag(tmp_path / "out" / "features" / "tiny_cnn" / "tcga.h5")
    assert bag.attrs["patch_size_level0"] == 128  # 256 px at 0.5 µm/px = 128 px at 1 µm/px


def test_asap_xml_and_geojson_give_the_same_patch_labels(
    site: dict[str, SynthSlide], prepared: Path, tmp_path: Path
) -> None:
    slide = site["tumour_full"]
    assert slide.asap_xml_path is not None
    root = slide.slide_path.parents[1]
    row = {**_row(slide, root), "annotation": str(slide.asap_xml_path.relative_to(root))}
    summary = prepare_site(_manifest(root, [row]), tmp_path / "xml", TINY)
    assert summary.records[0].state == "done"
    from_xml = read_feature_bag(tmp_path / "xml" / "features" / "tiny_cnn" / "tumour_full.h5")
    from_json = read_feature_bag(prepared / "features" / "tiny_cnn" / "tumour_full.h5")
    assert from_xml.patch_labels is not None and from_json.patch_labels is not None
    np.testing.assert_array_equal(from_xml.patch_labels, from_json.patch_labels)
    assert from_xml.tumour_fraction is not None and from_json.tumour_fraction is not None
    np.testing.assert_allclose(from_xml.tumour_fraction, from_json.tumour_fraction, atol=1e-3)


def test_second_prepare_on_the_same_directory_is_refused(
    site: dict[str, SynthSlide], tmp_path: Path
) -> None:
    from fedpath.common.locking import DirectoryLockedError, exclusive_directory

    root = site["normal"].slide_path.parents[1]
    manifest = _manifest(root, [_row(site["normal"], root)])
    with (
        exclusive_directory(tmp_path / "out", "another prepare"),
        pytest.raises(DirectoryLockedError),
    ):
        prepare_site(manifest, tmp_path / "out", TINY)
    assert not (tmp_path / "out" / "site.json").exists()


@pytest.mark.slow
def test_fedpath_prepare_with_default_settings_finds_tissue_on_a_small_real_region(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 20.5: with every default (only the test encoder chosen), the 2220×2967 px
    CMU-1-Small-Region is prepared, not failed with "no tissue found"."""
    if not SHARED_SLIDES.is_dir():
        pytest.skip(f"real slides not available at {SHARED_SLIDES}")
    from fedpath.deploy.cli import main

    manifest = tmp_path / "slides.csv"
    manifest.write_text(
        f"slide_id,path,label\ncmu,{SHARED_SLIDES / 'cmu-1-small-region.svs'},normal\n"
    )
    argv = ["prepare", "--manifest", str(manifest), "--out", str(tmp_path / "out")]
    code = main([*argv, "--slide-root", str(SHARED_SLIDES), "--encoder", "tiny_cnn"])
    text = capsys.readouterr().out
    assert code == 0, text
    status = json.loads((tmp_path / "out" / "status" / "cmu.json").read_text())
    assert status["state"] == "done" and status["num_patches"] >= 40, status


def test_a_speck_on_empty_glass_fails_as_no_tissue_with_default_settings(tmp_path: Path) -> None:
    """The default relative debris rule would keep the largest component whatever its size:
    a slide of glass with one speck of dust must still fail as empty, saying why."""
    rgb = np.full((2048, 2048, 3), 245, np.uint8)
    rgb[1024:1472, 1024:1472] = (150, 60, 140)  # 0.2 Mpx: patches' worth, yet a speck
    write_pyramid(tmp_path / "speck.tiff", rgb, levels=3)
    rows = [{"slide_id": "speck", "path": "speck.tiff", "label": "normal"}]
    cfg = TINY.model_copy(update={"tissue": TissueConfig()})
    summary = prepare_site(_manifest(tmp_path, rows), tmp_path / "out", cfg)
    (record,) = summary.records
    assert (record.state, record.stage) == ("failed", "tissue")
    assert "each is a speck smaller than 0.26 Mpx at level 0" in (record.reason or "")
