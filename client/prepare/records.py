"""What a preparation run reports: one record per slide and a summary for the site.

Records are plain data so the CLI can render them and tests can assert on them; they are also
written to ``status/<slide_id>.json`` so an IT admin can see, after an unattended overnight run,
exactly which slides failed and why without re-running anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

SlideState = Literal["done", "reused", "failed"]
"""What this run did with a slide: prepared it, reused its finished outputs, or failed it. A
reused slide's status file keeps ``state: done`` and the record of the run that prepared it."""

SITE_FILE = "site.json"
"""Aggregate facts of a prepared site (what the server's harmonisation check compares)."""
INDEX_FILE = "prepared.csv"
"""The local slide index training reads: one row per usable slide."""
PATCH_INDEX_FILE = "patches.csv"
"""A patch-only run's slide index: one row per slide cut, with its patch file."""
INDEX_COLUMNS = (
    "slide_id",
    "label",
    "split",
    "patient_id",
    "annotation_complete",
    "has_patch_labels",
    "num_patches",
    "features",
)


@dataclass(frozen=True)
class SlideRecord:
    """Outcome of preparing one slide."""

    slide_id: str
    state: SlideState
    reason: str | None = None
    stage: str | None = None
    num_patches: int = 0
    tumour_patches: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    mpp: float | None = None
    mpp_source: str | None = None
    has_patch_labels: bool = False
    """The feature bag holds patch labels (an annotation may give none: ``annotation``)."""
    annotation: dict[str, Any] | None = None
    """What the slide's annotation held (classes found, unknown classes, outlines ignored)
    and whether it labelled the patches; None without annotation."""
    embedded: bool = True
    """False for a patch-only run: the slide was cut and labelled, no feature bag made."""
    reused: tuple[str, ...] = ()
    """Stages taken from an earlier run instead of redone: ``patches`` (segmentation, patching
    and labels read from the patch file) and ``features`` (the feature bag)."""
    patches_prepared_at: str | None = None
    """When the reused patch file was cut (``reused`` holds ``patches``, state ``done``)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PrepareSummary:
    """Outcome of ``prepare_site``."""

    out_dir: Path
    records: tuple[SlideRecord, ...]
    encoder: str
    precision: str
    bf16_cosine: float | None
    seconds: float
    embed_seconds: float
    site_error: str | None = None
    """Why ``prepared.csv`` / ``site.json`` could not be written (the run then exits 1)."""
    inference: str = ""
    """How the encoder ran: engine, device, precision, batch (``InferencePlan.describe``)."""
    inference_notes: tuple[str, ...] = ()
    """What deciding it did: an export, a measurement, an engine refused by the cosine gate."""
    patch_only: bool = False
    """The run cut patches only (``patches.csv``, no feature bags, no ``site.json``)."""

    def count(self, state: SlideState) -> int:
        return sum(1 for r in self.records if r.state == state)

    @property
    def failed(self) -> tuple[SlideRecord, ...]:
        return tuple(r for r in self.records if r.state == "failed")

    @property
    def embedded_patches(self) -> int:
        """Patches embedded in this run (reused slides and patch-only runs excluded)."""
        return sum(r.num_patches for r in self.records if r.state == "done" and r.embedded)

    @property
    def patches_cut(self) -> int:
        """Patches placed and labelled in this run (not read from an earlier patch file)."""
        return sum(
            r.num_patches for r in self.records if r.state == "done" and "patches" not in r.reused
        )

    def reused_patches(self) -> tuple[SlideRecord, ...]:
        """Slides embedded in this run from an earlier run's patches (not cut again)."""
        return tuple(r for r in self.records if r.state == "done" and "patches" in r.reused)

    @property
    def patches_per_second(self) -> float:
        """End-to-end throughput of the slides prepared in this run, open to last byte written."""
        busy = sum(sum(r.seconds.values()) for r in self.records if r.state == "done")
        return self.embedded_patches / busy if busy > 0 else 0.0


class PrepareEvents(Protocol):
    """Progress callbacks; the CLI draws progress bars with them, library code stays silent."""

    def stage_started(self, stage: str, subject: str) -> None:
        """A step that may take long began: ``encoder`` (subject: the encoder asked for),
        ``inference plan`` (subject: the encoder id; may export and measure it), ``tissue``,
        ``annotation``, ``outputs`` (subject: the slide id); ``embedding`` is
        ``slide_started``. A log says what runs instead of sitting silent."""
        ...

    def site_started(self, total_slides: int, encoder: str, precision: str) -> None: ...

    def slide_started(self, slide_id: str, num_patches: int) -> None: ...

    def patches_embedded(self, count: int) -> None: ...

    def slide_finished(self, record: SlideRecord) -> None: ...


class SilentEvents:
    """Events sink that ignores everything (library default)."""

    def stage_started(self, stage: str, subject: str) -> None:
        del stage, subject

    def site_started(self, total_slides: int, encoder: str, precision: str) -> None:
        del total_slides, encoder, precision

    def slide_started(self, slide_id: str, num_patches: int) -> None:
        del slide_id, num_patches

    def patches_embedded(self, count: int) -> None:
        del count

    def slide_finished(self, record: SlideRecord) -> None:
        del record
