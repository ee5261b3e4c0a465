"""Typed settings of the hospital-side preparation pipeline (DESIGN §4.1–4.2).

Each stage has its own small model so a stage's function takes only what it uses; the
``PrepareConfig`` bundles them and is what gets hashed into every output's ``config_sha256``.
Defaults are the reference design's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fedpath.common.configbase import StrictModel
from fedpath.common.device_name import DEVICE_HELP, DeviceName

DEFAULT_TUMOUR_CLASSES: tuple[str, ...] = (
    "Tumor",
    "Tumour",
    "Carcinoma",
    "Metastasis",
    "metastases",
    "_0",
    "_1",
)
"""Annotation class / group names counted as tumour (compared case-insensitively).

QuPath's built-in class is "Tumor"; Camelyon16 ASAP files use groups "_0" and "_1" for tumour
and "_2" for exclusions, Camelyon17 files the group "metastases". The name "Unclassified"
stands for outlines without a class (QuPath) or group (ASAP's "None")."""

DEFAULT_EXCLUSION_CLASSES: tuple[str, ...] = ("_2", "Exclusion", "Exclude", "Ignore")
"""Regions cut out of the tumour outlines (Camelyon16's group "_2")."""

DEFAULT_OTHER_CLASSES: tuple[str, ...] = (
    "Stroma",
    "Immune cells",
    "Necrosis",
    "Other",
    "Region*",
    "Ignore*",
    "Positive",
    "Negative",
    "Tissue",
)
"""Classes known not to be tumour (QuPath's built-in list, and "Tissue" of tissue detection):
their outlines are ignored like those of any non-tumour class, but they are not reported as
unknown classes in ``status/<id>.json``."""

UNCLASSIFIED = "Unclassified"
"""How outlines without a class are named in settings and reports (QuPath's own word)."""


class ResolutionConfig(StrictModel):
    """Physical resolution of the patches fed to the encoder."""

    target_mpp: float = Field(0.5, gt=0, le=16, description="µm per pixel of extracted patches")
    patch_size: int = Field(256, ge=16, le=4096, description="patch side in pixels at target_mpp")
    overlap: int = Field(0, ge=0, description="overlap between neighbouring patches, in pixels")
    level_tolerance: float = Field(
        0.1,
        ge=0,
        lt=1,
        description=(
            "a pyramid level counts as matching target_mpp when its mpp is within this relative "
            "tolerance; otherwise the next finer level is read and resized"
        ),
    )

    @model_validator(mode="after")
    def _overlap_smaller_than_patch(self) -> ResolutionConfig:
        if self.overlap >= self.patch_size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than patch_size")
        return self

    @property
    def step(self) -> int:
        """Grid step in pixels at target_mpp."""
        return self.patch_size - self.overlap


class TissueConfig(StrictModel):
    """CLAM-style saturation thresholding, evaluated on a low-resolution level."""

    seg_downsample: float = Field(64.0, ge=1, description="wanted downsample of the mask level")
    median_kernel: int = Field(7, ge=1, description="median blur kernel (odd), mask-level px")
    saturation_threshold: int = Field(8, ge=0, le=255)
    use_otsu: bool = False
    closing_px: int = Field(4, ge=0, description="morphological closing kernel, mask-level px")
    min_tissue_area: float = Field(
        100.0,
        ge=0,
        description=(
            "a_t: components of at least a_t·512² level-0 px are always kept (CLAM's rule); "
            "with min_tissue_area_relative = 0, smaller ones are dropped"
        ),
    )
    min_tissue_area_relative: float = Field(
        0.01,
        ge=0,
        le=1,
        description=(
            "also keep a component of at least this share of the slide's largest one, so a "
            "biopsy or a small region is not dropped whole as debris; 0: CLAM's absolute a_t "
            "only"
        ),
    )
    min_tissue_area_floor: float = Field(
        1.0,
        ge=0,
        description=(
            "the relative rule never keeps a component below this·512² level-0 px (CLAM's "
            "biopsy a_t): on glass with a speck of dust the speck is not the slide's tissue"
        ),
    )
    max_hole_area: float = Field(
        16.0, ge=0, description="a_h: fill holes smaller than a_h·512² level-0 px"
    )
    min_tissue_fraction: float = Field(
        0.25, ge=0, le=1, description="keep a patch when this share of it is tissue"
    )

    @model_validator(mode="after")
    def _odd_kernel(self) -> TissueConfig:
        if self.median_kernel % 2 == 0:
            raise ValueError(f"median_kernel must be odd, got {self.median_kernel}")
        return self

    def min_component_px(self, largest_px: float, px_per_ref_area: float) -> float:
        """Smallest component area kept, in mask px, given the largest component's area.

        ``min(a_t·512², max(relative·largest, floor·512²))``: on a resection whose largest
        piece is at least a_t·512²/relative this is CLAM's a_t exactly; on a biopsy or a small
        region the threshold shrinks with the tissue, so the specimen itself is never called
        debris; the floor keeps a lone speck on empty glass from passing for tissue.
        """
        absolute = self.min_tissue_area * px_per_ref_area
        if self.min_tissue_area_relative == 0:
            return absolute
        floor = self.min_tissue_area_floor * px_per_ref_area
        return min(absolute, max(self.min_tissue_area_relative * largest_px, floor))

    @classmethod
    def preset(cls, name: Literal["default", "biopsy"]) -> TissueConfig:
        """Named presets: ``biopsy`` keeps every fragment of at least 512² px (a_t = 1, no
        relative rule), as CLAM's biopsy preset does."""
        if name == "biopsy":
            return cls(min_tissue_area=1.0, min_tissue_area_relative=0.0)
        return cls()


class AnnotationConfig(StrictModel):
    """How tumour outlines become per-patch labels (DESIGN §3)."""

    tumour_classes: tuple[str, ...] = Field(
        DEFAULT_TUMOUR_CLASSES,
        min_length=1,
        description=(
            "class/group names whose outlines are tumour (case-insensitive; 'Unclassified' "
            "means outlines without a class)"
        ),
    )
    exclusion_classes: tuple[str, ...] = Field(
        DEFAULT_EXCLUSION_CLASSES, description="class/group names cut out of the tumour region"
    )
    other_classes: tuple[str, ...] = Field(
        DEFAULT_OTHER_CLASSES,
        description="classes known not to be tumour: ignored without being reported as unknown",
    )
    on_no_tumour_region: Literal["fail", "slide_label_only"] = Field(
        "fail",
        description=(
            "a slide labelled other than the first label whose annotation holds no tumour "
            "region: fail it, or prepare it without patch labels (slide label only)"
        ),
    )
    positive_fraction: float = Field(
        0.5, gt=0, le=1, description="tumour fraction at or above which a patch is labelled 1"
    )
    negative_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "tumour fraction at or below which a patch is labelled 0 (only when the annotation "
            "is complete; otherwise unannotated patches are -1)"
        ),
    )
    raster_px_per_patch: int = Field(
        32, ge=4, le=512, description="rasterisation resolution: mask pixels along a patch side"
    )

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> AnnotationConfig:
        if self.negative_fraction >= self.positive_fraction:
            raise ValueError("negative_fraction must be below positive_fraction")
        return self

    @model_validator(mode="after")
    def _disjoint_classes(self) -> AnnotationConfig:
        """A name both tumour and exclusion would make an outline cut itself out: refused.
        ``other_classes`` only silences the unknown-class report, so the other lists win."""
        for name in ("tumour_classes", "exclusion_classes", "other_classes"):
            if any(not v.strip() for v in getattr(self, name)):
                raise ValueError(f"{name} holds an empty name")
        tumour = {c.strip().lower() for c in self.tumour_classes}
        both = [c for c in self.exclusion_classes if c.strip().lower() in tumour]
        if both:
            raise ValueError(
                f"class(es) {', '.join(repr(c) for c in both)} in both tumour_classes and "
                "exclusion_classes"
            )
        return self


class EmbeddingConfig(StrictModel):
    """Which encoder embeds the patches and how the pipeline runs it."""

    encoder: str = Field("efficientnet_lite0", description="registry id or path to a checkpoint")
    weights_path: Path | None = Field(
        None,
        description=(
            "local weights file or downloaded snapshot folder, for encoders whose weights are "
            "not packaged"
        ),
    )
    batch_size: int = Field(
        8,
        ge=1,
        le=4096,
        description=("patches per encoder call (on a GPU, unless set: sized to its free memory)"),
    )
    reader_threads: int = Field(
        2, ge=1, le=256, description="patch readers (on a GPU, unless set: every core but one)"
    )
    readers: Literal["auto", "threads", "processes"] = Field(
        "auto",
        description=(
            "how readers run: threads beside a CPU encoder (they share its cores), worker "
            "processes beside a GPU on ≥ 4 cores (auto), so reading keeps the GPU fed"
        ),
    )
    queue_batches: int = Field(8, ge=1, le=64, description="bounded read-ahead, in batches")
    device: DeviceName = Field("auto", description=DEVICE_HELP)
    backend: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto",
        description=(
            "inference engine on the CPU: auto measures PyTorch, ONNX Runtime and OpenVINO once "
            "per machine and encoder and keeps the fastest whose features stay within cosine "
            "0.999 of PyTorch float32; GPUs always run PyTorch"
        ),
    )
    export_cache: Path | None = Field(
        None,
        description=(
            "folder for exported encoder graphs and the per-machine backend choice "
            "(default: $FEDPATH_CACHE_DIR, else $XDG_CACHE_HOME/fedpath, else ~/.cache/fedpath)"
        ),
    )
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description=(
            "auto: on a CPU, bfloat16 autocast when the CPU supports it natively; on a GPU its "
            "native low precision (bfloat16, else float16); kept only when features stay "
            "within cosine similarity min_bf16_cosine of float32, else float32"
        ),
    )
    min_bf16_cosine: float = Field(0.999, gt=0, le=1)
    feature_dtype: Literal["float32", "float16"] = "float32"
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads (default: all)")
    jit: bool = Field(
        True,
        description=(
            "trace and freeze the encoder (TorchScript) before extraction; eager PyTorch "
            "when the model cannot be traced faithfully"
        ),
    )


class PrepareConfig(StrictModel):
    """Everything that determines a prepared site's outputs; hashed into each feature file."""

    resolution: ResolutionConfig = ResolutionConfig()
    tissue: TissueConfig = TissueConfig()
    annotation: AnnotationConfig = AnnotationConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    labels: tuple[str, ...] = Field(
        ("normal", "tumour"), min_length=2, description="allowed slide label names, in order"
    )
    write_qc: bool = True
    patch_only: bool = Field(
        False,
        description=(
            "segment, cut patches, label them and draw QC, but embed nothing: the patch files "
            "(patches/<slide_id>.h5) are for another tool, or a later run without patch_only "
            "embeds them without cutting again"
        ),
    )
