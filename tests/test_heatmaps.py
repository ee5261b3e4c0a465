"""Heatmaps: the per-patch painting against hand-made grids, then real slides end to end.

The pure functions (percentiles, top-k, rasterisation, blending) are checked against values
worked out by hand. The end-to-end part (slow: ~15 s of
fixture) generates four small slides, prepares them with the ``tiny_cnn`` encoder, trains a
tiny model with ``fedpath local train`` and draws heatmaps of them, including one whose slide
file has gone missing.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from matplotlib import colormaps

from fedpath.client.config import AnnotationConfig, EmbeddingConfig, PrepareConfig, TissueConfig
from fedpath.client.prepare.pipeline import prepare_site
from fedpath.client.training.evaluate import load_checkpoint
from fedpath.client.training.heatmap_maps import SlideMaps, attention_percentiles, top_k_indices
from fedpath.client.training.heatmap_render import (
    HeatmapConfig,
    HeatmapPicture,
    blend_overlay,
    figure_size_px,
    rasterise_patches,
    render_heatmap,
)
from fedpath.client.training.heatmaps import (
    HeatmapRecord,
    SlideSource,
    annotation_settings_of,
    outline_rings,
    write_heatmaps,
)
from fedpath.client.training.site_index import BagEntry, load_site_index
from fedpath.client.wsi.qc import slide_thumbnail
from fedpath.client.wsi.reader import WsiReader
from fedpath.common.errors import FedpathError
from fedpath.common.featurebag import FeatureBagWriter
from fedpath.common.mil.config import ModelConfig
from fedpath.common.mil.models import build_model
from fedpath.deploy.cli import main
from fedpath.synthetic.slides import SynthSlide, SynthSlideConfig, generate_slide

LABELS = ("normal", "tumour")
SMALL = HeatmapConfig(top_k=2, thumbnail_side=256, width_px=900)
"""Small pictures keep the library tests quick; the CLI tests draw the default size."""

# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def test_percentiles_are_rank_over_n_with_shared_ties() -> None:
    pct = attention_percentiles(np.array([0.1, 0.4, 0.2, 0.3]))
    np.testing.assert_allclose(pct, [0.25, 1.0, 0.5, 0.75])
    # Two equal values share the mean of ranks 2 and 3; the largest is still 1.
    np.testing.assert_allclose(
        attention_percentiles(np.array([0.5, 0.2, 0.2, 0.9])), [0.75, 0.375, 0.375, 1.0]
    )
    with pytest.raises(ValueError):
        attention_percentiles(np.array([]))
    with pytest.raises(ValueError):
        attention_percentiles(np.array([0.1, np.nan]))


def test_top_k_is_most_attended_first_and_clipped_to_n() -> None:
    attention = np.array([0.1, 0.5, 0.05, 0.3, 0.05])
    np.testing.assert_array_equal(top_k_indices(attention, 3), [1, 3, 0])
    np.testing.assert_array_equal(top_k_indices(attention, 10), [1, 3, 0, 2, 4])
    assert top_k_indices(attention, 0).size == 0


def test_rasterise_paints_each_footprint_and_leaves_the_rest_empty() -> None:
    # Patches of 4 level-0 px on a thumbnail at 2 level-0 px per pixel: 2×2 pixels each.
    coords = np.array([[0, 0], [4, 0], [4, 4]])
    grid = rasterise_patches(np.array([1.0, 2.0, 3.0]), coords, 4, (2.0, 2.0), (5, 6))
    expected = np.full((5, 6), np.nan)
    expected[0:2, 0:2] = 1.0
    expected[0:2, 2:4] = 2.0
    expected[2:4, 2:4] = 3.0
    np.testing.assert_array_equal(grid, expected)


def test_rasterise_clips_to_the_picture_and_keeps_subpixel_patches() -> None:
    # A patch half outside the thumbnail is clipped; one smaller than a pixel paints a pixel.
    grid = rasterise_patches(np.array([7.0]), np.array([[8, 8]]), 8, (2.0, 2.0), (5, 5))
    assert np.isnan(grid[:4, :]).all() and np.isnan(grid[:, :4]).all()
    assert grid[4, 4] == 7.0
    tiny = rasterise_patches(np.array([5.0]), np.array([[10, 20]]), 2, (16.0, 16.0), (4, 4))
    assert np.count_nonzero(np.isfinite(tiny)) == 1 and tiny[1, 1] == 5.0


def test_rasterise_averages_overlapping_patches() -> None:
    # Two 4-px patches overlapping by 2 px (step 2) at 1 level-0 px per pixel.
    coords = np.array([[0, 0], [2, 0]])
    grid = rasterise_patches(np.array([1.0, 3.0]), coords, 4, (1.0, 1.0), (4, 6))
    np.testing.assert_array_equal(grid[0], [1.0, 1.0, 2.0, 2.0, 3.0, 3.0])


def test_painted_percentiles_are_highest_where_attention_is() -> None:
    """On a 4×3 grid of 8-px patches the painted map orders pixels like the attention."""
    rng = np.random.default_rng(3)
    xs, ys = np.meshgrid(np.arange(4) * 8, np.arange(3) * 8)
    coords = np.column_stack((xs.ravel(), ys.ravel()))
    attention = rng.dirichlet(np.ones(len(coords)))
    grid = rasterise_patches(attention_percentiles(attention), coords, 8, (4.0, 4.0), (6, 8))
    # Each patch is a 2×2 block of the grid; read each back at its top-left pixel.
    painted = np.array([grid[y // 4, x // 4] for x, y in coords])
    assert np.array_equal(np.argsort(painted), np.argsort(attention))
    best = int(np.argmax(attention))
    x, y = coords[best] // 4
    np.testing.assert_allclose(grid[y : y + 2, x : x + 2], 1.0)  # difference-array round-off
    assert np.nanmax(grid) == pytest.approx(1.0)
    assert np.nanmin(grid) == pytest.approx(1 / len(coords))


def test_blend_keeps_the_slide_where_there_are_no_patches() -> None:
    thumbnail = np.full((2, 2, 3), 200, dtype=np.uint8)
    grid = np.array([[np.nan, 0.0], [1.0, np.nan]])
    out = blend_overlay(thumbnail, grid, colormaps["RdBu_r"], 0.5, 0.0, 1.0)
    assert (out[0, 0] == 200).all() and (out[1, 1] == 200).all()
    red = np.asarray(colormaps["RdBu_r"](1.0)[:3]) * 255
    np.testing.assert_allclose(out[1, 0], np.rint(0.5 * 200 + 0.5 * red), atol=1)
    assert out[0, 1, 2] > out[0, 1, 0]  # probability 0 is blue


def _picture(top: int, patch_labels: bool = True) -> HeatmapPicture:
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(6) * 64, np.arange(4) * 64)
    coords = np.column_stack((xs.ravel(), ys.ravel()))
    attention = rng.dirichlet(np.ones(len(coords)))
    maps = SlideMaps(
        probs=np.array([0.2, 0.8]),
        attention=attention,
        branch=0,
        n_branches=1,
        percentile=attention_percentiles(attention),
        tumour_prob=rng.uniform(size=len(coords)),
        instance_trained=True,
    )
    order = top_k_indices(attention, top)
    return HeatmapPicture(
        slide_id="slide-1",
        labels=LABELS,
        label=1,
        maps=maps,
        thumbnail=np.full((70, 100, 3), 230, dtype=np.uint8),
        downsample=(4.0, 4.0),
        coords=coords,
        patch_size_level0=64,
        outline=(np.array([[10.0, 10.0], [200.0, 10.0], [200.0, 150.0]]),),
        top=order,
        top_images=tuple(np.full((32, 32, 3), 128, dtype=np.uint8) for _ in order),
        patch_labels=np.zeros(len(coords), dtype=np.int8) if patch_labels else None,
    )


@pytest.mark.slow
@pytest.mark.parametrize("top", [0, 3, 8])
def test_render_has_the_announced_size(top: int) -> None:
    cfg = HeatmapConfig(top_k=top, width_px=1200)
    picture = _picture(top)
    rgb = render_heatmap(picture, cfg)
    width, height = figure_size_px(picture.thumbnail.shape, top, cfg)
    assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8
    assert rgb.std() > 10  # something was drawn


def test_missing_slide_file_is_reported_without_stopping(tmp_path: Path) -> None:
    """Fast variant on a hand-written bag: the slide file is gone, the record says so."""
    coords = np.array([[0, 0], [256, 0]])
    bag = tmp_path / "features" / "s1.h5"
    attrs = {
        "encoder": "test",
        "encoder_sha256": "0" * 64,
        "feature_dim": 4,
        "patch_size_px": 256,
        "patch_size_level0": 256,
        "target_mpp": 0.5,
        "config_sha256": "1" * 64,
        "slide_id": "s1",
    }
    with FeatureBagWriter(bag, coords=coords, feature_dim=4, attrs=attrs) as writer:
        writer.write(np.ones((2, 4), dtype=np.float32))
    entry = BagEntry("s1", 1, bag, "test", None, False, None, 2)
    model = build_model(ModelConfig(feature_dim=4, hidden_dim=8))
    gone = SlideSource("s1", tmp_path / "slides" / "s1.tiff")
    seen: list[HeatmapRecord] = []
    records = write_heatmaps(
        model, [entry, entry], {"s1": gone}, tmp_path / "out", LABELS, SMALL, on_slide=seen.append
    )
    assert seen == records and len(records) == 2
    assert records[0].path is None and not records[0].ok
    assert records[0].error is not None and records[0].error.startswith("s1: file not found")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Real slides, prepared and trained on
# --------------------------------------------------------------------------------------------

TINY = PrepareConfig(
    embedding=EmbeddingConfig(encoder="tiny_cnn", batch_size=32),
    tissue=TissueConfig.preset("biopsy"),
)
TRAIN_TOML = """
[model]
hidden_dim = 16
dropout = 0.0

[train]
min_epochs = 0
"""
# (slide id, tumour fraction, split); tumour slides' outlines go into the manifest.
SLIDES = (
    ("t0", 0.35, "train"),
    ("n0", 0.0, "train"),
    ("t1", 0.4, "test"),
    ("n1", 0.0, "test"),
)


def _write_manifest(root: Path, slides: dict[str, SynthSlide], path: Path) -> None:
    columns = ["slide_id", "path", "label", "annotation", "annotation_complete", "split"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        for slide_id, _, split in SLIDES:
            slide = slides[slide_id]
            row = {
                "slide_id": slide_id,
                "path": str(slide.slide_path.relative_to(root)),
                "label": slide.label,
                "split": split,
            }
            if slide.geojson_path is not None:
                row["annotation"] = str(slide.geojson_path.relative_to(root))
                row["annotation_complete"] = "true"
            writer.writerow(row)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A prepared four-slide site and a run trained on it for two epochs."""
    root = tmp_path_factory.mktemp("slides")
    slides = {
        slide_id: generate_slide(
            root,
            slide_id,
            SynthSlideConfig(width_px=1536, height_px=1280, tumour_fraction=fraction),
            seed,
        )
        for seed, (slide_id, fraction, _) in enumerate(SLIDES)
    }
    manifest = root / "slides.csv"
    _write_manifest(root, slides, manifest)
    data = tmp_path_factory.mktemp("prepared")
    summary = prepare_site(manifest, data, TINY)
    assert [r.state for r in summary.records] == ["done"] * len(SLIDES), summary.records
    run = tmp_path_factory.mktemp("run") / "run"
    (root / "train.toml").write_text(TRAIN_TOML, encoding="utf-8")
    argv = ["local", "train", "--data", str(data), "--out", str(run), "--epochs", "2"]
    assert main([*argv, "--config", str(root / "train.toml")]) == 0
    return {"root": root, "manifest": manifest, "data": data, "run": run}


def _sources(trained: dict[str, Path], missing: str | None = None) -> dict[str, SlideSource]:
    root, data = trained["root"], trained["data"]
    sources = {}
    for slide_id, _, _ in SLIDES:
        path = root / "slides" / f"{slide_id}.tiff"
        if slide_id == missing:
            path = root / "moved" / f"{slide_id}.tiff"
        annotation = root / "annotations" / f"{slide_id}.geojson"
        sources[slide_id] = SlideSource(
            slide_id,
            path,
            annotation if annotation.is_file() else None,
            coords_file=data / "patches" / f"{slide_id}.h5",
        )
    return sources


def _png_shape(path: Path) -> tuple[int, ...]:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"{path} is not a readable image"
    return tuple(image.shape)


@pytest.mark.slow
@pytest.mark.integration
def test_pngs_are_valid_images_of_the_expected_size(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    model, model_cfg = load_checkpoint(trained["run"] / "model.pt")
    entries = load_site_index(trained["data"], LABELS)
    sources = _sources(trained)
    assert sources["t1"].annotation is not None  # the outline path is exercised
    cfg = SMALL.model_copy(update={"top_k": 4})
    seen: list[str] = []
    records = write_heatmaps(
        model,
        entries,
        sources,
        tmp_path,
        LABELS,
        cfg,
        feature_dim=model_cfg.feature_dim,
        on_slide=lambda r: seen.append(r.slide_id),
    )
    assert seen == [e.slide_id for e in entries]
    assert all(r.ok and not r.warnings for r in records), records
    for record, entry in zip(records, entries, strict=True):
        assert record.path == tmp_path / f"{entry.slide_id}.png"
        assert sum(record.probs) == pytest.approx(1.0)
        with WsiReader(sources[entry.slide_id].path) as reader:
            thumbnail, _ = slide_thumbnail(reader, cfg.thumbnail_side)
        top = min(cfg.top_k, entry.num_patches)
        width, height = figure_size_px(thumbnail.shape, top, cfg)
        assert _png_shape(record.path) == (height, width, 3)
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".png"]  # no temporaries left


@pytest.mark.slow
@pytest.mark.integration
def test_a_missing_slide_is_reported_and_skipped(trained: dict[str, Path], tmp_path: Path) -> None:
    model, model_cfg = load_checkpoint(trained["run"] / "model.pt")
    entries = load_site_index(trained["data"], LABELS)
    sources = _sources(trained, missing="t1")
    del sources["n1"]  # not in the manifest at all
    records = write_heatmaps(
        model,
        entries,
        sources,
        tmp_path,
        LABELS,
        SMALL,
        feature_dim=model_cfg.feature_dim,
    )
    by_id = {r.slide_id: r for r in records}
    assert by_id["t1"].error is not None and "t1" in by_id["t1"].error
    assert "file not found" in by_id["t1"].error
    assert by_id["n1"].error is not None and "not in the manifest" in by_id["n1"].error
    assert by_id["t0"].ok and by_id["n0"].ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n0.png", "t0.png"]


@pytest.mark.slow
@pytest.mark.integration
def test_cli_draws_the_test_split(trained: dict[str, Path]) -> None:
    data, run, manifest = trained["data"], trained["run"], trained["manifest"]
    argv = ["local", "heatmaps", "--data", str(data), "--run", str(run)]
    assert main([*argv, "--manifest", str(manifest), "--top-k", "3"]) == 0
    assert sorted(p.name for p in (run / "heatmaps").iterdir()) == ["n1.png", "t1.png"]
    assert _png_shape(run / "heatmaps" / "t1.png")[1] == HeatmapConfig().width_px


@pytest.mark.slow
@pytest.mark.integration
def test_cli_exits_1_naming_the_slide_that_failed(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "copy"
    shutil.copytree(trained["root"], root)
    (root / "slides" / "n0.tiff").unlink()
    argv = ["local", "heatmaps", "--data", str(trained["data"]), "--run", str(trained["run"])]
    argv += [
        "--manifest",
        str(root / "slides.csv"),
        "--slides",
        "t0,n0",
        "--out",
        str(tmp_path / "hm"),
    ]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "n0 skipped" in out and "file not found" in out
    assert [p.name for p in (tmp_path / "hm").iterdir()] == ["t0.png"]


@pytest.mark.slow
@pytest.mark.integration
def test_cli_summary_names_the_heatmaps_drawn_with_a_warning(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken annotation file gave a warning line that scrolls past among many slides, then
    "wrote 2 heatmap(s)" as if all were whole; the summary now names the slides concerned."""
    root = tmp_path / "copy"
    shutil.copytree(trained["root"], root)
    (root / "annotations" / "t1.geojson").write_text("{broken", encoding="utf-8")
    argv = ["local", "heatmaps", "--data", str(trained["data"]), "--run", str(trained["run"])]
    argv += ["--manifest", str(root / "slides.csv"), "--out", str(tmp_path / "hm")]
    assert main(argv) == 0  # the maps are drawn: only the outline is missing
    out = " ".join(capsys.readouterr().out.split())
    assert "t1: outline not drawn: annotation" in out
    assert (
        "wrote 2 heatmap(s) to " + str(tmp_path / "hm") + " 1 of them drawn with a warning "
        "(above; the outline of a broken annotation file is left out): t1"
    ) in out


@pytest.mark.slow
@pytest.mark.integration
def test_cli_refuses_unknown_slide_ids(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["local", "heatmaps", "--data", str(trained["data"]), "--run", str(trained["run"])]
    argv += ["--manifest", str(trained["manifest"]), "--out", str(tmp_path / "hm")]
    assert main([*argv, "--slides", "t0,nope"]) == 2
    assert "nope" in capsys.readouterr().out
    # t0 is a training slide: asking for it within the test split says where to look.
    assert main([*argv, "--split", "test", "--slides", "t0"]) == 2
    assert "--split all" in capsys.readouterr().out
    assert not (tmp_path / "hm").exists()


def _one_square_geojson(path: Path, class_name: str) -> Path:
    square = [[[100, 100], [400, 100], [400, 400], [100, 400], [100, 100]]]
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": square},
        "properties": {"classification": {"name": class_name}},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


def test_outline_uses_the_tumour_classes_the_bag_was_labelled_with(tmp_path: Path) -> None:
    """A site whose tumour class is "Tumorgewebe" saw no outline in its heatmaps: they were
    drawn with the default classes, not with those that labelled the patches."""
    annotation = _one_square_geojson(tmp_path / "t.geojson", "Tumorgewebe")
    site = AnnotationConfig(tumour_classes=("Tumorgewebe",))
    attrs = {"annotation_settings": site.model_dump_json()}
    assert annotation_settings_of(attrs) == site
    rings = outline_rings(annotation, (1000, 1000), annotation_settings_of(attrs))
    assert len(rings) == 1 and rings[0].shape[1] == 2
    # a bag prepared before settings were recorded keeps the defaults (no tumour here)
    assert annotation_settings_of({}) == AnnotationConfig()
    assert outline_rings(annotation, (1000, 1000), annotation_settings_of({})) == []
    with pytest.raises(FedpathError, match="annotation settings are unreadable"):
        annotation_settings_of({"annotation_settings": '{"tumour_classes": 3}'})


@pytest.mark.slow
@pytest.mark.integration
def test_prepared_bags_record_their_annotation_settings(trained: dict[str, Path]) -> None:
    with h5py.File(trained["data"] / "features" / "tiny_cnn" / "t1.h5", "r") as fh:
        attrs = dict(fh.attrs)
    assert annotation_settings_of(attrs) == TINY.annotation
    with h5py.File(trained["data"] / "features" / "tiny_cnn" / "n1.h5", "r") as fh:
        assert "annotation_settings" not in fh.attrs  # no annotation, nothing to record
