"""Golden output of the client pipeline on a tiny fixed generated slide (hs2p style).

Any change to synthesis, OpenSlide reading, tissue segmentation or patching that moves a patch
or changes the mask shows up here. If a change is intended, regenerate with
``FEDPATH_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_golden.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fedpath.client.config import PrepareConfig, TissueConfig
from fedpath.client.wsi.patching import patch_grid
from fedpath.client.wsi.reader import WsiReader
from fedpath.client.wsi.resolution import plan_read
from fedpath.client.wsi.tissue import tissue_mask_for_slide
from fedpath.synthetic.slides import SynthSlideConfig, generate_slide

GOLDEN = Path(__file__).parent / "golden" / "tiny_slide.json"
SLIDE = SynthSlideConfig(width_px=2048, height_px=1536, tumour_fraction=0.3)
SEED = 1234


def _pipeline_output(tmp_path: Path) -> dict[str, object]:
    cfg = PrepareConfig(tissue=TissueConfig.preset("biopsy"))
    slide = generate_slide(tmp_path, "golden", SLIDE, SEED)
    with WsiReader(slide.slide_path) as reader:
        info = reader.info
        plan = plan_read(info.mpp, info.level_downsamples, cfg.resolution)
        mask = tissue_mask_for_slide(reader, cfg.tissue)
        grid = patch_grid(
            mask,
            info.dimensions,
            plan.patch_size_level0,
            plan.step_level0,
            cfg.tissue.min_tissue_fraction,
        )
    return {
        "dimensions": list(info.dimensions),
        "level_downsamples": list(info.level_downsamples),
        "mpp": info.mpp,
        "mask_downsample": list(mask.downsample),
        "mask_rows": ["".join("#" if v else "." for v in row) for row in mask.mask],
        "coords": grid.coords.tolist(),
        "tissue_fraction": np.round(grid.tissue_fraction, 4).tolist(),
    }


@pytest.mark.slow
def test_tiny_slide_matches_golden(tmp_path: Path) -> None:
    got = _pipeline_output(tmp_path)
    if os.environ.get("FEDPATH_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing; create it with FEDPATH_UPDATE_GOLDEN=1")
    want = json.loads(GOLDEN.read_text())
    assert got["dimensions"] == want["dimensions"]
    assert got["level_downsamples"] == want["level_downsamples"]
    assert got["mask_rows"] == want["mask_rows"]
    assert got["coords"] == want["coords"]
    np.testing.assert_allclose(got["tissue_fraction"], want["tissue_fraction"], atol=1e-4)
    assert len(want["coords"]) > 10  # the golden slide must exercise patching at all


# Large resections, as generated slides: 12 × 8 mm at 20× (0.5 µm/px) in one, three and eight
# pieces, and 6 × 4 mm at 40× (0.25 µm/px). CLAM's absolute a_t was tuned on such slides; the
# default rule (relative to the largest piece) must keep the same patches there.
LARGE_SLIDES = {
    "resection_20x_1": SynthSlideConfig(width_px=24576, height_px=16384, tissue_pieces=1),
    "resection_20x_3": SynthSlideConfig(width_px=24576, height_px=16384, tissue_pieces=3),
    "resection_20x_8": SynthSlideConfig(
        width_px=24576, height_px=16384, tissue_pieces=8, tissue_fraction=0.7
    ),
    "resection_40x_3": SynthSlideConfig(width_px=24576, height_px=16384, mpp=0.25, tissue_pieces=3),
}


def _kept_patches(slide_path: Path, tissue: TissueConfig) -> set[tuple[int, int]]:
    cfg = PrepareConfig(tissue=tissue)
    with WsiReader(slide_path) as reader:
        info = reader.info
        plan = plan_read(info.mpp, info.level_downsamples, cfg.resolution)
        mask = tissue_mask_for_slide(reader, tissue)
        grid = patch_grid(
            mask,
            info.dimensions,
            plan.patch_size_level0,
            plan.step_level0,
            tissue.min_tissue_fraction,
        )
    return {(int(x), int(y)) for x, y in grid.coords}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LARGE_SLIDES))
def test_default_tissue_rule_keeps_clams_patches_on_large_slides(tmp_path: Path, name: str) -> None:
    slide = generate_slide(
        tmp_path, name, LARGE_SLIDES[name].model_copy(update={"annotate": False}), SEED
    )
    default = _kept_patches(slide.slide_path, TissueConfig())
    clam = _kept_patches(slide.slide_path, TissueConfig(min_tissue_area_relative=0))
    assert len(clam) > 500, "the slide must be large enough for CLAM's default to apply"
    changed = len(default ^ clam) / len(clam)
    assert changed <= 0.01, (name, len(default), len(clam), changed)
