"""``fedpath prepare --patch-only`` and the later run that embeds its patches.

Real generated TIFFs through OpenSlide, real HDF5; the patch-only run goes through the CLI in
its own process so that what it imports (no torch) is what a hospital's run imports.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedpath.client.config import EmbeddingConfig, PrepareConfig, TissueConfig
from fedpath.client.prepare.pipeline import prepare_site
from fedpath.common.featurebag import read_feature_bag
from fedpath.synthetic.slides import SynthSlide, SynthSlideConfig, generate_slide

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TINY = PrepareConfig(
    embedding=EmbeddingConfig(encoder="tiny_cnn", batch_size=32),
    tissue=TissueConfig.preset("biopsy"),
)
PATCH_ONLY = TINY.model_copy(update={"patch_only": True})

# Runs the CLI in this process and reports which heavy modules it loaded on the way.
CLI_PROBE = """
import json, sys
from fedpath.deploy.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
heavy = sorted(m for m in ("torch", "flwr", "opacus", "onnxruntime", "openvino", "matplotlib")
               if m in sys.modules)
print("PROBE " + json.dumps({"rc": rc, "heavy": heavy}))
"""


def run_cli_probe(*argv: str, cwd: Path = ROOT) -> tuple[int, list[str], str]:
    """Run ``fedpath argv`` in a fresh interpreter; (exit code, heavy modules loaded, output)."""
    done = subprocess.run(
        [sys.executable, "-c", CLI_PROBE, *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, f"the CLI did not finish:\n{done.stdout}\n{done.stderr}"
    probe = json.loads(lines[-1][len("PROBE ") :])
    return int(probe["rc"]), list(probe["heavy"]), done.stdout


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, SynthSlide]]:
    root = tmp_path_factory.mktemp("site")
    cfg = SynthSlideConfig(width_px=3072, height_px=2560, tumour_fraction=0.35)
    slides = {
        "tumour": generate_slide(root, "tumour", cfg, 1),
        "normal": generate_slide(
            root, "normal", cfg.model_copy(update={"tumour_fraction": 0.0}), 3
        ),
    }
    rows = [["slide_id", "path", "label", "annotation", "annotation_complete"]]
    for slide in slides.values():
        annotation = slide.geojson_path
        rows.append(
            [
                slide.slide_id,
                str(slide.slide_path.relative_to(root)),
                slide.label,
                str(annotation.relative_to(root)) if annotation else "",
                str(slide.annotation_complete).lower() if annotation else "",
            ]
        )
    with (root / "slides.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root / "slides.csv", slides


@pytest.mark.slow
def test_patch_only_cuts_labels_and_draws_qc_without_torch(
    site: tuple[Path, dict[str, SynthSlide]], tmp_path: Path
) -> None:
    manifest, _ = site
    out = tmp_path / "out"
    rc, heavy, output = run_cli_probe(
        "prepare",
        "--patch-only",
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--tissue-preset",
        "biopsy",
    )
    assert rc == 0, output
    assert "torch" not in heavy and "flwr" not in heavy, heavy
    assert "patch-only: 2 cut, 0 reused, 0 failed" in output
    assert "none embedded" in output and "without --patch-only" in output
    assert not (out / "features").exists() and not (out / "site.json").exists()
    with h5py.File(out / "patches" / "tumour.h5", "r") as fh:
        coords = fh["coords"][()]
        labels = fh["patch_labels"][()]
        assert coords.shape[1] == 2 and coords.shape[0] > 10
        assert labels.shape == (coords.shape[0],) and (labels == 1).any()
        assert fh["tumour_fraction"].shape == (coords.shape[0],)
        assert fh["tissue_fraction"].shape == (coords.shape[0],)
        for key in ("patch_size", "patch_level", "downsample", "target_mpp", "level0_mpp"):
            assert key in fh["coords"].attrs, key  # where CLAM / TRIDENT readers look
        assert fh.attrs["has_patch_labels"]
        assert len(fh.attrs["patches_config_sha256"]) == 64
    with h5py.File(out / "patches" / "normal.h5", "r") as fh:
        assert "patch_labels" not in fh and not fh.attrs["has_patch_labels"]
    for slide_id in ("tumour", "normal"):
        assert (out / "qc" / f"{slide_id}.png").stat().st_size > 0
        assert (out / "contours" / f"{slide_id}.geojson").is_file()
        status = json.loads((out / "status" / f"{slide_id}.json").read_text())
        assert status["state"] == "done" and status["embedded"] is False
    with (out / "patches.csv").open() as fh:
        index = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in index] == ["tumour", "normal"]
    assert index[0]["patches"] == "patches/tumour.h5"
    assert int(index[0]["num_patches"]) == coords.shape[0]
    # Training on it says what is missing and how to get it, not "not a prepared site".
    train = ("local", "train", "--data", str(out), "--out", str(tmp_path / "train"))
    rc, _, output = run_cli_probe(*train)
    assert rc == 2 and "holds patches only" in output and "without --patch-only" in output


@pytest.mark.slow
def test_prepare_embeds_the_patch_only_patches_without_cutting_again(
    site: tuple[Path, dict[str, SynthSlide]], tmp_path: Path
) -> None:
    manifest, _ = site
    out = tmp_path / "out"
    cut = prepare_site(manifest, out, PATCH_ONLY)
    assert [r.state for r in cut.records] == ["done", "done"]
    assert cut.embedded_patches == 0 and cut.patches_cut > 0
    patch_file = out / "patches" / "tumour.h5"
    stamp = patch_file.stat().st_mtime_ns
    again = prepare_site(manifest, out, PATCH_ONLY)
    assert [r.state for r in again.records] == ["reused", "reused"]

    embedded = prepare_site(manifest, out, TINY)
    assert [r.state for r in embedded.records] == ["done", "done"]
    for record in embedded.records:
        assert record.reused == ("patches",), record
        assert "tissue" not in record.seconds and "embedding" in record.seconds
        status = json.loads((out / "status" / f"{record.slide_id}.json").read_text())
        assert status["last_run_reused"] == ["patches"]
        assert status["patches_prepared_at"] is not None
    assert patch_file.stat().st_mtime_ns == stamp
    bag = read_feature_bag(out / "features" / "tiny_cnn" / "tumour.h5")
    with h5py.File(patch_file, "r") as fh:
        np.testing.assert_array_equal(bag.coords, fh["coords"][()])
        np.testing.assert_array_equal(bag.patch_labels, fh["patch_labels"][()])
    assert (out / "site.json").is_file()

    reused = prepare_site(manifest, out, TINY)
    assert [r.state for r in reused.records] == ["reused", "reused"]
    assert reused.records[0].reused == ("patches", "features")


@pytest.mark.slow
def test_changed_patching_settings_cut_the_patches_again(
    site: tuple[Path, dict[str, SynthSlide]], tmp_path: Path
) -> None:
    manifest, _ = site
    out = tmp_path / "out"
    prepare_site(manifest, out, TINY)
    bag_path = out / "features" / "tiny_cnn" / "normal.h5"
    before = read_feature_bag(bag_path).num_patches
    stricter = TINY.tissue.model_copy(update={"min_tissue_fraction": 0.9})
    recut = prepare_site(manifest, out, PATCH_ONLY.model_copy(update={"tissue": stricter}))
    assert [r.state for r in recut.records] == ["done", "done"]
    assert recut.records[1].num_patches < before
    # The bag no longer matches the patch file beside it: embedded again from freshly cut
    # patches under the original settings, never reused next to the stricter patch file.
    redone = prepare_site(manifest, out, TINY)
    assert [r.state for r in redone.records] == ["done", "done"]
    assert redone.records[1].reused == () and redone.records[1].num_patches == before
    status = json.loads((out / "status" / "normal.json").read_text())
    assert "patches were cut again" in status["why_prepared"]
    assert "patching settings" in status["why_patches_cut"]
    with h5py.File(out / "patches" / "normal.h5", "r") as fh:
        assert fh["coords"].shape[0] == before


@pytest.mark.slow
def test_patches_of_another_slide_file_or_an_older_fedpath_are_cut_again(
    site: tuple[Path, dict[str, SynthSlide]], tmp_path: Path
) -> None:
    manifest, slides = site
    # A private copy of the site: the slide file is replaced below.
    root = tmp_path / "site"
    shutil.copytree(manifest.parent, root)
    out = tmp_path / "out"
    prepare_site(root / manifest.name, out, PATCH_ONLY)
    normal = root / slides["normal"].slide_path.relative_to(manifest.parent)
    tumour = root / slides["tumour"].slide_path.relative_to(manifest.parent)
    shutil.copyfile(tumour, normal)  # same name, another scan
    with h5py.File(out / "patches" / "tumour.h5", "a") as fh:
        del fh.attrs["patches_config_sha256"]  # as written before patch files carried it
    embedded = prepare_site(root / manifest.name, out, TINY)
    assert [r.state for r in embedded.records] == ["done", "done"]
    assert all(r.reused == () for r in embedded.records)
    tumour_status = json.loads((out / "status" / "tumour.json").read_text())
    assert "earlier fedpath" in tumour_status["why_patches_cut"]
    normal_status = json.loads((out / "status" / "normal.json").read_text())
    assert "slide file changed" in normal_status["why_patches_cut"]


@pytest.mark.slow
def test_demo_refuses_a_patch_only_config(tmp_path: Path) -> None:
    config = tmp_path / "prepare.toml"
    config.write_text("patch_only = true\n")
    rc, _, output = run_cli_probe("demo", "--config", str(config), "--out", str(tmp_path / "d"))
    assert rc == 2 and "patch_only = true stops before embedding" in output, output
    assert not (tmp_path / "d").exists()
