"""Deterministic synthetic H&E whole-slide images with known ground truth, and cohorts of them.

The demo, the tests and the benchmarks need slides whose truth is known exactly (which
pixels are tumour, which slides are tumour, which outlines a pathologist drew) and which
behave like real slides for every stage downstream: OpenSlide opens them, tissue detection
finds the tissue, an ImageNet encoder separates tumour from stroma, sites differ in stain.
Everything is derived from one integer seed, so a slide is byte-for-byte reproducible.

Per slide (see ``generate_slide``)::

    slides/<id>.tiff            pyramidal JPEG TIFF, Aperio-style description (MPP, AppMag)
    masks/<id>_tissue.png       uint8 0/255 at ``mask_downsample`` level-0 px per mask px
    masks/<id>_tumour.png       same grid; all zero on a normal slide
    masks/<id>_low_grade.png    same grid: the tumour's subtle component (only when asked for)
    masks/<id>_mimic.png        same grid: benign mimic of it in normal tissue (when asked for)
    annotations/<id>.geojson    QuPath outlines of the (possibly partially) annotated tumour
    annotations/<id>.xml        the same outlines in ASAP / Camelyon16 XML

Per site of a cohort (see ``generate_cohort``): the above for every slide plus ``slides.csv``
(the ``fedpath prepare`` manifest) and ``ground_truth.csv``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import cv2
import numpy as np
from pydantic import AfterValidator, Field, field_validator, model_validator

from fedpath.client.wsi.annotations import write_asap_xml, write_qupath_geojson
from fedpath.common.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from fedpath.common.configbase import StrictModel
from fedpath.common.errors import ConfigError, SlideError
from fedpath.synthetic.masks import (
    low_grade_mask,
    make_tissue_mask,
    make_tumour_mask,
    mask_polygons,
    mimic_mask,
    partial_annotation_mask,
    smooth_noise,
    thickness_field,
)
from fedpath.synthetic.render import TUMOUR_NEST_SHARPNESS, build_scene
from fedpath.synthetic.stain import StainConfig, resolve_stain
from fedpath.synthetic.texture import TILE, build_banks
from fedpath.synthetic.tiff import write_pyramid

MANIFEST_COLUMNS = ("slide_id", "path", "label", "annotation", "annotation_complete", "patient_id")
GROUND_TRUTH_COLUMNS = (
    "slide_id",
    "label",
    "tissue_mask",
    "tumour_mask",
    "mask_downsample",
    "tumour_fraction",
    "level0_mpp",
)
MICRO_METASTASIS_FRACTION = 0.03
"""Below this tumour share of tissue a slide gets a single focus unless told otherwise."""
MAX_LOW_GRADE_SHARE = 0.9
"""Largest share of a tumour that may be low-grade: the rest is what slide labels can find."""
LOW_GRADE_AREA_UM = 128.0
"""Correlation length of the field that splits a tumour into low- and high-grade areas: one
patch of 256 px at 0.5 µm/px, so low-grade areas span a few patches."""
MAX_MIMIC_SHARE = 0.5
"""Largest share of a slide's non-tumour tissue that may be the benign mimic: normal tissue
stays mostly plain stroma, as it is on real slides."""
MIMIC_AREA_UM = 128.0
"""Correlation length of the field that places the mimic in normal tissue: areas a few patches
across, the size of the low-grade areas (``LOW_GRADE_AREA_UM``) they are to be confused with."""

MimicShare = Annotated[tuple[float, float], AfterValidator(lambda value: _mimic_range(value))]
"""A mimic share range, checked as ``mimic_share_range`` is (``_mimic_range``, defined with
the other range checks below)."""

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _stain(value: Any) -> Any:
    return resolve_stain(value) if isinstance(value, str) else value


def _check_downsample(value: int) -> int:
    if value < 4 or TILE % value or value & (value - 1):
        raise ValueError(f"mask_downsample must be a power of two in [4, {TILE}], got {value}")
    return value


def _check_bank(value: int) -> int:
    if value % TILE:
        raise ValueError(f"bank_size must be a multiple of {TILE}, got {value}")
    return value


class SynthRenderSettings(StrictModel):
    """How slides are rendered and stored; shared by single-slide and cohort configs."""

    mask_downsample: int = Field(16, description="level-0 px per ground-truth mask px")
    bank_size: int = Field(1024, ge=TILE, le=8192, description="texture bank side, px")
    jpeg_quality: int = Field(85, ge=30, le=100)
    workers: int = Field(2, ge=1, le=64, description="render threads (output does not depend)")

    @field_validator("mask_downsample")
    @classmethod
    def _valid_downsample(cls, value: int) -> int:
        return _check_downsample(value)

    @field_validator("bank_size")
    @classmethod
    def _valid_bank(cls, value: int) -> int:
        return _check_bank(value)


class SynthSlideConfig(SynthRenderSettings):
    """One synthetic slide: size, resolution, tissue and tumour geometry, stain, file options."""

    width_px: int = Field(8192, ge=256, le=250_000, description="level-0 width")
    height_px: int = Field(8192, ge=256, le=250_000, description="level-0 height")
    mpp: float = Field(0.5, gt=0.05, le=10, description="level-0 µm per pixel")
    objective_power: float | None = Field(
        None, gt=0, description="AppMag written to the file; None: 10 / mpp (20× at 0.5 µm/px)"
    )
    write_mpp: bool = Field(True, description="write MPP (description and resolution tags)")
    write_objective: bool = Field(True, description="write the objective power (AppMag)")
    tissue_fraction: float = Field(
        0.5, gt=0, le=0.85, description="share of the slide area covered by tissue"
    )
    tissue_pieces: int = Field(1, ge=1, le=8, description="number of separate tissue pieces")
    tumour_fraction: float = Field(
        0.0, ge=0, le=1, description="share of the tissue area that is tumour; 0: normal slide"
    )
    tumour_foci: int | None = Field(
        None,
        ge=1,
        le=32,
        description="seeds the tumour grows from; None: 1 for micro-metastases, else 1-3",
    )
    tumour_density_range: tuple[float, float] = Field(
        (1.0, 1.0),
        description="weight of the tumour texture inside tumour regions, varying smoothly "
        "between these bounds (1: solid tumour sheets; e.g. 0.3: tumour cells sparse in "
        "stroma, hard to tell from normal); the ground truth stays the whole region",
    )
    low_grade_share_range: tuple[float, float] = Field(
        (0.0, 0.0),
        description="share of the tumour rendered with the subtle low-grade morphology, drawn "
        "uniformly per slide between these bounds, in contiguous areas (0: none; at most "
        f"{MAX_LOW_GRADE_SHARE}, so every tumour keeps a conspicuous high-grade part); the "
        "ground truth stays the whole tumour",
    )
    mimic_share_range: tuple[float, float] = Field(
        (0.0, 0.0),
        description="share of the non-tumour tissue rendered as a benign mimic of the low-grade "
        "morphology (the same cords in stroma, benign nuclei), drawn uniformly per slide "
        "between these bounds, in contiguous areas, on normal and tumour slides alike (0: "
        f"none; at most {MAX_MIMIC_SHARE}); it is not tumour: the ground truth is unchanged",
    )
    tumour_slide_mimic_share_range: MimicShare | None = Field(
        None,
        description="the mimic's share range on tumour slides, when it differs (None: "
        "mimic_share_range): benign proliferative change is commoner in tumour-bearing "
        "tissue, a field effect slide labels cannot tell from the tumour itself",
    )
    annotate: bool = Field(True, description="write GeoJSON/XML outlines for a tumour slide")
    annotated_region_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of the tumour area outlined; < 1 makes the annotation partial",
    )
    stain: StainConfig = Field(
        default_factory=StainConfig, description="stain protocol or a preset name"
    )

    @field_validator("stain", mode="before")
    @classmethod
    def _resolve_stain(cls, value: Any) -> Any:
        return _stain(value)

    @field_validator("tumour_density_range")
    @classmethod
    def _density_bounds(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _density_range(value)

    @field_validator("low_grade_share_range")
    @classmethod
    def _low_grade_bounds(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _low_grade_range(value)

    @field_validator("mimic_share_range")
    @classmethod
    def _mimic_bounds(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _mimic_range(value)

    @property
    def resolved_objective(self) -> float:
        return self.objective_power if self.objective_power is not None else 10.0 / self.mpp


@dataclass(frozen=True)
class SynthSlide:
    """Where a generated slide and its ground truth were written, and what it contains."""

    slide_id: str
    slide_path: Path
    label: str
    tumour_mask_path: Path | None
    tissue_mask_path: Path
    mask_downsample: int
    geojson_path: Path | None
    asap_xml_path: Path | None
    tumour_fraction: float
    annotation_complete: bool | None = None
    level0_mpp: float = 0.5
    dimensions: tuple[int, int] = (0, 0)
    low_grade_mask_path: Path | None = None
    """The subtle tumour component (a subset of the tumour mask), when the slide has one."""
    mimic_mask_path: Path | None = None
    """The benign mimic (in the tissue, outside the tumour mask), when the slide has one."""


def _png(mask: np.ndarray, slide_id: str, what: str) -> bytes:
    ok, buf = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise SlideError(slide_id, f"PNG encoding of the {what} mask failed")
    return buf.tobytes()


def _optional_mask(out_dir: Path, slide_id: str, what: str, mask: np.ndarray | None) -> Path | None:
    """Write ``masks/<id>_<what>.png`` when the slide has that mask and return its path;
    otherwise remove a stale one of an earlier run of the same id (it would describe another
    slide) and return None."""
    path = out_dir / "masks" / f"{slide_id}_{what}.png"
    if mask is None:
        path.unlink(missing_ok=True)
        return None
    atomic_write_bytes(path, _png(mask, slide_id, what.replace("_", "-")))
    return path


def generate_slide(out_dir: Path, slide_id: str, cfg: SynthSlideConfig, seed: int) -> SynthSlide:
    """Generate one slide and its ground truth under ``out_dir`` (same seed → same bytes).

    The tumour mask is always written (all zero for a normal slide) so evaluation code can
    treat every slide alike. Outlines exist only for tumour slides with ``annotate``; stale
    outlines from an earlier run of the same id are removed.
    """
    if not _SAFE_ID.match(slide_id):
        raise ConfigError(f"slide id {slide_id!r} must be a safe file name ([A-Za-z0-9._-])")
    out_dir = Path(out_dir)
    ds = cfg.mask_downsample
    root = np.random.SeedSequence(seed)
    # spawn(n)'s children do not depend on n: adding a stream keeps every earlier slide's bytes.
    streams = root.spawn(9)
    s_tissue, s_tumour, s_thick, s_banks, s_views, s_partial, s_density, s_grade = streams[:8]
    s_mimic = streams[8]
    shape = (math.ceil(cfg.height_px / ds), math.ceil(cfg.width_px / ds))

    tissue = make_tissue_mask(
        np.random.default_rng(s_tissue), shape, cfg.tissue_fraction, cfg.tissue_pieces
    )
    tumour_rng = np.random.default_rng(s_tumour)
    foci = cfg.tumour_foci
    if foci is None:
        small = cfg.tumour_fraction < MICRO_METASTASIS_FRACTION
        foci = 1 if small else int(tumour_rng.integers(1, 4))
    tumour = make_tumour_mask(tumour_rng, tissue, cfg.tumour_fraction, foci)
    n_tissue = int(tissue.sum())
    realised = float(tumour.sum()) / n_tissue if n_tissue else 0.0
    is_tumour = bool(tumour.any())
    low_grade = None
    if is_tumour and cfg.low_grade_share_range[1] > 0:
        grade_rng = np.random.default_rng(s_grade)
        share = float(grade_rng.uniform(*cfg.low_grade_share_range))
        low_grade = low_grade_mask(grade_rng, tumour, share, LOW_GRADE_AREA_UM / (cfg.mpp * ds))
    mimic = None
    mimic_range = cfg.mimic_share_range
    if is_tumour and cfg.tumour_slide_mimic_share_range is not None:
        mimic_range = cfg.tumour_slide_mimic_share_range
    if mimic_range[1] > 0:
        mimic_rng = np.random.default_rng(s_mimic)
        share = float(mimic_rng.uniform(*mimic_range))
        mimic = mimic_mask(mimic_rng, tissue, tumour, share, MIMIC_AREA_UM / (cfg.mpp * ds))

    scene = build_scene(
        width=cfg.width_px,
        height=cfg.height_px,
        downsample=ds,
        tissue=tissue,
        tumour=tumour,
        thickness=thickness_field(np.random.default_rng(s_thick), shape),
        banks=build_banks(
            cfg.bank_size,
            cfg.mpp,
            s_banks,
            low_grade=low_grade is not None,
            mimic=mimic is not None,
        ),
        stain=cfg.stain,
        rng=np.random.default_rng(s_views),
        density=tumour_density(np.random.default_rng(s_density), shape, cfg.tumour_density_range),
        low_grade=low_grade,
        mimic=mimic,
    )
    slide_path = out_dir / "slides" / f"{slide_id}.tiff"
    write_pyramid(
        slide_path,
        cfg.width_px,
        cfg.height_px,
        scene.render_tile,
        background=cfg.stain.background_rgb,
        mpp=cfg.mpp if cfg.write_mpp else None,
        objective=cfg.resolved_objective if cfg.write_objective else None,
        quality=cfg.jpeg_quality,
        workers=cfg.workers,
    )
    tissue_path = out_dir / "masks" / f"{slide_id}_tissue.png"
    tumour_path = out_dir / "masks" / f"{slide_id}_tumour.png"
    atomic_write_bytes(tissue_path, _png(tissue, slide_id, "tissue"))
    atomic_write_bytes(tumour_path, _png(tumour, slide_id, "tumour"))
    low_grade_path = _optional_mask(out_dir, slide_id, "low_grade", low_grade)
    mimic_path = _optional_mask(out_dir, slide_id, "mimic", mimic)

    geojson_path = out_dir / "annotations" / f"{slide_id}.geojson"
    xml_path = out_dir / "annotations" / f"{slide_id}.xml"
    complete: bool | None = None
    if is_tumour and cfg.annotate:
        complete = cfg.annotated_region_fraction >= 1.0
        outlined = tumour
        if not complete:
            outlined = partial_annotation_mask(
                np.random.default_rng(s_partial), tumour, cfg.annotated_region_fraction
            )
        polygons = mask_polygons(outlined, ds)
        write_qupath_geojson(geojson_path, polygons)
        write_asap_xml(xml_path, polygons)
    else:
        geojson_path.unlink(missing_ok=True)
        xml_path.unlink(missing_ok=True)
    annotated = complete is not None
    return SynthSlide(
        slide_id=slide_id,
        slide_path=slide_path,
        label="tumour" if is_tumour else "normal",
        tumour_mask_path=tumour_path,
        tissue_mask_path=tissue_path,
        mask_downsample=ds,
        geojson_path=geojson_path if annotated else None,
        asap_xml_path=xml_path if annotated else None,
        tumour_fraction=realised,
        annotation_complete=complete,
        level0_mpp=cfg.mpp,
        dimensions=(cfg.width_px, cfg.height_px),
        low_grade_mask_path=low_grade_path,
        mimic_mask_path=mimic_path,
    )


# --------------------------------------------------------------------------------------------
# Cohorts
# --------------------------------------------------------------------------------------------


def _share_range(value: tuple[float, float], what: str, maximum: float) -> tuple[float, float]:
    lo, hi = _ordered(value)
    if not (lo >= 0 and hi <= maximum):
        raise ValueError(f"{what} share must lie in [0, {maximum}]; got {value}")
    return lo, hi


def _low_grade_range(value: tuple[float, float]) -> tuple[float, float]:
    return _share_range(value, "low-grade", MAX_LOW_GRADE_SHARE)


def _mimic_range(value: tuple[float, float]) -> tuple[float, float]:
    return _share_range(value, "mimic", MAX_MIMIC_SHARE)


def _density_range(value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = _ordered(value)
    if not (lo > 0 and hi <= 1):
        raise ValueError(f"tumour density must lie in (0, 1]; got {value}")
    return lo, hi


TUMOUR_DENSITY_SCALE = 12.0
"""Correlation length (mask px) of the tumour density: regions of ~1 mm at 16 µm/mask px."""
TUMOUR_CLUSTER_SCALE = 1.2
"""Correlation length (mask px) of the tumour-cell clusters: nests of ~40 µm at 16×."""


def _uniform_ranks(noise: np.ndarray) -> np.ndarray:
    """The field's values replaced by their rank in [0, 1]: an exactly uniform marginal."""
    flat = noise.ravel()
    ranks = np.empty(flat.size, dtype=np.float64)
    ranks[np.argsort(flat, kind="stable")] = np.arange(flat.size) / max(flat.size - 1, 1)
    return ranks.reshape(noise.shape)


def tumour_density(
    rng: np.random.Generator, shape: tuple[int, int], bounds: tuple[float, float]
) -> np.ndarray | None:
    """The renderer's cluster field for infiltrating tumour, or None for solid tumour.

    Tumour cells then sit in nests (a fine random field) scattered through the stroma, the
    nests covering a share ``D`` of the area, with ``D`` varying smoothly across the slide
    between ``bounds`` (uniform marginal, so sparse tumour is as common as dense). The
    returned field is ``D·(1 + 1/k) − C`` (``C`` the nest field, uniform in [0, 1], ``k`` the
    renderer's edge sharpness): positive inside a nest, and ≥ 1/k everywhere where D = 1,
    so solid regions stay solid.
    """
    lo, hi = bounds
    if lo == hi == 1.0:
        return None
    share = lo + (hi - lo) * _uniform_ranks(smooth_noise(rng, shape, TUMOUR_DENSITY_SCALE))
    nests = _uniform_ranks(smooth_noise(rng, shape, TUMOUR_CLUSTER_SCALE))
    return (share * (1.0 + 1.0 / TUMOUR_NEST_SHARPNESS) - nests).astype(np.float32)


def _ordered(value: tuple[Any, Any]) -> tuple[Any, Any]:
    if value[0] > value[1]:
        raise ValueError(f"range {value} is not ordered (low, high)")
    return value


class SynthSiteConfig(StrictModel):
    """One hospital of a synthetic cohort: how many slides, which labels, how annotated."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", description="site directory name")
    n_slides: int = Field(ge=1, le=10_000)
    tumour_share: float = Field(0.5, ge=0, le=1, description="share of slides that are tumour")
    annotated_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of tumour slides with tumour outlines (with split_shares: of the "
        "tumour slides of the train split)",
    )
    partial_share: float = Field(
        0.0, ge=0, le=1, description="share of annotated slides outlined only partially"
    )
    partial_region_fraction: float = Field(
        0.5, gt=0, lt=1, description="share of tumour area outlined on a partial slide"
    )
    stain: StainConfig = Field(default_factory=StainConfig, description="stain or preset name")
    width_range: tuple[int, int] = (5120, 7168)
    height_range: tuple[int, int] = (4096, 6144)
    tissue_fraction_range: tuple[float, float] = (0.35, 0.6)
    tissue_pieces_range: tuple[int, int] = (1, 3)
    tumour_fraction_range: tuple[float, float] = Field(
        (0.02, 0.5), description="tumour share of tissue on tumour slides, drawn log-uniformly"
    )
    tumour_density_range: tuple[float, float] = Field(
        (1.0, 1.0), description="bounds of the tumour texture weight (see SynthSlideConfig)"
    )
    low_grade_share_range: tuple[float, float] = Field(
        (0.0, 0.0), description="bounds of the low-grade share of tumour (see SynthSlideConfig)"
    )
    mimic_share_range: tuple[float, float] = Field(
        (0.0, 0.0),
        description="bounds of the benign mimic's share of non-tumour tissue (see "
        "SynthSlideConfig)",
    )
    tumour_slide_mimic_share_range: MimicShare | None = Field(
        None,
        description="those bounds on tumour slides, when they differ (see SynthSlideConfig)",
    )
    mpp: float = Field(0.5, gt=0.05, le=10, description="level-0 µm per pixel")
    seed_offset: int = Field(0, ge=0, description="decorrelates sites generated from one seed")
    slides_per_patient: int = Field(1, ge=1, description="consecutive slides share a patient")
    split_shares: tuple[float, float] | None = Field(
        None,
        description="(train, val) shares of each label's patients, the rest is the test split, "
        "written to the manifest's split column; None: no split column (training then makes "
        "k folds)",
    )
    outline_test: bool = Field(
        False,
        description="outline every tumour slide of the test split completely, the ground truth "
        "patch AUC is measured on (test slides are never trained on); needs split_shares",
    )

    @field_validator("stain", mode="before")
    @classmethod
    def _resolve_stain(cls, value: Any) -> Any:
        return _stain(value)

    @field_validator(
        "width_range",
        "height_range",
        "tissue_fraction_range",
        "tissue_pieces_range",
        "tumour_fraction_range",
    )
    @classmethod
    def _ordered_range(cls, value: tuple[Any, Any]) -> tuple[Any, Any]:
        return _ordered(value)

    @field_validator("tumour_density_range")
    @classmethod
    def _density_bounds(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _density_range(value)

    @field_validator("low_grade_share_range")
    @classmethod
    def _low_grade_bounds(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _low_grade_range(value)

    @field_validator("mimic_share_range")
    @classmethod
    def _mimic_bounds(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _mimic_range(value)

    @field_validator("split_shares")
    @classmethod
    def _split_bounds(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not (0 < value[0] <= 1 and 0 <= value[1] <= 1 - value[0]):
            raise ValueError(
                f"split_shares {value} must be (train, val) with train > 0 and train + val <= 1"
            )
        return value

    @model_validator(mode="after")
    def _physical_ranges(self) -> SynthSiteConfig:
        if self.outline_test and self.split_shares is None:
            raise ValueError("outline_test needs split_shares: without them no slide is test")
        if self.width_range[0] < TILE or self.height_range[0] < TILE:
            raise ValueError(f"slides must be at least {TILE} px on each side")
        if not (self.tissue_fraction_range[0] > 0 and self.tissue_fraction_range[1] <= 0.85):
            raise ValueError("tissue_fraction_range must lie in (0, 0.85]")
        if not (self.tumour_fraction_range[0] > 0 and self.tumour_fraction_range[1] <= 1):
            raise ValueError("tumour_fraction_range must lie in (0, 1]")
        if self.tissue_pieces_range[0] < 1 or self.tissue_pieces_range[1] > 8:
            raise ValueError("tissue_pieces_range must lie in [1, 8]")
        return self


DEFAULT_SITES: tuple[SynthSiteConfig, ...] = (
    SynthSiteConfig(
        name="site_a",
        n_slides=12,
        annotated_share=0.3,
        partial_share=0.5,
        stain="reference",
        seed_offset=0,
    ),
    SynthSiteConfig(name="site_b", n_slides=12, stain="purple", seed_offset=1),
    SynthSiteConfig(
        name="site_c",
        n_slides=6,
        stain="pale",
        width_range=(4096, 6144),
        height_range=(4096, 5120),
        seed_offset=2,
    ),
)
"""The reference three-hospital cohort: site A has outlines for 30 % of its tumour slides
(half of them partial), B and C give slide labels only, C is the smallest; each site has its
own stain protocol. About 150-300 patches of 256 px at 0.5 µm/px per slide."""


class SynthCohortConfig(SynthRenderSettings):
    """A multi-site synthetic cohort; settings below the site list apply to every slide."""

    sites: tuple[SynthSiteConfig, ...] = DEFAULT_SITES

    @model_validator(mode="after")
    def _unique_sites(self) -> SynthCohortConfig:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        if not names:
            raise ValueError("a cohort needs at least one site")
        return self


@dataclass(frozen=True)
class SlidePlan:
    """One slide of a site, fully decided before anything is rendered."""

    slide_id: str
    patient_id: str
    config: SynthSlideConfig
    seed: int
    split: str | None = None
    """train, val or test when the site has ``split_shares`` (the manifest's split column)."""


def _choose(rng: np.random.Generator, pool: np.ndarray, share: float) -> set[int]:
    count = round(share * len(pool))
    return {int(i) for i in rng.choice(pool, size=count, replace=False)} if count else set()


def plan_splits(
    site: SynthSiteConfig, shares: tuple[float, float], tumour: set[int], seed: int
) -> list[str]:
    """train/val/test per slide (``shares`` of train and val, the rest test): whole patients,
    stratified by whether a patient has a tumour slide, from a random stream of their own
    (the other draws of the site do not move)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, site.seed_offset, 2]))
    n_patients = math.ceil(site.n_slides / site.slides_per_patient)
    slides = [
        range(p * site.slides_per_patient, min((p + 1) * site.slides_per_patient, site.n_slides))
        for p in range(n_patients)
    ]
    with_tumour = [any(i in tumour for i in s) for s in slides]
    split = [""] * site.n_slides
    train_share, val_share = shares
    for group in (True, False):
        patients = [p for p in range(n_patients) if with_tumour[p] == group]
        order = [patients[j] for j in rng.permutation(len(patients))]
        n_train = min(len(order), max(1, round(train_share * len(order)))) if order else 0
        n_val = min(len(order) - n_train, round(val_share * len(order)))
        for rank, patient in enumerate(order):
            name = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            for i in slides[patient]:
                split[i] = name
    return split


def plan_site(site: SynthSiteConfig, cohort: SynthCohortConfig, seed: int) -> list[SlidePlan]:
    """Decide every slide of a site up front, so one slide's failure cannot shift the others.

    With ``split_shares`` the outlines follow the split: ``annotated_share`` (and the partial
    ones among them) of the train split's tumour slides, and with ``outline_test`` complete
    outlines on every tumour slide of the test split; validation slides get none.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, site.seed_offset, 0]))
    n = site.n_slides
    everyone = np.arange(n)
    tumour = _choose(rng, everyone, site.tumour_share)
    shares = site.split_shares
    splits = None if shares is None else plan_splits(site, shares, tumour, seed)
    trainable = tumour if splits is None else {i for i in tumour if splits[i] == "train"}
    annotated = _choose(rng, np.array(sorted(trainable), dtype=int), site.annotated_share)
    partial = _choose(rng, np.array(sorted(annotated), dtype=int), site.partial_share)
    if splits is not None and site.outline_test:
        annotated |= {i for i in tumour if splits[i] == "test"}
    lo, hi = site.tumour_fraction_range
    plans = []
    for i in range(n):
        fraction = 0.0
        if i in tumour:
            fraction = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        slide_cfg = SynthSlideConfig(
            width_px=int(rng.integers(site.width_range[0], site.width_range[1] + 1)),
            height_px=int(rng.integers(site.height_range[0], site.height_range[1] + 1)),
            mpp=site.mpp,
            tissue_fraction=float(rng.uniform(*site.tissue_fraction_range)),
            tissue_pieces=int(
                rng.integers(site.tissue_pieces_range[0], site.tissue_pieces_range[1] + 1)
            ),
            tumour_fraction=fraction,
            tumour_density_range=site.tumour_density_range,
            low_grade_share_range=site.low_grade_share_range,
            mimic_share_range=site.mimic_share_range,
            tumour_slide_mimic_share_range=site.tumour_slide_mimic_share_range,
            annotate=i in annotated,
            annotated_region_fraction=site.partial_region_fraction if i in partial else 1.0,
            stain=site.stain,
            mask_downsample=cohort.mask_downsample,
            bank_size=cohort.bank_size,
            jpeg_quality=cohort.jpeg_quality,
            workers=cohort.workers,
        )
        slide_seed = int(
            np.random.SeedSequence([seed, site.seed_offset, 1, i]).generate_state(1)[0]
        )
        plans.append(
            SlidePlan(
                slide_id=f"{site.name}_{i:03d}",
                patient_id=f"{site.name}_p{i // site.slides_per_patient:03d}",
                config=slide_cfg,
                seed=slide_seed,
                split=None if splits is None else splits[i],
            )
        )
    return plans


def _csv(rows: list[dict[str, str]], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _rel(path: Path | None, base: Path) -> str:
    return "" if path is None else path.relative_to(base).as_posix()


def _remove_stale(site_dir: Path, keep: set[Path]) -> None:
    """Delete generator outputs of slides that are no longer part of the site."""
    patterns = {
        "slides": ("*.tiff",),
        "masks": ("*_tissue.png", "*_tumour.png", "*_low_grade.png", "*_mimic.png"),
        "annotations": ("*.geojson", "*.xml"),
    }
    for sub, globs in patterns.items():
        for pattern in globs:
            for path in (site_dir / sub).glob(pattern):
                if path not in keep:
                    path.unlink()


SlideCallback = Callable[[SynthSlide], None]
"""Called after each generated slide (progress display); library code stays silent."""


def generate_site(
    site_dir: Path,
    site: SynthSiteConfig,
    cohort: SynthCohortConfig,
    seed: int,
    on_slide: SlideCallback | None = None,
) -> list[SynthSlide]:
    """Generate one site's slides, manifest (slides.csv) and ground_truth.csv."""
    site_dir = Path(site_dir)
    slides = []
    for plan in plan_site(site, cohort, seed):
        slide = generate_slide(site_dir, plan.slide_id, plan.config, plan.seed)
        slides.append((plan, slide))
        if on_slide is not None:
            on_slide(slide)
    manifest, truth = [], []
    keep: set[Path] = set()
    for plan, s in slides:
        keep.update(
            p
            for p in (
                s.slide_path,
                s.tissue_mask_path,
                s.tumour_mask_path,
                s.geojson_path,
                s.asap_xml_path,
                s.low_grade_mask_path,
                s.mimic_mask_path,
            )
            if p is not None
        )
        complete = "" if s.annotation_complete is None else str(s.annotation_complete).lower()
        manifest.append(
            {
                "slide_id": s.slide_id,
                "path": _rel(s.slide_path, site_dir),
                "label": s.label,
                "annotation": _rel(s.geojson_path, site_dir),
                "annotation_complete": complete,
                "patient_id": plan.patient_id,
                **({} if plan.split is None else {"split": plan.split}),
            }
        )
        truth.append(
            {
                "slide_id": s.slide_id,
                "label": s.label,
                "tissue_mask": _rel(s.tissue_mask_path, site_dir),
                "tumour_mask": _rel(s.tumour_mask_path, site_dir),
                "mask_downsample": str(s.mask_downsample),
                "tumour_fraction": f"{s.tumour_fraction:.6f}",
                "level0_mpp": f"{s.level0_mpp:g}",
            }
        )
    _remove_stale(site_dir, keep)
    split_column = ("split",) if site.split_shares is not None else ()
    atomic_write_text(site_dir / "slides.csv", _csv(manifest, MANIFEST_COLUMNS + split_column))
    atomic_write_text(site_dir / "ground_truth.csv", _csv(truth, GROUND_TRUTH_COLUMNS))
    return [s for _, s in slides]


def generate_cohort(
    out_dir: Path, cfg: SynthCohortConfig, seed: int, on_slide: SlideCallback | None = None
) -> list[Path]:
    """Generate every site under ``out_dir/<site name>``; return the site directories.

    ``cohort.json`` records the config and seed, so the cohort can be regenerated exactly.
    """
    out_dir = Path(out_dir)
    site_dirs = []
    for site in cfg.sites:
        site_dir = out_dir / site.name
        generate_site(site_dir, site, cfg, seed, on_slide)
        site_dirs.append(site_dir)
    atomic_write_json(
        out_dir / "cohort.json", {"seed": seed, "config": cfg.model_dump(mode="json")}
    )
    return site_dirs
