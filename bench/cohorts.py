"""The synthetic cohorts the accuracy benchmarks run on, and the options that choose them.

A cohort spec is everything a generated and prepared cohort depends on, so it is also its
cache key. Why each cohort looks as it does, and what it showed, is in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

from pydantic import Field, ValidationError

from fedpath.client.config import EmbeddingConfig, PrepareConfig, TissueConfig
from fedpath.common.configbase import StrictModel
from fedpath.common.hashing import sha256_json
from fedpath.synthetic.slides import SynthCohortConfig, SynthSiteConfig

ROOT = Path(__file__).resolve().parents[1]
CACHE_LAYOUT = 1
"""Bumped when the cache layout or the way a cohort is derived from its spec changes."""
GENERATOR = ROOT / "synthetic"
GENERATOR_SOURCES = ("slides.py", "masks.py", "render.py", "stain.py", "texture.py", "tiff.py")
"""The slide generator's modules: their bytes are part of the cache key, so retuning a
texture constant regenerates the cohort instead of reusing stale slides."""
LABELS = ("normal", "tumour")
TUMOUR = LABELS.index("tumour")
LOW_GRADE_SHARE = (0.4, 0.8)
"""The field-effect cohort's share of each tumour rendered low-grade."""
MIMIC_SHARE = (0.0, 0.0)
"""The field-effect cohort's share of a normal slide's tissue rendered as the benign mimic of
low-grade tumour: none (bench/README.md says what mimics on normal slides did)."""
TUMOUR_SLIDE_MIMIC_SHARE = (0.3, 0.5)
"""The mimic's share of the non-tumour tissue of a tumour slide: benign change that goes with
the carcinoma (a field effect), which slide labels cannot tell from low-grade tumour."""


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
        description="share of a tumour region covered by tumour nests (1: solid sheets)",
    )
    low_grade_share_range: tuple[float, float] = Field(
        (0.0, 0.0),
        description="share of each tumour rendered with the subtle low-grade morphology, "
        "the rest conspicuous high-grade",
    )
    mimic_share_range: tuple[float, float] = Field(
        (0.0, 0.0),
        description="share of every slide's non-tumour tissue rendered as a benign mimic of "
        "the low-grade morphology (ground truth: normal)",
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
    return sha256_json(
        {
            name: hashlib.sha256((GENERATOR / name).read_bytes()).hexdigest()
            for name in GENERATOR_SOURCES
        }
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
"""The field-effect cohort: 90 pool slides (72 train + 18 validation) and 40 test slides, half
tumour everywhere, tumours 40-80 % low-grade, the mimic on tumour slides only."""

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
"""Issue 4's default: small (1-30 %), mostly low-grade tumours and the benign mimic on every
slide, so the slide task itself needs data; site C (12 pool slides) is the small hospital."""

LOW_GRADE_COHORT = CohortSpec.model_validate(
    {**FULL_COHORT.model_dump(), "low_grade_share_range": (0.8, 0.9)}
)
"""Issue 3's default: FULL_COHORT's slides with tumours 80-90 % low-grade instead of 40-80 %,
so the slide labels point at the mimic as much as at the low-grade tumour."""

COHORTS = {"field-effect": FULL_COHORT, "subtle": SUBTLE_COHORT, "low-grade": LOW_GRADE_COHORT}
"""The full-size cohorts by their ``--cohort`` name."""

PRIVACY_COHORT = CohortSpec(
    hospitals=tuple(
        HospitalSpec(
            name=name,
            stain=stain,
            n_pool=n_pool,
            n_test=n_test,
            width_range=(2048, 2560),
            height_range=(2048, 2560),
        )
        for name, stain, n_pool, n_test in (
            ("site_a", "reference", 250, 20),
            ("site_b", "purple", 250, 20),
            ("site_c", "pale", 125, 10),
        )
    ),
    tumour_fraction_range=(0.05, 0.8),
    bank_size=512,
)
"""The privacy benchmark's cohort, at the size DP-SGD is meant for (DESIGN §4.5): 200 / 200 /
100 training slides of ~45 patches; tumour at least 5 % of the tissue, so a slide label is
always shown by some patch."""


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


def held_out_site(name: str) -> str:
    """The generator site that holds hospital ``name``'s held-out test slides."""
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
                name=held_out_site(h.name), n_slides=h.n_test, seed_offset=2 * i + 1, **shared
            )
        )
    return SynthCohortConfig(sites=tuple(sites), bank_size=spec.bank_size)
