"""``fedpath demo`` measures localisation (issue 20.18).

The demo's hospitals give every tumour slide of their test split complete outlines, so the
final table shows a patch AUC at every hospital, while the training label levels stay those of
the reference cohort (A: 30 % of its tumour training slides outlined; B and C: slide labels
only) and no test outline reaches training. The final table explains its weight column.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fedpath.client.federated import load_splits
from fedpath.common.federation import RoundInstructions
from fedpath.common.mil.config import ModelConfig
from fedpath.common.train_config import TrainConfig
from fedpath.deploy.cli import EXIT_OK, main
from fedpath.deploy.cli_demo import _final_table, outlined_by_split
from fedpath.deploy.demo_federation import DemoRun
from fedpath.synthetic.cli import cohort_config, demo_cohort_config, generate_cohort_with_progress
from fedpath.synthetic.slides import (
    MANIFEST_COLUMNS,
    SlidePlan,
    SynthCohortConfig,
    SynthSiteConfig,
    plan_site,
)


def _is_tumour(plan: SlidePlan) -> bool:
    return plan.config.tumour_fraction > 0


def _demo_args(config_file: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(config_cohort=config_file, slides_per_site=None, seed=0)


def test_demo_cohort_outlines_every_test_tumour_slide_and_keeps_training_levels() -> None:
    cohort = cohort_config(_demo_args(), demo=True)
    assert [s.name for s in cohort.sites] == ["site_a", "site_b", "site_c"]
    for site in cohort.sites:
        plans = plan_site(site, cohort, seed=0)
        assert {p.split for p in plans} == {"train", "val", "test"}, site.name
        for split in ("train", "val", "test"):  # stratified: both labels in every split
            labels = {_is_tumour(p) for p in plans if p.split == split}
            assert labels == {True, False}, (site.name, split)
        test_tumour = [p for p in plans if p.split == "test" and _is_tumour(p)]
        assert test_tumour and all(
            p.config.annotate and p.config.annotated_region_fraction == 1.0 for p in test_tumour
        ), site.name
        assert not any(p.config.annotate for p in plans if p.split == "val")
        train_tumour = [p for p in plans if p.split == "train" and _is_tumour(p)]
        outlined = [p for p in train_tumour if p.config.annotate]
        if site.name == "site_a":
            assert len(outlined) == round(0.3 * len(train_tumour)) >= 1
        else:
            assert outlined == [], f"{site.name} trains on slide labels only"
    # `fedpath synth cohort` (not the demo) writes the reference cohort unchanged.
    plain = cohort_config(_demo_args())
    assert all(s.split_shares is None and not s.outline_test for s in plain.sites)
    assert all(p.split is None for p in plan_site(plain.sites[1], plain, seed=0))
    assert not any(p.config.annotate for p in plan_site(plain.sites[1], plain, seed=0))


def test_demo_keeps_a_sites_own_split_and_needs_splits_for_test_outlines() -> None:
    own = SynthSiteConfig(name="x", n_slides=8, split_shares=(0.5, 0.25))
    cohort = demo_cohort_config(SynthCohortConfig(sites=(own,)))
    assert cohort.sites[0].split_shares == (0.5, 0.25) and cohort.sites[0].outline_test
    with pytest.raises(ValueError, match="outline_test needs split_shares"):
        SynthSiteConfig(name="x", n_slides=8, outline_test=True)
    with pytest.raises(ValueError, match="train > 0 and train \\+ val <= 1"):
        SynthSiteConfig(name="x", n_slides=8, split_shares=(0.8, 0.3))


TINY_COHORT = """
bank_size = 256

[[sites]]
name = "hospital_b"
n_slides = 6
stain = "purple"
width_range = [2048, 2304]
height_range = [2048, 2048]
tumour_fraction_range = [0.3, 0.5]
"""


@pytest.mark.slow
def test_test_outlines_become_patch_labels_of_the_test_split_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real files end to end: the demo's generator, `fedpath prepare`, the split training
    reads. A slide-label-only hospital has patch labels on its test slides and on none of the
    slides it trains or validates on."""
    config = tmp_path / "cohort.toml"
    config.write_text(TINY_COHORT, encoding="utf-8")
    console = Console(file=io.StringIO(), width=80)
    (site_dir,) = generate_cohort_with_progress(
        _demo_args(config), tmp_path / "hospitals", console, demo=True
    )
    with (site_dir / "slides.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == (*MANIFEST_COLUMNS, "split")
    for row in rows:
        outlined = row["split"] == "test" and row["label"] == "tumour"
        assert (row["annotation"] != "") == outlined, row
        assert row["annotation_complete"] == ("true" if outlined else ""), row

    out = tmp_path / "prepared"
    argv = ["prepare", "--manifest", str(site_dir / "slides.csv"), "--out", str(out)]
    argv += ["--encoder", "tiny_cnn", "--tissue-preset", "biopsy", "--no-qc"]
    assert main(argv) == EXIT_OK, capsys.readouterr().out

    instructions = RoundInstructions(
        server_round=1, model=ModelConfig(feature_dim=64), train=TrainConfig(epochs=1)
    )
    splits = load_splits(out, instructions)
    assert splits.train and splits.val
    assert not any(e.has_patch_labels for e in splits.train + splits.val)
    tumour_test = [e for e in splits.test if e.label == 1]
    assert tumour_test and all(e.has_patch_labels and e.annotation_complete for e in tumour_test)
    assert outlined_by_split(out) == f"0 / 0 / {len(tumour_test)}"


def _demo_run(tmp_path: Path, strategy: str) -> DemoRun:
    run_dir = tmp_path / strategy
    run_dir.mkdir()
    run_config = {"strategy": strategy, "fedmix-lambda": 10.0, "fedmix-beta": 1.5}
    (run_dir / "config.json").write_text(json.dumps({"run_config": run_config}))
    metrics: dict[str, Any] = {"loss": 0.4, "auc": 0.9, "balanced_accuracy": 0.75}
    final = {
        "status": "completed",
        "test": {
            "site_a": {"num_examples": 4, **metrics, "patch_auc": 0.8123},
            "site_b": {"num_examples": 4, **metrics, "patch_auc": 0.7351},
        },
        "global_test": {"num_examples": 8, **metrics, "patch_auc": 0.7734, "pooling": "all"},
        "calibration": {
            "fitted": strategy == "fedmix",
            "description": "temperature T = 2.000, threshold 0.600; fitted on 12 validation slides",
            "reason": None if strategy == "fedmix" else "3 normal validation slides; need ≥ 5",
        },
    }
    rounds = [{"weights": {"site_a": 0.55, "site_b": 0.45}}]
    return DemoRun("finished:completed", run_dir, rounds, final, {})


@pytest.mark.parametrize("strategy", ["fedmix", "fedavg"])
def test_final_table_shows_patch_auc_and_says_what_the_weight_is(
    tmp_path: Path, strategy: str
) -> None:
    console = Console(file=io.StringIO(), width=80, record=True)
    console.print(_final_table(_demo_run(tmp_path, strategy)))
    text = console.export_text()
    assert "0.812" in text and "0.735" in text and "0.773" in text
    assert "all (pooled)" in text
    site_rows = [line for line in text.splitlines() if "site_" in line]
    assert len(site_rows) == 2 and not any("n/a" in line for line in site_rows)
    assert all(len(line) <= 80 for line in text.splitlines())
    flat = " ".join(text.split())
    if strategy == "fedmix":
        assert (
            "weight: the site's share in the last round's model average, ∝ n/Σn + "
            "10·L^1.5/ΣL^1.5 (FedMix; n: training slides, L: training loss)"
        ) in flat
        assert (
            "balanced acc.: calibrated on the sites' validation slides: temperature T = 2.000, "
            "threshold 0.600; fitted on 12 validation slides"
        ) in flat
    else:
        assert "model average, n/Σn (FedAvg; n: training slides)" in flat
        assert (
            "balanced acc.: at the argmax, uncalibrated (3 normal validation slides; need ≥ 5)"
        ) in flat
