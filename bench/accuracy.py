"""Accuracy benchmark: slide AUC and patch AUC of weak vs mixed supervision on a synthetic cohort.

Usage (from the repository root)::

    .venv/bin/python bench/accuracy.py                 # full run (see bench/README.md)
    .venv/bin/python bench/accuracy.py --cohort field-effect   # tumours 40-80 % low-grade
    .venv/bin/python bench/accuracy.py --quick         # tiny cohort, a few epochs: a smoke run
    .venv/bin/python bench/accuracy.py --seeds 5       # more training seeds per arm
    .venv/bin/python bench/accuracy.py --low-grade-share 0   # uniform (high-grade) tumour
    .venv/bin/python bench/accuracy.py --tumour-slide-mimic-share 0   # no benign mimic at all

What it does, in one run:

1. Builds a synthetic three-hospital cohort (``fedpath synth`` slides, each hospital with its
   own stain, the third one smaller) and prepares it with the real pipeline
   (``prepare_site``, biopsy tissue preset, the default encoder EfficientNet-Lite0). Each
   hospital has a training pool (split into train and validation, stratified by label) and a
   held-out test set generated as a separate site, so no test slide can leak into training.
   Generated and prepared data are cached under ``bench/_cache/accuracy/<key>/``, the key
   being a hash of the cohort spec, the generator's source and the preparation settings:
   reruns skip synthesis and embedding. Tumour is heterogeneous: 80-90 % of each tumour
   (``--low-grade-share``; 40-80 % with ``--cohort field-effect``) is rendered with a subtle
   low-grade morphology, the rest conspicuous high-grade. That part alone explains every
   tumour slide's label, so weak supervision can ignore the low-grade part; outlines cover all
   of it, so mixed supervision has a reason to learn it. (With uniform tumour weak supervision
   reached the ceiling.) And part of the non-tumour tissue of each tumour slide is a benign
   mimic of the low-grade morphology (the same cords in the same stroma, benign nuclei), as
   benign tubules and adenosis beside carcinoma are in real tissue: 30-50 % of it
   (``--tumour-slide-mimic-share``), and none of a normal slide (``--mimic-share``). Without
   any mimic, cords of cells appeared only on tumour slides, so "not plain stroma" was tumour
   evidence and weak supervision found the low-grade part anyway (low-grade patch AUC 0.97);
   with mimics on normal slides too, those slides taught weak MIL that the mimic is benign.
   A mimic that goes with the slide label cannot be told from low-grade tumour by slide
   labels; patch labels can.
2. Decides which training slides' outlines training may see. Every tumour slide of the
   training pool is generated with outlines (half of them partial: the manifest marks those
   ``annotation_complete=false``), but only a chosen share per hospital is *visible*; the rest
   are handed to the trainer as slide-label-only bags. Visibility is a training-time choice,
   so several label scenarios (issue 3: 20 % of tumour slides overall; the federated layout:
   30 % at site A, none at B and C) share one prepared cohort. Here the same share of the
   validation tumour slides shows its outlines too.
3. Trains every arm (model × supervision mode × seed) with the site-local trainer
   (``fedpath.client.training.trainer.train``, DESIGN §4.4 defaults: Adam 2e-4, ≤ 200 epochs, early
   stopping after epoch 50 with patience 20) on the pooled training slides (the centralised
   case), and evaluates on the pooled test set: slide AUC with a bootstrap 95 % CI, and
   pooled patch AUC / AP against the generator's *ground-truth* tumour masks on *every* test
   slide (all patches of a normal slide are negatives; patches with a tumour share strictly
   between 0 and 0.5 are ambiguous and left out, as ``prepare`` does for outlines), and the
   low-grade patch AUC: the same pooled AUC on low-grade against normal patches only (a
   tumour patch is low-grade when more than 80 % of its tumour is, high-grade below 20 %),
   where weak and mixed supervision should differ. Early stopping goes by the validation
   slide loss for weak arms, and for mixed arms by ``stopping_loss="patch"``: the patch loss
   of the outlined validation slides. On the slide loss a mixed arm kept an epoch from before
   its instance classifier had learnt the patches (abmil: epoch 8 of 50, patch AUC below
   weak's), and on the slide loss weighted 0.7 / 0.3 with the patch loss epoch 3.
4. Prints a feature-space ceiling alongside: a logistic-regression probe trained on the
   ground-truth labels of every training-pool patch (information no MIL arm gets), scored on
   the same test patches, and the test AUC of the single best feature dimension. It tells a
   weak encoder apart from a weak MIL method, and shows when the task is too easy for the
   weak/mixed comparison to mean anything (both at the ceiling). On low-grade vs normal test
   patches it prints that probe's AUC and that of a probe fitted on high-grade vs normal pool
   patches only: what finding the conspicuous tumour alone gives on the subtle one.

Targets (issue 3): mixed slide AUC ≥ 0.95 and patch AUC ≥ 0.90, and mixed patch AUC at least
0.05 above weak, for clam_sb and abmil.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
from pydantic import Field, ValidationError

from fedpath.client.config import AnnotationConfig, EmbeddingConfig, PrepareConfig, TissueConfig
from fedpath.client.prepare.pipeline import prepare_site
from fedpath.client.training.bags import Bag, load_bag
from fedpath.client.training.evaluate import predict_bag
from fedpath.client.training.site_index import BagEntry, load_site_index
from fedpath.client.training.trainer import train
from fedpath.client.wsi.annotations import patch_labels
from fedpath.common.configbase import StrictModel
from fedpath.common.featurebag import read_attrs
from fedpath.common.hashing import sha256_json
from fedpath.common.metrics import PatchMetrics, SlideMetrics, pooled_patch_metrics, slide_metrics
from fedpath.common.mil.config import ModelConfig, SupervisionConfig
from fedpath.common.mil.models import MILModel, build_model
from fedpath.common.train_config import TrainConfig
from fedpath.synthetic.slides import SynthCohortConfig, SynthSiteConfig, generate_cohort

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / "_cache" / "accuracy"
CACHE_LAYOUT = 1
"""Bumped when the cache layout or the way a cohort is derived from its spec changes."""
GENERATOR_SOURCES = (
    "synthetic.py",
    *(f"synth_{m}.py" for m in ("masks", "render", "stain", "texture", "tiff")),
)
"""The slide generator's modules (``client/wsi``): their bytes are part of the cache key, so
retuning a texture constant regenerates the cohort instead of reusing stale slides."""
LABELS = ("normal", "tumour")
TUMOUR = LABELS.index("tumour")
NORMAL_GRADE, HIGH_GRADE, LOW_GRADE = 0, 1, 2
"""Ground-truth grade of a patch (``patch_grades``); −1: ambiguous or of mixed grade."""
MIXED_GRADE = (0.2, 0.8)
"""A tumour patch is high-grade when less than 0.2 of its tumour is low-grade, low-grade when
more than 0.8 is: in between it shows both morphologies and belongs to neither comparison."""
LOW_GRADE_SHARE = (0.4, 0.8)
"""The benchmark cohort's share of each tumour rendered low-grade: with uniform tumour, weak
supervision reached the ceiling and weak vs mixed compared nothing (bench/README.md)."""
MIMIC_SHARE = (0.0, 0.0)
"""The benchmark cohort's share of a normal slide's tissue rendered as the benign mimic of
low-grade tumour: none. With 10-25 % on every slide, or 5-15 % on normal slides and 30-50 % on
tumour slides, weak MIL learnt from the normal slides (their most tumour-like patches are its
negatives) that the mimic is benign and stayed within 0.035-0.04 patch AUC of mixed
supervision (bench/README.md)."""
TUMOUR_SLIDE_MIMIC_SHARE = (0.3, 0.5)
"""The mimic's share of the non-tumour tissue of a tumour slide: benign change that goes with
the carcinoma (a field effect), so the slide labels point at it as much as at the low-grade
tumour, and only outlines (complete ones: the normal tissue they leave out is labelled) can
tell the two apart."""

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    del message


# ------------------------------------------------------------------------------ the cohort


class HospitalSpec(StrictModel):
    """One hospital: its stain protocol, slide sizes and how many slides it contributes."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    stain: str = "reference"
    n_pool: int = Field(ge=2, description="training-pool slides (train + validation)")
    n_test: int = Field(ge=2, description="held-out test slides")
    width_range: tuple[int, int] = (5120, 7168)
    height_range: tuple[int, int] = (4096, 6144)


class CohortSpec(StrictModel):
    """Everything the generated and prepared cohort depends on (and so its cache key)."""

    hospitals: tuple[HospitalSpec, ...]
    tumour_fraction_range: tuple[float, float] = Field(
        (0.01, 0.8), description="tumour share of tissue, log-uniform: micro-metastasis to most"
    )
    tumour_density_range: tuple[float, float] = Field(
        (0.25, 1.0),
        description="infiltrating tumour: share of a tumour region covered by tumour nests "
        "(solid sheets, 1, are separable by a single feature: nothing left to compare)",
    )
    low_grade_share_range: tuple[float, float] = Field(
        (0.0, 0.0),
        description="tumour heterogeneity: share of each tumour rendered with the subtle "
        "low-grade morphology (see SynthSlideConfig), the rest conspicuous high-grade",
    )
    mimic_share_range: tuple[float, float] = Field(
        (0.0, 0.0),
        description="share of every slide's non-tumour tissue rendered as a benign mimic of "
        "the low-grade morphology (see SynthSlideConfig): not tumour, so only patch labels "
        "tell it from low-grade tumour",
    )
    tumour_slide_mimic_share_range: tuple[float, float] | None = Field(
        None,
        description="that share on tumour slides, when it differs (None: mimic_share_range)",
    )
    partial_share: float = Field(
        0.5, ge=0, le=1, description="share of training tumour slides outlined only partially"
    )
    val_share: float = Field(0.2, gt=0, lt=1, description="validation share of each pool")
    encoder: str = "efficientnet_lite0"
    bank_size: int = Field(1024, description="generator texture bank side (smaller: faster)")
    seed: int = 0

    def prepare_config(self) -> PrepareConfig:
        """Synthetic slides are biopsy-sized (DESIGN §4.1); QC pictures are not needed here."""
        return PrepareConfig(
            tissue=TissueConfig.preset("biopsy"),
            embedding=EmbeddingConfig(encoder=self.encoder),
            labels=LABELS,
            write_qc=False,
        )

    def synth_key(self) -> str:
        """Cache key of the generated slides: what the generator is given, and the seed."""
        synth = synth_config(self).model_dump(mode="json")
        key = {"layout": CACHE_LAYOUT, "synth": synth, "seed": self.seed}
        return sha256_json({**key, "generator": generator_fingerprint()})[:16]

    def prepare_key(self) -> str:
        """Cache key of one preparation of those slides (another encoder: another folder).

        Code changes that alter features are caught by ``prepare``'s own per-slide config
        hash: such slides are re-embedded on the next run.
        """
        return sha256_json(self.prepare_config().model_dump(mode="json"))[:12]


def generator_fingerprint() -> str:
    """Hash of the generator's source: slides made by other code are other slides."""
    wsi = ROOT / "client" / "wsi"
    return sha256_json(
        {name: hashlib.sha256((wsi / name).read_bytes()).hexdigest() for name in GENERATOR_SOURCES}
    )


def three_hospitals(
    n_pool: int, n_test: int, small_pool: int, small_test: int
) -> tuple[HospitalSpec, ...]:
    """Issue 4's hospitals, one stain each: sites A and B alike, and site C, the small
    hospital, with fewer and smaller slides (the full-size cohorts differ only in counts)."""
    return (
        HospitalSpec(name="site_a", stain="reference", n_pool=n_pool, n_test=n_test),
        HospitalSpec(name="site_b", stain="purple", n_pool=n_pool, n_test=n_test),
        HospitalSpec(
            name="site_c",
            stain="pale",
            n_pool=small_pool,
            n_test=small_test,
            width_range=(4096, 6144),
            height_range=(4096, 5120),
        ),
    )


FULL_COHORT = CohortSpec(
    hospitals=three_hospitals(36, 16, small_pool=18, small_test=8),
    low_grade_share_range=LOW_GRADE_SHARE,
    mimic_share_range=MIMIC_SHARE,
    tumour_slide_mimic_share_range=TUMOUR_SLIDE_MIMIC_SHARE,
)
"""90 pool slides (72 train + 18 validation) and 40 test slides, half tumour everywhere, each
tumour 40-80 % low-grade and 30-50 % of a tumour slide's non-tumour tissue a benign mimic of
it: about 29,000 patches, ten minutes of EfficientNet-Lite0 on two cores."""

QUICK_COHORT = CohortSpec(
    hospitals=tuple(
        HospitalSpec(
            name=name,
            stain=stain,
            n_pool=n_pool,
            n_test=4,
            width_range=(3072, 3584),
            height_range=(2560, 3072),
        )
        for name, stain, n_pool in (
            ("site_a", "reference", 8),
            ("site_b", "purple", 8),
            ("site_c", "pale", 6),
        )
    ),
    low_grade_share_range=LOW_GRADE_SHARE,
    mimic_share_range=MIMIC_SHARE,
    tumour_slide_mimic_share_range=TUMOUR_SLIDE_MIMIC_SHARE,
)


SUBTLE_COHORT = CohortSpec(
    hospitals=three_hospitals(40, 20, small_pool=12, small_test=10),
    tumour_fraction_range=(0.01, 0.3),
    low_grade_share_range=(0.8, 0.9),
    mimic_share_range=(0.1, 0.3),
)
"""Issue 4's default cohort: one where the slide task itself needs data. On FULL_COHORT
every arm, each hospital alone included, reached slide AUC 1.000 (the conspicuous high-grade
part of every tumour gave it away), so "federated beats the worst single site" could not show.
Here tumours are small (1-30 % of the tissue) and 80-90 % low-grade, and every slide, normal
ones too, carries 10-30 % of the benign mimic of low-grade tumour, so a tumour slide differs
from a normal one by a few patches that look like benign change. Sites A and B (40 pool
slides each) still learn that; site C, the small hospital (12 pool slides: 9 train, 3
validation), does not. The pooled test set has 50 slides."""

LOW_GRADE_COHORT = CohortSpec.model_validate(
    {**FULL_COHORT.model_dump(), "low_grade_share_range": (0.8, 0.9)}
)
"""Issue 3's default cohort: FULL_COHORT's slides, field-effect mimic and all, with tumours
80-90 % low-grade instead of 40-80 %. Low-grade carcinoma beside benign change of the same
architecture is where slide labels fail to localise tumour in real tissue. On FULL_COHORT the
conspicuous high-grade part (20-60 % of each tumour) guided CLAM's instance loss to most of the
low-grade part as well, and weak clam_sb came within 0.045 patch AUC of the linear-probe
ceiling that mixed clam_sb reached. Here the high-grade part is a small focus (about one
tumour patch in nine), the slide labels point at the mimic as much as at the low-grade tumour,
and only outlines tell the two apart (bench/README.md)."""

COHORTS = {"field-effect": FULL_COHORT, "subtle": SUBTLE_COHORT, "low-grade": LOW_GRADE_COHORT}
"""The full-size cohorts by their ``--cohort`` name."""


def add_cohort_option(parser: argparse.ArgumentParser, default: str) -> None:
    """``--cohort``, shared by the accuracy benchmarks (``--quick`` overrides it)."""
    parser.add_argument(
        "--cohort",
        choices=tuple(COHORTS),
        default=default,
        help="field-effect: FULL_COHORT (mimic on tumour slides only, tumours up to 80 %% "
        "of the tissue, 40-80 %% of each low-grade); low-grade: LOW_GRADE_COHORT (the same "
        "with tumours 80-90 %% low-grade); subtle: SUBTLE_COHORT (small, mostly low-grade "
        f"tumours, mimic on every slide, a 12-slide site C); default {default}",
    )


def share_range(text: str) -> tuple[float, float]:
    """argparse type of ``--low-grade-share`` and ``--mimic-share``: ``LO,HI``, or one share
    for both (``0``: off).

    Only the text is checked here; the bounds are the generator's, which
    ``apply_share_options`` applies, so they are written down once.
    """
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected LO,HI or one share, got {text!r}")
    return values[0], values[-1]


def add_share_options(parser: argparse.ArgumentParser) -> None:
    """``--low-grade-share`` and ``--mimic-share``, shared by the accuracy benchmarks built on
    this cohort (one helper, so every such benchmark offers both)."""
    parser.add_argument(
        "--low-grade-share",
        type=share_range,
        default=None,
        metavar="LO,HI",
        help="share of each tumour rendered low-grade, drawn per slide (field-effect "
        f"cohort: {LOW_GRADE_SHARE[0]:g},{LOW_GRADE_SHARE[1]:g}; 0: uniform high-grade tumour)",
    )
    parser.add_argument(
        "--mimic-share",
        type=share_range,
        default=None,
        metavar="LO,HI",
        help="share of a normal slide's tissue rendered as a benign mimic of the "
        f"low-grade morphology, drawn per slide (field-effect cohort: {MIMIC_SHARE[0]:g},"
        f"{MIMIC_SHARE[1]:g}; 0: none); also the tumour slides' unless "
        "--tumour-slide-mimic-share is given",
    )
    parser.add_argument(
        "--tumour-slide-mimic-share",
        type=share_range,
        default=None,
        metavar="LO,HI",
        help="the mimic's share of a tumour slide's non-tumour tissue (field-effect "
        f"cohort: {TUMOUR_SLIDE_MIMIC_SHARE[0]:g},{TUMOUR_SLIDE_MIMIC_SHARE[1]:g}, or the "
        "--mimic-share range when only that is given)",
    )


def apply_share_options(
    parser: argparse.ArgumentParser,
    spec: CohortSpec,
    *,
    low_grade: tuple[float, float] | None = None,
    mimic: tuple[float, float] | None = None,
    tumour_slide_mimic: tuple[float, float] | None = None,
) -> CohortSpec:
    """``spec`` with the ``--low-grade-share``, ``--mimic-share`` and
    ``--tumour-slide-mimic-share`` ranges (None: unchanged; a ``--mimic-share`` alone applies
    to tumour slides too, as the option says), each validated now by the generator's own
    model: a range it refuses (unordered, above its maximum share) is a usage error naming
    the option before any work is done, not a traceback."""
    if mimic is not None and tumour_slide_mimic is None:
        tumour_slide_mimic = mimic  # one --mimic-share: the same share on every slide
    for field_name, option, share in (
        ("low_grade_share_range", "--low-grade-share", low_grade),
        ("mimic_share_range", "--mimic-share", mimic),
        ("tumour_slide_mimic_share_range", "--tumour-slide-mimic-share", tumour_slide_mimic),
    ):
        if share is None:
            continue
        spec = CohortSpec.model_validate({**spec.model_dump(), field_name: share})
        try:
            synth_config(spec)
        except ValidationError as exc:
            parser.error(f"{option}: {exc.errors()[0]['msg']}")
    return spec


def apply_parsed_shares(
    parser: argparse.ArgumentParser, spec: CohortSpec, args: argparse.Namespace
) -> CohortSpec:
    """``apply_share_options`` with the options ``add_share_options`` put on ``parser``."""
    return apply_share_options(
        parser,
        spec,
        low_grade=args.low_grade_share,
        mimic=args.mimic_share,
        tumour_slide_mimic=args.tumour_slide_mimic_share,
    )


def _test_site(name: str) -> str:
    return f"{name}_test"


def synth_config(spec: CohortSpec) -> SynthCohortConfig:
    """Two generator sites per hospital: its training pool (all tumour slides outlined, a
    share partially) and its test set (no outlines: its truth comes from the masks)."""
    sites = []
    for i, h in enumerate(spec.hospitals):
        shared = {
            "stain": h.stain,
            "width_range": h.width_range,
            "height_range": h.height_range,
            "tumour_fraction_range": spec.tumour_fraction_range,
            "tumour_density_range": spec.tumour_density_range,
            "low_grade_share_range": spec.low_grade_share_range,
            "mimic_share_range": spec.mimic_share_range,
            "tumour_slide_mimic_share_range": spec.tumour_slide_mimic_share_range,
            "tumour_share": 0.5,
        }
        sites.append(
            SynthSiteConfig(
                name=h.name,
                n_slides=h.n_pool,
                annotated_share=1.0,
                partial_share=spec.partial_share,
                seed_offset=2 * i,
                **shared,
            )
        )
        sites.append(
            SynthSiteConfig(
                name=_test_site(h.name), n_slides=h.n_test, seed_offset=2 * i + 1, **shared
            )
        )
    return SynthCohortConfig(sites=tuple(sites), bank_size=spec.bank_size)


@dataclass(frozen=True)
class Hospital:
    """One hospital's prepared slides by split (entries as ``prepared.csv`` lists them)."""

    name: str
    train: tuple[BagEntry, ...]
    val: tuple[BagEntry, ...]
    test: tuple[BagEntry, ...]


@dataclass(frozen=True)
class PreparedCohort:
    """The cohort on disk plus the generator's ground truth per slide.

    ``truth`` holds ground-truth patch labels (1/0/−1, feature-bag order) for every slide, from
    the tumour masks, and ``grade`` each patch's grade (``patch_grades``) from the tumour and
    low-grade masks: evaluation and the probes use them, training never does.
    """

    spec: CohortSpec
    root: Path
    hospitals: tuple[Hospital, ...]
    truth: Mapping[str, np.ndarray]
    grade: Mapping[str, np.ndarray]
    tumour_fraction: Mapping[str, float]
    feature_dim: int
    failed: tuple[str, ...] = ()
    """"slide: reason" of generated slides that preparation refused (left out)."""

    def entries(self, split: str) -> list[BagEntry]:
        """One split pooled over hospitals (the centralised case)."""
        return [e for h in self.hospitals for e in getattr(h, split)]


def _generated(hospitals_dir: Path, cfg: SynthCohortConfig, seed: int) -> bool:
    """True when ``generate_cohort`` already finished this exact cohort (it writes
    ``cohort.json`` last)."""
    marker = hospitals_dir / "cohort.json"
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text())
    return recorded == {"seed": seed, "config": cfg.model_dump(mode="json")}


def _prepare(site_dir: Path, out: Path, cfg: PrepareConfig, log: Log) -> list[str]:
    """Prepare one generator site; return "slide: reason" for each slide that failed.

    A failed slide is left out (``prepared.csv`` does not list it), as a hospital's run
    would; the caller reports it so a shrinking cohort is visible in the output.
    """
    began = time.perf_counter()
    summary = prepare_site(site_dir / "slides.csv", out, cfg)
    failed = [f"{r.slide_id}: {r.reason}" for r in summary.failed]
    log(
        f"  {site_dir.name}: {len(summary.records)} slides, "
        f"{summary.embedded_patches} patches embedded, {summary.count('skipped')} cached, "
        f"{len(failed)} failed, {time.perf_counter() - began:.0f} s"
    )
    return failed


def validation_split(
    entries: Sequence[BagEntry], share: float, seed: int
) -> tuple[list[BagEntry], list[BagEntry]]:
    """(train, val), stratified by label: ``round(share·n)`` of each label, at least one when
    a label has two or more slides (early stopping needs both classes in validation)."""
    rng = np.random.default_rng(seed)
    val_ids: set[str] = set()
    for label in sorted({e.label for e in entries}):
        ids = [e.slide_id for e in entries if e.label == label]
        count = max(1, round(share * len(ids))) if len(ids) >= 2 else 0
        val_ids.update(str(i) for i in rng.choice(ids, size=count, replace=False))
    train_part = [e for e in entries if e.slide_id not in val_ids]
    val_part = [e for e in entries if e.slide_id in val_ids]
    return train_part, val_part


def mask_patch_fraction(
    mask: np.ndarray, downsample: int, coords: np.ndarray, patch_size_level0: int
) -> np.ndarray:
    """Exact share of each patch footprint covered by a binary mask stored at ``downsample``.

    The integral image of a piecewise-constant mask is bilinear inside each cell, so its
    bilinear interpolation at fractional positions gives exact box sums for patches that are
    not aligned to the mask grid.
    """
    table = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)
    rows, cols = table.shape[0] - 1, table.shape[1] - 1

    def integral_at(v: np.ndarray, u: np.ndarray) -> np.ndarray:
        v, u = np.clip(v, 0.0, rows), np.clip(u, 0.0, cols)
        i = np.minimum(np.floor(v), rows - 1).astype(np.int64)
        j = np.minimum(np.floor(u), cols - 1).astype(np.int64)
        ty, tx = v - i, u - j
        return (
            table[i, j] * (1 - ty) * (1 - tx)
            + table[i + 1, j] * ty * (1 - tx)
            + table[i, j + 1] * (1 - ty) * tx
            + table[i + 1, j + 1] * ty * tx
        )

    xy = np.asarray(coords, dtype=np.float64)
    u0, v0 = xy[:, 0] / downsample, xy[:, 1] / downsample
    side = patch_size_level0 / downsample
    u1, v1 = u0 + side, v0 + side
    area = integral_at(v1, u1) - integral_at(v0, u1) - integral_at(v1, u0) + integral_at(v0, u0)
    return np.clip(area / (side * side), 0.0, 1.0)


def patch_grades(
    labels: np.ndarray, tumour: np.ndarray, low_grade: np.ndarray | None
) -> np.ndarray:
    """Per patch (int8): 0 normal, 1 high-grade, 2 low-grade, −1 ambiguous or mixed grade.

    ``labels`` are the ground-truth patch labels, ``tumour`` and ``low_grade`` the shares of
    each patch covered by the tumour and low-grade masks (None: no low-grade mask, all tumour
    is high-grade). A tumour patch takes a grade when that grade covers most of its tumour
    (``MIXED_GRADE``), so "weak supervision misses the low-grade part" is measured on patches
    that show only that morphology.
    """
    share = np.zeros(labels.shape, dtype=np.float64)
    if low_grade is not None:
        np.divide(low_grade, tumour, out=share, where=tumour > 0)
    grade = np.full(labels.shape, -1, dtype=np.int8)
    grade[labels == 0] = NORMAL_GRADE
    grade[(labels == 1) & (share < MIXED_GRADE[0])] = HIGH_GRADE
    grade[(labels == 1) & (share > MIXED_GRADE[1])] = LOW_GRADE
    return grade


@dataclass(frozen=True)
class SlideTruth:
    """The generator's ground truth of one prepared slide, in feature-bag order."""

    labels: np.ndarray
    grade: np.ndarray
    tumour_fraction: float
    """Realised tumour share of tissue."""


def _read_mask(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(f"cannot read mask {path}")
    return image > 127


def _ground_truth(site_dir: Path, entries: Sequence[BagEntry]) -> dict[str, SlideTruth]:
    """Per slide: patch labels from the generator's tumour mask, patch grades from it and the
    low-grade mask beside it (absent: uniform high-grade tumour, or a normal slide)."""
    with (site_dir / "ground_truth.csv").open(newline="") as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    thresholds = AnnotationConfig()
    out = {}
    for entry in entries:
        row = rows[entry.slide_id]
        tumour_path = site_dir / row["tumour_mask"]
        low_grade_path = tumour_path.with_name(f"{entry.slide_id}_low_grade.png")
        downsample = int(row["mask_downsample"])
        with h5py.File(entry.features, "r") as fh:
            coords = fh["coords"][()]
        size = int(read_attrs(entry.features)["patch_size_level0"])
        tumour = mask_patch_fraction(_read_mask(tumour_path), downsample, coords, size)
        low_grade = None
        if low_grade_path.is_file():
            low_grade = mask_patch_fraction(_read_mask(low_grade_path), downsample, coords, size)
        labels = patch_labels(tumour, True, thresholds)
        out[entry.slide_id] = SlideTruth(
            labels, patch_grades(labels, tumour, low_grade), float(row["tumour_fraction"])
        )
    return out


def build_cohort(spec: CohortSpec, cache: Path = CACHE, log: Log = _quiet) -> PreparedCohort:
    """Generate (once), prepare (resumably) and index the cohort under ``cache/<key>``."""
    root = Path(cache) / spec.synth_key()
    hospitals_dir, prepared_dir = root / "hospitals", root / "prepared" / spec.prepare_key()
    synth = synth_config(spec)
    if _generated(hospitals_dir, synth, spec.seed):
        log(f"cohort {spec.synth_key()}: synthetic slides cached")
    else:
        began = time.perf_counter()
        n = sum(s.n_slides for s in synth.sites)
        log(f"cohort {spec.synth_key()}: synthesising {n} slides")
        generate_cohort(hospitals_dir, synth, spec.seed)
        log(f"  synthesised in {time.perf_counter() - began:.0f} s")
    cfg = spec.prepare_config()
    log(f"preparing with {spec.encoder} (resumes: prepared slides are skipped)")
    failed = []
    for site in synth.sites:
        failed += _prepare(hospitals_dir / site.name, prepared_dir / site.name, cfg, log)

    hospitals, truth, grade, fractions = [], {}, {}, {}
    for i, h in enumerate(spec.hospitals):
        pool = load_site_index(prepared_dir / h.name, LABELS)
        test = load_site_index(prepared_dir / _test_site(h.name), LABELS)
        train_part, val_part = validation_split(pool, spec.val_share, spec.seed * 1000 + i)
        hospitals.append(
            Hospital(
                h.name,
                tuple(replace(e, split="train") for e in train_part),
                tuple(replace(e, split="val") for e in val_part),
                tuple(replace(e, split="test") for e in test),
            )
        )
        for site_name, entries in ((h.name, pool), (_test_site(h.name), test)):
            for slide_id, t in _ground_truth(hospitals_dir / site_name, entries).items():
                truth[slide_id], grade[slide_id] = t.labels, t.grade
                fractions[slide_id] = t.tumour_fraction
    feature_dim = int(read_attrs(hospitals[0].train[0].features)["feature_dim"])
    return PreparedCohort(
        spec, root, tuple(hospitals), truth, grade, fractions, feature_dim, tuple(failed)
    )


# ------------------------------------------------------------------ what training may see


def visible_annotations(
    cohort: PreparedCohort,
    shares: Mapping[str, float],
    seed: int,
    *,
    splits: Sequence[str] = ("train",),
) -> frozenset[str]:
    """Pool slides whose outlines training may use: per hospital and split ``round(share·n)``
    of its tumour slides in that split (``shares`` by hospital name, absent = 0), half of them
    (rounded down) partially outlined when the hospital has such slides. The training split's
    choice does not depend on whether "val" is among ``splits``."""
    visible: set[str] = set()
    for i, hospital in enumerate(cohort.hospitals):
        for split in splits:
            entries = {"train": hospital.train, "val": hospital.val}[split]
            stream = [seed, i] if split == "train" else [seed, i, 1]
            visible |= _outlined(entries, shares.get(hospital.name, 0.0), stream)
    return frozenset(visible)


def _outlined(entries: Sequence[BagEntry], share: float, stream: list[int]) -> set[str]:
    """``round(share·n)`` of the n outlined tumour slides among ``entries``, drawn from
    ``stream``: half (rounded down) partial ones when there are such, the rest complete."""
    tumour = [e for e in entries if e.label == TUMOUR and e.has_patch_labels]
    count = round(share * len(tumour))
    rng = np.random.default_rng(stream)
    partial = [e.slide_id for e in tumour if e.annotation_complete is False]
    complete = [e.slide_id for e in tumour if e.annotation_complete is True]
    n_partial = min(count // 2, len(partial))
    n_complete = min(count - n_partial, len(complete))
    n_partial = min(count - n_complete, len(partial))
    visible: set[str] = set()
    for pool, n in ((partial, n_partial), (complete, n_complete)):
        visible.update(str(s) for s in rng.choice(pool, size=n, replace=False))
    return visible


def annotated_share(
    cohort: PreparedCohort, visible: frozenset[str], split: str = "train"
) -> tuple[int, int, int]:
    """(visible outlines, of which partial, tumour slides) over the pooled ``split``."""
    tumour = [e for e in cohort.entries(split) if e.label == TUMOUR]
    shown = [e for e in tumour if e.slide_id in visible]
    partial = sum(1 for e in shown if e.annotation_complete is False)
    return len(shown), partial, len(tumour)


def _hidden(bag: Bag) -> Bag:
    """The bag as a slide-label-only slide: no patch labels, no annotation flags."""
    entry = replace(bag.entry, has_patch_labels=False, annotation_complete=None)
    return Bag(entry, bag.features, None)


def _with_truth(bag: Bag, truth: np.ndarray) -> Bag:
    return Bag(bag.entry, bag.features, torch.from_numpy(truth.astype(np.int8)))


@dataclass(frozen=True)
class LoadedCohort:
    """Bags in memory, ready for many training runs: train and validation bags show only the
    visible outlines (``visible_annotations``), test bags carry the ground truth (for
    evaluation only)."""

    train: tuple[Bag, ...]
    val: tuple[Bag, ...]
    test: tuple[Bag, ...]
    probe_train: tuple[Bag, ...]
    """Training-pool bags with ground truth: for the feature-space probe, never for MIL."""
    grade: Mapping[str, np.ndarray]
    """Ground-truth patch grades of the pool and test slides by slide id (``patch_grades``):
    for scoring and probing low-grade tumour, never for MIL."""


def load_cohort(cohort: PreparedCohort, visible: frozenset[str]) -> LoadedCohort:
    """Load every bag once (a few hundred MB for the full cohort) and label it per its use."""
    dim = cohort.feature_dim
    train_bags = [load_bag(e, dim) for e in cohort.entries("train")]
    val_bags = [load_bag(e, dim) for e in cohort.entries("val")]
    test_bags = [load_bag(e, dim) for e in cohort.entries("test")]
    return LoadedCohort(
        train=tuple(b if b.entry.slide_id in visible else _hidden(b) for b in train_bags),
        val=tuple(b if b.entry.slide_id in visible else _hidden(b) for b in val_bags),
        test=tuple(_with_truth(b, cohort.truth[b.entry.slide_id]) for b in test_bags),
        probe_train=tuple(
            _with_truth(b, cohort.truth[b.entry.slide_id]) for b in train_bags + val_bags
        ),
        grade=cohort.grade,
    )


# ------------------------------------------------------------------------ train / evaluate


@dataclass(frozen=True)
class Arm:
    """One configuration being compared."""

    model: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.model} {self.mode}"


@dataclass(frozen=True)
class Evaluation:
    slide: SlideMetrics
    patch: PatchMetrics
    low_grade_patch: PatchMetrics | None = None
    """Low-grade against normal patches (``low_grade_patch_metrics``); None when not scored or
    the bags have no low-grade patch."""


@dataclass(frozen=True)
class RunResult:
    """One trained arm and seed, evaluated on the test bags."""

    arm: Arm
    seed: int
    evaluation: Evaluation
    best_epoch: int
    epochs_run: int
    seconds: float
    model: MILModel | None = field(default=None, repr=False, compare=False)
    """The trained model, for callers that score it on more than the pooled test set."""


def grade_labels(grade: np.ndarray, positive: int) -> np.ndarray:
    """Patch labels of one grade against normal tissue: 1 grade ``positive``, 0 normal, −1 the
    rest (other grades, ambiguous), so a metric compares exactly those two kinds of patch."""
    labels = np.full(grade.shape, -1, dtype=np.int8)
    labels[grade == NORMAL_GRADE] = 0
    labels[grade == positive] = 1
    return labels


def low_grade_patch_metrics(
    slides: Iterable[tuple[np.ndarray, np.ndarray]],
) -> PatchMetrics | None:
    """Pooled patch metrics of low-grade (positive) against normal patches from (grade,
    tumour probability) per slide; None when no slide has a low-grade patch.

    The overall patch AUC is dominated by conspicuous high-grade tumour, which slide labels
    alone find; this isolates the part that needs outlines to be learnt.
    """
    labelled = [(grade_labels(grade, LOW_GRADE), prob) for grade, prob in slides]
    if not any((labels == 1).any() for labels, _ in labelled):
        return None
    return pooled_patch_metrics(labelled)


def evaluate_bags(
    model: MILModel,
    bags: Sequence[Bag],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    grade: Mapping[str, np.ndarray] | None = None,
) -> Evaluation:
    """Slide metrics with bootstrap CIs and pooled patch metrics over every bag with labels.

    Unlike ``evaluate_entries`` this takes bags already in memory, so one load of the test set
    serves every arm, and the bags' patch labels can be the generator's ground truth. With
    ``grade`` (patch grades by slide id, covering every bag with patch labels) it also scores
    low-grade against normal patches.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            preds = [predict_bag(model, bag) for bag in bags]
    finally:
        model.train(was_training)
    y = np.asarray([p.label for p in preds], dtype=np.int64)
    slide = slide_metrics(y, np.stack([p.probs for p in preds]), bootstrap=bootstrap, seed=seed)
    patches = [
        (p.patch_labels, p.patch_tumour_prob)
        for p in preds
        if p.patch_labels is not None and p.patch_tumour_prob is not None
    ]
    low_grade = None
    if grade is not None:
        low_grade = low_grade_patch_metrics(
            (grade[p.slide_id], p.patch_tumour_prob)
            for p in preds
            if p.patch_tumour_prob is not None
        )
    return Evaluation(slide, pooled_patch_metrics(patches), low_grade)


def train_config(base: TrainConfig, mode: str, seed: int) -> TrainConfig:
    """``base`` with this arm's supervision mode and seed."""
    supervision = SupervisionConfig.model_validate({**base.supervision.model_dump(), "mode": mode})
    return TrainConfig.model_validate(
        {**base.model_dump(), "seed": seed, "supervision": supervision}
    )


def run_arm(
    arm: Arm,
    seed: int,
    data: LoadedCohort,
    feature_dim: int,
    base: TrainConfig,
    *,
    bootstrap: int = 1000,
) -> RunResult:
    """Build ``arm``'s model from ``seed``, train it on ``data.train``, score ``data.test``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(ModelConfig(kind=arm.model, feature_dim=feature_dim))  # type: ignore[arg-type]
    began = time.perf_counter()
    result = train(model, data.train, data.val, train_config(base, arm.mode, seed))
    seconds = time.perf_counter() - began
    evaluation = evaluate_bags(
        result.model, data.test, bootstrap=bootstrap, seed=seed, grade=data.grade
    )
    return RunResult(
        arm, seed, evaluation, result.best_epoch, len(result.history), seconds, result.model
    )


def labelled_patches(bags: Sequence[Bag]) -> tuple[np.ndarray, np.ndarray]:
    """Features and 0/1 labels of every patch with a known label, over ``bags``."""
    xs, ys = [], []
    for bag in bags:
        if bag.patch_labels is None:
            continue
        labels = bag.patch_labels.numpy()
        keep = labels != -1
        xs.append(bag.features.numpy()[keep])
        ys.append(labels[keep].astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


@dataclass(frozen=True)
class LowGradeCeiling:
    """The feature space on low-grade tumour: test low-grade against normal patches."""

    high_grade_probe: PatchMetrics
    """A probe fitted on training-pool high-grade vs normal patches only: the tumour that
    slide labels point to, so about what weak supervision can be expected to reach here."""
    full_probe: PatchMetrics
    """The ceiling's probe (fitted on every labelled pool patch, low-grade ones included)."""
    n_train_patches: int
    """Pool patches the high-grade probe was fitted on."""


@dataclass(frozen=True)
class FeatureCeiling:
    """How separable tumour is in the feature space, given unlimited patch labels."""

    probe: PatchMetrics
    """A standardised logistic-regression probe fitted on every labelled training-pool patch,
    scored on the test patches."""
    n_train_patches: int
    best_dim: int
    best_dim_auc: float
    """Test AUC of the single feature dimension that separates the training pool best."""
    low_grade: LowGradeCeiling | None = None
    """None unless both the pool and the test set have low-grade patches."""


def _probe(x: np.ndarray, y: np.ndarray, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """A standardised logistic regression fitted on (``x``, ``y``): features → P(positive)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(x, y)
    return lambda features: probe.predict_proba(features)[:, 1]


def _has_low_grade(bags: Sequence[Bag], grade: Mapping[str, np.ndarray]) -> bool:
    return any((grade[b.entry.slide_id] == LOW_GRADE).any() for b in bags)


def _low_grade_ceiling(
    data: LoadedCohort, full_probs: Sequence[np.ndarray], seed: int
) -> LowGradeCeiling | None:
    """Both probes on test low-grade vs normal patches (``full_probs``: the full probe's
    tumour probabilities per test bag); None without low-grade patches in pool and test."""
    if not (_has_low_grade(data.probe_train, data.grade) and _has_low_grade(data.test, data.grade)):
        return None
    high_grade_bags = [
        _with_truth(b, grade_labels(data.grade[b.entry.slide_id], HIGH_GRADE))
        for b in data.probe_train
    ]
    x, y = labelled_patches(high_grade_bags)
    predict = _probe(x, y, seed)
    test_grade = [data.grade[b.entry.slide_id] for b in data.test]
    high = low_grade_patch_metrics(
        (g, predict(b.features.numpy())) for g, b in zip(test_grade, data.test, strict=True)
    )
    full = low_grade_patch_metrics(zip(test_grade, full_probs, strict=True))
    assert high is not None and full is not None  # the test set has low-grade patches
    return LowGradeCeiling(high, full, len(y))


def feature_ceiling(data: LoadedCohort, seed: int = 0) -> FeatureCeiling:
    """The upper bound a patch classifier can reach on these features (no MIL involved)."""
    from sklearn.metrics import roc_auc_score

    x, y = labelled_patches(data.probe_train)
    predict = _probe(x, y, seed)
    probs = [predict(bag.features.numpy()) for bag in data.test]
    slides = []
    for bag, prob in zip(data.test, probs, strict=True):
        assert bag.patch_labels is not None
        slides.append((bag.patch_labels.numpy().astype(np.int64), prob))
    train_auc = np.array([roc_auc_score(y, x[:, j]) for j in range(x.shape[1])])
    best = int(np.argmax(np.abs(train_auc - 0.5)))
    sign = 1.0 if train_auc[best] >= 0.5 else -1.0
    x_test, y_test = labelled_patches(data.test)
    best_auc = float(roc_auc_score(y_test, sign * x_test[:, best]))
    return FeatureCeiling(
        pooled_patch_metrics(slides),
        len(y),
        best,
        best_auc,
        _low_grade_ceiling(data, probs, seed),
    )


# ------------------------------------------------------------------------------- the table


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return statistics.fmean(finite), sd


@dataclass(frozen=True)
class ArmSummary:
    """An arm over its seeds: mean and sd of the metrics, median bootstrap CI bounds."""

    arm: Arm
    n_seeds: int
    slide_auc: tuple[float, float]
    slide_ci: tuple[float, float]
    patch_auc: tuple[float, float]
    low_grade_patch_auc: tuple[float, float] | None
    """None when the test set has no low-grade patches."""
    patch_ap: tuple[float, float]
    patch_dice: tuple[float, float]
    epochs: float
    seconds: float


def summarise(results: Sequence[RunResult]) -> list[ArmSummary]:
    """One summary per arm, in the order arms first appear."""
    arms = list(dict.fromkeys(r.arm for r in results))
    out = []
    for arm in arms:
        runs = [r for r in results if r.arm == arm]
        slides = [r.evaluation.slide.auc for r in runs]
        low_grade = [
            r.evaluation.low_grade_patch.auc
            for r in runs
            if r.evaluation.low_grade_patch is not None
        ]
        out.append(
            ArmSummary(
                arm=arm,
                n_seeds=len(runs),
                slide_auc=_mean_sd([m.value for m in slides]),
                slide_ci=(
                    statistics.median(m.low for m in slides),
                    statistics.median(m.high for m in slides),
                ),
                patch_auc=_mean_sd([r.evaluation.patch.auc for r in runs]),
                low_grade_patch_auc=_mean_sd(low_grade) if low_grade else None,
                patch_ap=_mean_sd([r.evaluation.patch.average_precision for r in runs]),
                patch_dice=_mean_sd([r.evaluation.patch.dice for r in runs]),
                epochs=statistics.fmean(r.epochs_run for r in runs),
                seconds=statistics.fmean(r.seconds for r in runs),
            )
        )
    return out


def _pm(value: tuple[float, float] | None) -> str:
    """Four decimals: near the ceiling, three would print every arm as 1.000."""
    return "n/a" if value is None else f"{value[0]:.4f} ± {value[1]:.4f}"


def format_table(summaries: Sequence[ArmSummary]) -> str:
    """Markdown table: the figures the README quotes."""
    lines = [
        "| model | supervision | seeds | slide AUC | slide AUC 95% CI | patch AUC "
        "| low-grade patch AUC | patch AP | patch Dice@0.5 | epochs | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.arm.model} | {s.arm.mode} | {s.n_seeds} | {_pm(s.slide_auc)} "
            f"| [{s.slide_ci[0]:.3f}, {s.slide_ci[1]:.3f}] | {_pm(s.patch_auc)} "
            f"| {_pm(s.low_grade_patch_auc)} | {_pm(s.patch_ap)} | {_pm(s.patch_dice)} "
            f"| {s.epochs:.0f} | {s.seconds:.0f} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class TargetCheck:
    name: str
    value: float
    target: str
    met: bool


def check_targets(summaries: Sequence[ArmSummary]) -> list[TargetCheck]:
    """Issue 3's targets per model: mixed slide AUC ≥ 0.95, mixed patch AUC ≥ 0.90, and mixed
    patch AUC ≥ weak patch AUC + 0.05 (means over seeds)."""
    by_arm = {(s.arm.model, s.arm.mode): s for s in summaries}
    checks = []
    for model in dict.fromkeys(s.arm.model for s in summaries):
        mixed, weak = by_arm.get((model, "mixed")), by_arm.get((model, "weak"))
        if mixed is None:
            continue
        slide, patch = mixed.slide_auc[0], mixed.patch_auc[0]
        checks.append(TargetCheck(f"{model} mixed slide AUC", slide, "≥ 0.95", slide >= 0.95))
        checks.append(TargetCheck(f"{model} mixed patch AUC", patch, "≥ 0.90", patch >= 0.90))
        if weak is not None:
            gain = patch - weak.patch_auc[0]
            checks.append(
                TargetCheck(f"{model} patch AUC mixed − weak", gain, "≥ 0.05", gain >= 0.05)
            )
    return checks


# ----------------------------------------------------------------------------------- main


ISSUE3_SHARES = {"site_a": 0.2, "site_b": 0.2, "site_c": 0.2}
"""Issue 3: 20 % of the training tumour slides outlined, at every hospital."""
ARMS = tuple(Arm(m, s) for m in ("clam_sb", "abmil") for s in ("weak", "mixed"))


def machine() -> str:
    """CPU model, usable cores and library versions: numbers mean little without them."""
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{model}; {usable} usable core(s) of {os.cpu_count()}; Python "
        f"{platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )


def describe(cohort: PreparedCohort, visible: frozenset[str]) -> list[str]:
    """Config lines: slides and patches per hospital and split, outlines training sees."""
    lines = []
    for h in cohort.hospitals:
        parts = []
        for split in ("train", "val", "test"):
            entries = getattr(h, split)
            tumour = sum(1 for e in entries if e.label == TUMOUR)
            patches = sum(e.num_patches for e in entries)
            parts.append(f"{split} {len(entries)} ({tumour} tumour, {patches:,} patches)")
        lines.append(f"  {h.name}: " + ", ".join(parts))
    lines += [f"  left out (preparation failed): {f}" for f in cohort.failed]
    shown, partial, tumour = annotated_share(cohort, visible)
    fractions = [cohort.tumour_fraction[e.slide_id] for e in cohort.entries("train")]
    positive = sorted(f for f in fractions if f > 0)
    lines.append(
        f"  training outlines visible: {shown} of {tumour} tumour slides "
        f"({shown / max(tumour, 1):.0%}; {partial} partial)"
    )
    shown_val, partial_val, tumour_val = annotated_share(cohort, visible, "val")
    if shown_val:
        lines.append(
            f"  validation outlines visible: {shown_val} of {tumour_val} tumour slides "
            f"({partial_val} partial), for the mixed arms' stopping loss"
        )
    if positive:
        lines.append(
            f"  tumour share of tissue on training tumour slides: {positive[0]:.3f} .. "
            f"{positive[-1]:.3f} (median {statistics.median(positive):.3f})"
        )
    low, high = cohort.spec.low_grade_share_range
    if high > 0:
        counts = []
        for name, splits in (("pool", ("train", "val")), ("test", ("test",))):
            grades = [cohort.grade[e.slide_id] for split in splits for e in cohort.entries(split)]
            n_high = sum(int((g == HIGH_GRADE).sum()) for g in grades)
            n_low = sum(int((g == LOW_GRADE).sum()) for g in grades)
            counts.append(f"{name} {n_high:,} high-grade / {n_low:,} low-grade patches")
        lines.append(
            f"  tumour heterogeneity: {low:.0%}-{high:.0%} of each tumour low-grade; "
            + ", ".join(counts)
        )
    normal = cohort.spec.mimic_share_range
    tumour = cohort.spec.tumour_slide_mimic_share_range or normal
    if max(normal[1], tumour[1]) > 0:
        lines.append(
            f"  benign mimic of low-grade tumour (ground truth: normal): {normal[0]:.0%}-"
            f"{normal[1]:.0%} of a normal slide's tissue, {tumour[0]:.0%}-{tumour[1]:.0%} of a "
            "tumour slide's non-tumour tissue"
        )
    return lines


def low_grade_text(metrics: PatchMetrics | None) -> str:
    """ ", low-grade patch AUC x" for a progress line; nothing on a uniform-tumour cohort."""
    return "" if metrics is None else f", low-grade patch AUC {metrics.auc:.4f}"


def _seed_line(r: RunResult) -> str:
    auc = r.evaluation.slide.auc
    patch = r.evaluation.patch
    return (
        f"  {r.arm.label:<14} seed {r.seed}: slide AUC {auc.value:.4f} "
        f"[{auc.low:.3f}, {auc.high:.3f}], patch AUC {patch.auc:.4f}"
        f"{low_grade_text(r.evaluation.low_grade_patch)}, AP "
        f"{patch.average_precision:.4f}, Dice {patch.dice:.4f}, best epoch {r.best_epoch}, "
        f"{r.epochs_run} epochs, {r.seconds:.0f} s"
    )


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny cohort, a few epochs")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds per arm")
    parser.add_argument("--encoder", default=None, help="encoder id (default efficientnet_lite0)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads for training (default 1)"
    )
    add_cohort_option(parser, default="low-grade")
    add_share_options(parser)
    args = parser.parse_args(argv)
    spec = QUICK_COHORT if args.quick else COHORTS[args.cohort]
    if args.encoder:
        spec = CohortSpec.model_validate({**spec.model_dump(), "encoder": args.encoder})
    spec = apply_parsed_shares(parser, spec, args)
    # One bag pair per step is far too small a job to split over cores: with 2 threads on a
    # shared 2-vCPU machine an epoch took 20-45 s instead of ~1 s (workers wait on each other).
    torch.set_num_threads(args.threads)
    n_seeds = args.seeds or (1 if args.quick else 3)
    base = TrainConfig(stopping_loss="patch")
    if args.quick:
        base = base.model_copy(update={"epochs": 4, "min_epochs": 0, "patience": 4})
    print("# fedpath accuracy benchmark" + (" (quick)" if args.quick else ""))
    print(f"machine: {machine()}")
    cohort = build_cohort(spec, log=print)
    visible = visible_annotations(cohort, ISSUE3_SHARES, spec.seed, splits=("train", "val"))
    print(
        f"cohort {spec.synth_key()} under {cohort.root}, encoder {spec.encoder} "
        f"({cohort.feature_dim}-d), seed {spec.seed}:"
    )
    for line in describe(cohort, visible):
        print(line)
    print(
        f"training: centralised (pooled hospitals), lr {base.lr:g}, ≤ {base.epochs} epochs, "
        "early stopping on the validation loss (weak: slide CE; mixed: patch CE of the "
        "outlined validation slides; patience "
        f"{base.patience} after epoch {base.min_epochs}), {n_seeds} seed(s) per arm"
    )
    data = load_cohort(cohort, visible)
    ceiling = feature_ceiling(data)
    probe = ceiling.probe
    print(
        f"feature-space ceiling: linear probe on the ground truth of {ceiling.n_train_patches:,} "
        f"labelled training-pool patches → test patch AUC {probe.auc:.4f}, AP "
        f"{probe.average_precision:.4f}; best single feature (dimension {ceiling.best_dim}, "
        f"chosen on the pool) → test patch AUC {ceiling.best_dim_auc:.4f}"
    )
    if ceiling.low_grade is not None:
        low = ceiling.low_grade
        print(
            f"  on test low-grade vs normal patches ({low.full_probe.n_tumour:,} low-grade): "
            f"that probe → AUC {low.full_probe.auc:.4f}; a probe fitted on the "
            f"{low.n_train_patches:,} high-grade and normal pool patches only (the tumour slide "
            f"labels point to: about what weak supervision can reach) → AUC "
            f"{low.high_grade_probe.auc:.4f}"
        )
    results = []
    for arm in ARMS:
        for seed in range(n_seeds):
            result = run_arm(arm, seed, data, cohort.feature_dim, base)
            print(_seed_line(result), flush=True)
            results.append(result)
    summaries = summarise(results)
    print(
        f"\n## test set: {len(data.test)} slides, {probe.n_labelled:,} labelled patches "
        f"({probe.n_tumour:,} tumour) "
        "(mean ± sd over seeds; CI: median of the per-seed bootstrap 95% CIs)\n"
    )
    print(format_table(summaries))
    print("\n## targets (issue 3)")
    checks = check_targets(summaries)
    for c in checks:
        print(f"  {c.name}: {c.value:.4f} (target {c.target}) {'met' if c.met else 'MISSED'}")
    return 0 if all(c.met for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
