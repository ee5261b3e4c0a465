"""``fedpath prepare``: a hospital's manifest in, provenance-stamped feature bags out.

The run is built for unattended use on a CPU-only machine:
- the manifest is validated before any slide is opened (all problems at once, reported as
  failed items before the first slide starts); its bad rows are not prepared, the others are;
- each slide is independent: a corrupt file, missing MPP, empty tissue or broken annotation
  is recorded with its reason, its outputs are left untouched, and the next slide goes on;
- every output is written atomically, the feature bag first, so a killed run leaves nothing
  that a resumed run would trust;
- a slide whose feature bag already carries this run's config hash and whose file is still the
  one the bag was made from (``client.prepare.fingerprint``) is reused (resume); its status file
  keeps the record of the run that prepared it, with ``last_checked`` added;
- a write the system refuses (disk full, file too large, read-only) fails that slide with one
  message naming the file (``OutputWriteError``) and leaves no temporary behind;
- ``site.json`` holds only aggregate facts (no slide ids) because it is what the server's
  harmonisation check reads;
- a patch-only run (``patch_only``) stops before the encoder: it writes each slide's patch file
  (``patches/<id>.h5``: coordinates, labels, the settings hash and the slide's fingerprint),
  QC pictures and ``patches.csv``, and imports no torch. A later run embeds a patch file cut
  from the same slide file with the same patching settings instead of segmenting again.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpath.client.config import PrepareConfig, TissueConfig
from fedpath.client.prepare.fingerprint import SlideFingerprint, fingerprint
from fedpath.client.prepare.manifest import Manifest, ManifestRow, RejectedRow, load_manifest
from fedpath.client.prepare.patchfile import PATCH_FILE_VERSION, PatchFile, read_patch_file
from fedpath.client.prepare.records import (
    INDEX_COLUMNS,
    INDEX_FILE,
    PATCH_INDEX_FILE,
    SITE_FILE,
    PrepareEvents,
    PrepareSummary,
    SilentEvents,
    SlideRecord,
)
from fedpath.client.wsi.patching import PatchGrid, patch_grid, write_coords_h5
from fedpath.client.wsi.qc import qc_background, render_qc_png, tissue_contours_geojson
from fedpath.client.wsi.reader import SlideInfo, WsiReader
from fedpath.client.wsi.resolution import ReadPlan, plan_read
from fedpath.client.wsi.tissue import TissueMask, tissue_mask_for_slide
from fedpath.common import __version__
from fedpath.common.atomic import (
    OutputWriteError,
    atomic_write_json,
    atomic_write_text,
    os_error_text,
    remove_stale_temporaries,
)
from fedpath.common.errors import EmptyTissueError, FedpathError, SlideError
from fedpath.common.featurebag import FeatureBagWriter, read_attrs
from fedpath.common.hashing import SAMPLE_SCHEME, sha256_file, sha256_json
from fedpath.common.locking import LOCK_NAME, exclusive_directory

if TYPE_CHECKING:  # imported where used: a patch-only run imports no torch, and a slide
    # without annotation no shapely (start-up is most of a patch-only command's time)
    from fedpath.client.embed.inference import InferencePlan
    from fedpath.client.embed.registry import LoadedEncoder
    from fedpath.client.wsi.annotations import AnnotationOutcome


PATCH_ONLY = "patch-only"
"""The precision a patch-only run reports: it embeds nothing."""
PATCH_INDEX_COLUMNS = (*INDEX_COLUMNS[:-1], "patches")


@dataclass(frozen=True)
class SiteLayout:
    """Where a prepared site keeps each artefact (DESIGN §3)."""

    root: Path
    encoder_dir: str

    def coords(self, slide_id: str) -> Path:
        return self.root / "patches" / f"{slide_id}.h5"

    def features(self, slide_id: str) -> Path:
        return self.root / "features" / self.encoder_dir / f"{slide_id}.h5"

    def qc(self, slide_id: str) -> Path:
        return self.root / "qc" / f"{slide_id}.png"

    def contours(self, slide_id: str) -> Path:
        return self.root / "contours" / f"{slide_id}.geojson"

    def status(self, slide_id: str) -> Path:
        return self.root / "status" / f"{slide_id}.json"

    def rejected_status(self, rejected: RejectedRow) -> Path:
        """A rejected row's status file: by its id when that is a safe file name, else by its
        line (the ``_`` prefix cannot start a valid slide id, so the two never collide)."""
        if rejected.safe_id:
            return self.status(rejected.slide_id)
        return self.root / "status" / f"_line-{rejected.line}.json"

    def outputs(self, slide_id: str) -> tuple[Path, ...]:
        return (
            self.features(slide_id),
            self.coords(slide_id),
            self.qc(slide_id),
            self.contours(slide_id),
        )


def encoder_dir_name(encoder_id: str) -> str:
    """A file-system-safe folder name for an encoder id (ids of local checkpoints hold paths)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in encoder_id)
    return safe.strip("._") or "encoder"


def features_config(cfg: PrepareConfig, encoder: LoadedEncoder, precision: str) -> dict[str, Any]:
    """The settings that change a feature file's content (and nothing that merely changes speed)."""
    from fedpath.client.embed.extract import RESAMPLING

    return {
        "resolution": cfg.resolution.model_dump(mode="json"),
        "tissue": cfg.tissue.model_dump(mode="json"),
        "annotation": cfg.annotation.model_dump(mode="json"),
        "encoder": encoder.spec.id,
        "encoder_sha256": encoder.weights_sha256,
        "precision": precision,
        "feature_dtype": cfg.embedding.feature_dtype,
        "resampling": RESAMPLING,
    }


def patches_config(cfg: PrepareConfig) -> dict[str, Any]:
    """The settings that change a patch file's content: where patches are and how labelled."""
    return {
        "resolution": cfg.resolution.model_dump(mode="json"),
        "tissue": cfg.tissue.model_dump(mode="json"),
        "annotation": cfg.annotation.model_dump(mode="json"),
        "labels": list(cfg.labels),
        "patch_file_version": PATCH_FILE_VERSION,
    }


def patches_config_sha256(cfg: PrepareConfig, row: ManifestRow) -> str:
    """Hash of everything one slide's patch file depends on but the slide file itself."""
    return sha256_json(
        {
            "patches": patches_config(cfg),
            "slide_sample_scheme": SAMPLE_SCHEME,
            "mpp_override": row.mpp,
            "label": row.label,
            "annotation_sha256": sha256_file(row.annotation) if row.annotation else None,
            "annotation_complete": row.annotation_complete,
        }
    )


def slide_config_sha256(site_config: dict[str, Any], row: ManifestRow) -> str:
    """Hash of everything one slide's outputs depend on but its file: site config, the row's
    settings, the annotation's content. The slide file is compared separately (``_reuse``)."""
    return sha256_json(
        {
            "site": site_config,
            "slide_sample_scheme": SAMPLE_SCHEME,
            "mpp_override": row.mpp,
            "annotation_sha256": sha256_file(row.annotation) if row.annotation else None,
            "annotation_complete": row.annotation_complete,
        }
    )


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


class _SlideFailure(Exception):
    """Carries the stage at which a slide failed alongside the original error."""

    def __init__(self, stage: str, error: Exception) -> None:
        super().__init__(str(error))
        self.stage = stage
        self.error = error


@dataclass(frozen=True)
class _Reuse:
    """A finished slide to keep: this run's record and the status file to write."""

    record: SlideRecord
    status: dict[str, Any]


def _reuse(
    layout: SiteLayout,
    row: ManifestRow,
    cfg: PrepareConfig,
    hashes: tuple[str, str],
    slide: SlideFingerprint,
    now: str,
) -> _Reuse | str:
    """The reuse of a finished slide's outputs, or why they cannot be reused.

    Reused when the bag (patch-only: the patch file) carries this run's settings hash
    (``hashes``: features', patches') and the slide is the file it was made from: same total
    size, and either the same (size, mtime, ctime, inode) of every file (the fast path, no byte
    read) or, after a copy, move, restore or ``touch``, the same sampled content hash. A bag is
    kept only beside the patch file it was embedded from. The status file keeps the record of
    the run that prepared the slide; ``last_checked`` and ``last_run_outcome`` say what this
    run did.
    """
    features, coords = layout.features(row.slide_id), layout.coords(row.slide_id)
    if cfg.patch_only:
        if not coords.is_file():
            return "not cut yet"
        target, key, wanted = coords, "patches_config_sha256", hashes[1]
    else:
        if not (features.is_file() and coords.is_file()):
            return "not prepared yet"
        target, key, wanted = features, "config_sha256", hashes[0]
        try:
            cut_with = read_attrs(coords).get("patches_config_sha256")
        except FedpathError:
            return "its patch file cannot be read"
        if cut_with is not None and cut_with != hashes[1]:  # None: made before patch files
            return "its patches were cut again with other settings"
    try:
        attrs = read_attrs(target)
    except FedpathError:
        return f"its {'patch' if cfg.patch_only else 'feature'} file cannot be read"
    if cfg.patch_only and key not in attrs:
        return "its patch file was written by an earlier fedpath (no settings hash)"
    if attrs.get(key) != wanted:
        return "settings, encoder or annotation changed"
    changed = _slide_changed(attrs, slide, layout, row)
    if changed:
        return changed
    if cfg.patch_only and cfg.write_qc and not _has_qc(layout, row.slide_id):
        return "its QC picture or contours are missing"
    previous = _read_status(layout.status(row.slide_id))
    same_run = previous is not None and previous.get("prepared_at") == attrs.get("prepared_at")
    if same_run and previous is not None and previous.get("state") == "done":
        status = dict(previous)
    else:  # the status file is missing or older than the outputs: rebuild it from them
        status = {
            "slide_id": row.slide_id,
            "state": "done",
            "num_patches": int(attrs.get("num_patches", 0)),
            "tumour_patches": attrs.get("tumour_patches"),
            "mpp": attrs.get("level0_mpp"),
            "mpp_source": attrs.get("mpp_source"),
            "has_patch_labels": bool(attrs.get("has_patch_labels", False)),
            "embedded": not cfg.patch_only,
            "seconds": {},
            "prepared_at": attrs.get("prepared_at"),
            "recorded_at": attrs.get("prepared_at"),
        }
    reused = ("patches",) if cfg.patch_only else ("patches", "features")
    status.update(
        line=row.line,
        last_checked=now,
        last_run_outcome="reused",
        last_run_reused=list(reused),
        slide_stat_sha256=slide.stat_sha256,
    )
    what = "cut" if cfg.patch_only else "prepared"
    record = SlideRecord(
        slide_id=row.slide_id,
        state="reused",
        reason=f"{what} {attrs.get('prepared_at') or 'earlier'}; slide and settings unchanged",
        num_patches=int(attrs.get("num_patches", 0)),
        tumour_patches=attrs.get("tumour_patches"),
        mpp=attrs.get("level0_mpp"),
        mpp_source=attrs.get("mpp_source"),
        has_patch_labels=bool(attrs.get("has_patch_labels", False)),
        annotation=status.get("annotation"),
        embedded=not cfg.patch_only,
        reused=reused,
    )
    return _Reuse(record, status)


def _slide_changed(
    attrs: dict[str, Any], slide: SlideFingerprint, layout: SiteLayout, row: ManifestRow
) -> str | None:
    """Why the slide is no longer the file an output (its ``attrs``) was made from, or None."""
    if attrs.get("slide_sample_scheme") != SAMPLE_SCHEME or attrs.get("slide_bytes") != slide.size:
        return "slide file changed (size)"
    previous = _read_status(layout.status(row.slide_id))
    checked = {attrs.get("slide_stat_sha256")}
    if previous is not None and previous.get("prepared_at") == attrs.get("prepared_at"):
        checked.add(previous.get("slide_stat_sha256"))  # a later run saw it unchanged
    if slide.stat_sha256 not in checked and slide.sample_sha256() != attrs.get(
        "slide_sample_sha256"
    ):
        return "slide file changed (content differs from when it was prepared)"
    return None


def _has_qc(layout: SiteLayout, slide_id: str) -> bool:
    return layout.qc(slide_id).is_file() and layout.contours(slide_id).is_file()


def _reusable_patches(
    layout: SiteLayout,
    row: ManifestRow,
    cfg: PrepareConfig,
    patch_hash: str,
    slide: SlideFingerprint,
) -> PatchFile | str:
    """An earlier run's patch file to embed without cutting again, or why it cannot serve.

    It serves when it was cut from this very slide (``_slide_changed``) with these patching,
    tissue and annotation settings (``patch_hash``) and, if QC is on, its pictures are there."""
    path = layout.coords(row.slide_id)
    if not path.is_file():
        return "no patch file yet"
    try:
        attrs = read_attrs(path)
    except FedpathError:
        return "its patch file cannot be read"
    if "patches_config_sha256" not in attrs:
        return "its patch file was written by an earlier fedpath (no settings hash)"
    if attrs.get("patches_config_sha256") != patch_hash:
        return "patching settings or annotation changed since the patches were cut"
    changed = _slide_changed(attrs, slide, layout, row)
    if changed:
        return changed
    if cfg.write_qc and not _has_qc(layout, row.slide_id):
        return "its QC picture or contours are missing"
    try:
        return read_patch_file(path)
    except FedpathError as exc:
        return str(exc)


def _read_status(path: Path) -> dict[str, Any] | None:
    """A slide's status file, or None when it is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class _Patches:
    """One slide's patches and their labels, cut in this run or read from its patch file."""

    grid: PatchGrid
    labels: np.ndarray | None
    fraction: np.ndarray | None
    annotation: dict[str, Any] | None
    note: str | None
    reused_from: str | None = None
    """``prepared_at`` of the patch file reused, None when cut in this run."""


def _cut_patches(
    row: ManifestRow,
    reader: WsiReader,
    plan: ReadPlan,
    cfg: PrepareConfig,
    events: PrepareEvents,
    seconds: dict[str, float],
    stages: list[str],
) -> tuple[_Patches, TissueMask]:
    """Segment, place patches and label them from the annotation (``stages`` follows along)."""
    info = reader.info
    with _timed(seconds, "tissue"):
        mask = tissue_mask_for_slide(reader, cfg.tissue)
        grid = patch_grid(
            mask,
            info.dimensions,
            plan.patch_size_level0,
            plan.step_level0,
            cfg.tissue.min_tissue_fraction,
        )
    if grid.coords.shape[0] == 0:
        raise EmptyTissueError(row.slide_id, _empty_tissue_reason(mask.mask, cfg))
    labels: np.ndarray | None = None
    fraction: np.ndarray | None = None
    outcome: AnnotationOutcome | None = None
    if row.annotation is not None:
        from fedpath.client.wsi.annotations import annotation_outcome, slide_patch_labels

        stages.append("annotation")
        events.stage_started("annotation", row.slide_id)
        with _timed(seconds, "annotation"):
            outcome = annotation_outcome(
                row.annotation,
                cfg.annotation,
                info.dimensions,
                tumour_slide=row.label != cfg.labels[0],
            )
            outcome, fraction, labels = slide_patch_labels(
                outcome,
                grid.coords,
                grid.patch_size_level0,
                info.dimensions,
                bool(row.annotation_complete),
                cfg.annotation,
            )
    patches = _Patches(
        grid=grid,
        labels=labels,
        fraction=fraction,
        annotation=outcome.summary() if outcome is not None else None,
        note=outcome.note if outcome is not None else None,
    )
    return patches, mask


def _write_patch_outputs(
    row: ManifestRow,
    layout: SiteLayout,
    cfg: PrepareConfig,
    reader: WsiReader,
    plan: ReadPlan,
    patches: _Patches,
    mask: TissueMask,
    provenance: dict[str, Any],
    written: list[Path],
) -> None:
    """The patch file, then (``write_qc``) the QC picture and the tissue contours."""
    info = reader.info
    grid = patches.grid
    write_coords_h5(
        layout.coords(row.slide_id),
        grid,
        plan,
        info,
        patch_labels=patches.labels,
        tumour_fraction=patches.fraction,
        provenance=provenance,
    )
    written.append(layout.coords(row.slide_id))
    if cfg.write_qc:
        render_qc_png(
            layout.qc(row.slide_id),
            mask,
            grid,
            title=f"{row.slide_id} ({row.label}) - {grid.coords.shape[0]} patches",
            patch_labels=patches.labels,
            background=qc_background(reader, mask),
        )
        written.append(layout.qc(row.slide_id))
        atomic_write_json(layout.contours(row.slide_id), tissue_contours_geojson(mask))
        written.append(layout.contours(row.slide_id))


def _patch_provenance(
    row: ManifestRow,
    cfg: PrepareConfig,
    patch_hash: str,
    patches: _Patches,
    info: SlideInfo,
    slide_attrs: dict[str, Any],
) -> dict[str, Any]:
    """Root attributes of a patch file: what it was cut from and with which settings."""
    attrs: dict[str, Any] = {
        "patch_file_version": PATCH_FILE_VERSION,
        "patches_config_sha256": patch_hash,
        "slide_id": row.slide_id,
        "slide_label": row.label,
        "num_patches": len(patches.grid),
        "level0_mpp": info.mpp,
        "has_patch_labels": patches.labels is not None,
        "settings": json.dumps(patches_config(cfg), sort_keys=True),
        **slide_attrs,
    }
    if patches.labels is not None:
        attrs["annotation_complete"] = bool(row.annotation_complete)
        attrs["tumour_patches"] = int((patches.labels == 1).sum())
    if patches.annotation is not None:
        attrs["annotation_summary"] = json.dumps(patches.annotation, sort_keys=True)
        attrs["annotation_settings"] = cfg.annotation.model_dump_json()
    if patches.note:
        attrs["annotation_note"] = patches.note
    return attrs


def _prepare_slide(
    row: ManifestRow,
    layout: SiteLayout,
    cfg: PrepareConfig,
    encoder: LoadedEncoder | None,
    precision: str,
    hashes: tuple[str, str],
    events: PrepareEvents,
    slide_attrs: dict[str, Any],
    reusable: PatchFile | None,
) -> SlideRecord:
    """Prepare one slide; raises ``_SlideFailure`` naming the stage on any expected error.

    ``encoder`` None is a patch-only run (no feature bag). ``hashes`` are the features' and the
    patches' settings hashes; ``reusable`` is a patch file of an earlier run cut from this slide
    with these settings (segmentation, patching and labelling are then skipped).
    ``slide_attrs`` (the slide file's fingerprint, the preparation time) go into the outputs."""
    seconds: dict[str, float] = {}
    stages = ["open"]
    written: list[Path] = []
    if reusable is None:
        events.stage_started("tissue", row.slide_id)
    try:
        with _timed(seconds, "open"):
            reader = WsiReader(row.path, slide_id=row.slide_id, mpp_override=row.mpp)
        with reader:
            info = reader.info
            stages.append("tissue" if reusable is None else "embedding")
            plan = plan_read(info.mpp, info.level_downsamples, cfg.resolution)
            mask: TissueMask | None = None
            if reusable is None:
                patches, mask = _cut_patches(row, reader, plan, cfg, events, seconds, stages)
            else:
                patches = _Patches(
                    grid=reusable.grid,
                    labels=reusable.patch_labels,
                    fraction=reusable.tumour_fraction,
                    annotation=reusable.annotation_summary,
                    note=reusable.annotation_note,
                    reused_from=str(reusable.attrs.get("prepared_at") or "an earlier run"),
                )
            grid, labels = patches.grid, patches.labels
            if encoder is not None:
                stages.append("embedding")
                events.slide_started(row.slide_id, len(grid))
                with _timed(seconds, "embedding"):
                    bag = _bag_attrs(row, cfg, plan, info, patches, encoder, precision, hashes)
                    _embed(
                        layout.features(row.slide_id),
                        cfg,
                        reader,
                        plan,
                        patches,
                        encoder,
                        precision,
                        {**bag, **slide_attrs},
                        events,
                        written,
                    )
            if mask is not None:  # cut in this run: the patch file and the QC pictures
                stages.append("outputs")
                events.stage_started("outputs", row.slide_id)
                with _timed(seconds, "outputs"):
                    provenance = _patch_provenance(row, cfg, hashes[1], patches, info, slide_attrs)
                    _write_patch_outputs(
                        row, layout, cfg, reader, plan, patches, mask, provenance, written
                    )
    except Exception as error:
        # Any failure, expected or not, costs this slide only: an unattended run over hundreds
        # of slides must not stop at the first odd file. Outputs of this attempt are removed so
        # an unfinished slide looks unprepared (a reused patch file was not written here: kept).
        for path in written:
            path.unlink(missing_ok=True)
        raise _SlideFailure(stages[-1], error) from error
    return SlideRecord(
        slide_id=row.slide_id,
        state="done",
        num_patches=int(grid.coords.shape[0]),
        tumour_patches=int((labels == 1).sum()) if labels is not None else None,
        seconds={k: round(v, 4) for k, v in seconds.items()},
        mpp=info.mpp,
        mpp_source=info.mpp_source,
        reason=patches.note,
        has_patch_labels=labels is not None,
        annotation=patches.annotation,
        embedded=encoder is not None,
        reused=("patches",) if patches.reused_from is not None else (),
        patches_prepared_at=patches.reused_from,
    )


def _bag_attrs(
    row: ManifestRow,
    cfg: PrepareConfig,
    plan: ReadPlan,
    info: SlideInfo,
    patches: _Patches,
    encoder: LoadedEncoder,
    precision: str,
    hashes: tuple[str, str],
) -> dict[str, Any]:
    """The provenance attributes of a feature bag (the slide's fingerprint is added after)."""
    labels = patches.labels
    attrs: dict[str, Any] = {
        "encoder": encoder.spec.id,
        "encoder_sha256": encoder.weights_sha256,
        "feature_dim": encoder.spec.feature_dim,
        "patch_size_px": plan.patch_size,
        "patch_size_level0": plan.patch_size_level0,
        "target_mpp": plan.target_mpp,
        "level0_mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "slide_id": row.slide_id,
        "config_sha256": hashes[0],
        "patches_config_sha256": hashes[1],
        "precision": precision,
        "num_patches": len(patches.grid),
        "has_patch_labels": labels is not None,
    }
    if labels is not None:
        attrs["annotation_complete"] = bool(row.annotation_complete)
        attrs["tumour_patches"] = int((labels == 1).sum())
    if row.annotation is not None:
        # heatmaps draw the outline with the classes that labelled the patches
        attrs["annotation_settings"] = cfg.annotation.model_dump_json()
    return attrs


def _embed(
    feature_path: Path,
    cfg: PrepareConfig,
    reader: WsiReader,
    plan: ReadPlan,
    patches: _Patches,
    encoder: LoadedEncoder,
    precision: str,
    attrs: dict[str, Any],
    events: PrepareEvents,
    written: list[Path],
) -> None:
    """Embed the patches into the slide's feature bag (streamed, written atomically)."""
    from fedpath.client.embed.extract import extract_features

    with FeatureBagWriter(
        feature_path,
        coords=patches.grid.coords,
        feature_dim=encoder.spec.feature_dim,
        attrs=attrs,
        patch_labels=patches.labels,
        tumour_fraction=patches.fraction,
        dtype=cfg.embedding.feature_dtype,
    ) as writer:
        extract_features(
            reader,
            patches.grid.coords,
            plan,
            encoder,
            cfg.embedding,
            writer.write,
            precision=precision,
            progress=events.patches_embedded,
        )
    written.append(feature_path)


def _empty_tissue_reason(mask: np.ndarray, cfg: PrepareConfig) -> str:
    """Say which threshold emptied the slide, and the setting that would change it."""
    tissue = cfg.tissue
    if not mask.any() and tissue.min_tissue_area_relative > 0:
        # The relative rule keeps the largest component unless it is below the floor.
        floor = min(tissue.min_tissue_area_floor, tissue.min_tissue_area)
        return (
            "no tissue found: no region has saturation above "
            f"{tissue.saturation_threshold}, or each is a speck smaller than "
            f"{floor * 512 * 512 / 1e6:.2f} Mpx at level 0 (glass only, or a very faint "
            "stain: lower tissue.saturation_threshold or set tissue.use_otsu)"
        )
    if not mask.any():
        min_area_mpx = tissue.min_tissue_area * 512 * 512 / 1e6
        # Suggest the biopsy preset only when it would keep smaller fragments than now.
        hint = ""
        if tissue.min_tissue_area > TissueConfig.preset("biopsy").min_tissue_area:
            hint = "; for small biopsies use --tissue-preset biopsy"
        return (
            "no tissue found: no region has saturation above "
            f"{tissue.saturation_threshold}, or every fragment is smaller than min_tissue_area "
            f"(a_t={tissue.min_tissue_area:g}, i.e. {min_area_mpx:.1f} Mpx at level 0){hint}"
        )
    return (
        f"tissue found, but no {cfg.resolution.patch_size} px patch is at least "
        f"{tissue.min_tissue_fraction:.0%} tissue; lower tissue.min_tissue_fraction"
    )


def _failure_reason(error: Exception) -> str:
    """The message a person needs, naming the file at fault.

    A slide error drops its slide-id prefix (the record already names the slide); any other
    fedpath error keeps its full text, because there the prefix is the *other* file at fault
    (the annotation, the feature file) that the admin has to open.
    """
    if isinstance(error, SlideError):
        return error.reason
    if isinstance(error, FedpathError):
        return str(error)
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {os_error_text(error)}"
    return f"{type(error).__name__}: {error}"


def prepare_site(
    manifest: Path,
    out_dir: Path,
    cfg: PrepareConfig,
    *,
    events: PrepareEvents | None = None,
    slide_root: Path | None = None,
    overwrite: bool = False,
) -> PrepareSummary:
    """Prepare every slide of ``manifest`` into ``out_dir``; raises only for site-wide problems.

    Raises ``ManifestError`` (nothing done) when the manifest as a whole is unusable, or
    ``EncoderError`` (nothing done). Per-slide problems, including a manifest row that failed
    validation, are returned as failed records.
    """
    started = time.perf_counter()
    sink: PrepareEvents = events if events is not None else SilentEvents()
    parsed = load_manifest(manifest, cfg.labels, slide_root=slide_root)
    out = Path(out_dir).expanduser().resolve()
    with _owned_output(out):
        remove_stale_temporaries(out)
        return _prepare_locked(parsed, out, cfg, sink, started, overwrite)


@contextmanager
def _owned_output(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock; an output folder that cannot be created or written to is one
    ``OutputWriteError`` naming it (nothing was prepared), not a traceback."""
    lock = exclusive_directory(out, "prepare")
    try:
        lock.__enter__()
    except OSError as exc:
        raise OutputWriteError(out / LOCK_NAME, exc) from exc
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _prepare_locked(
    parsed: Manifest,
    out: Path,
    cfg: PrepareConfig,
    sink: PrepareEvents,
    started: float,
    overwrite: bool,
) -> PrepareSummary:
    """The body of ``prepare_site``, run while this process owns ``out``."""

    encoder: LoadedEncoder | None = None
    inference: InferencePlan | None = None
    encoder_notes: tuple[str, ...] = ()
    precision, cosine = PATCH_ONLY, None
    site_config: dict[str, Any] = {}
    if cfg.patch_only:  # no encoder: nothing of torch is imported
        layout = SiteLayout(out, encoder_dir_name(cfg.embedding.encoder))
        sink.site_started(len(parsed.rows) + len(parsed.rejected), "none", PATCH_ONLY)
    else:
        from fedpath.client.embed.catalog import resolution_mismatch
        from fedpath.client.embed.inference import plan_inference
        from fedpath.client.embed.registry import load_encoder

        sink.stage_started("encoder", cfg.embedding.encoder)
        encoder = load_encoder(cfg.embedding.encoder, cfg.embedding.weights_path)
        sink.stage_started("inference plan", encoder.spec.id)
        inference = plan_inference(encoder, cfg.embedding)  # device, engine, precision, batch
        precision, cosine = inference.precision, inference.precision_cosine
        mismatch = resolution_mismatch(encoder.spec.id, cfg.resolution.target_mpp)
        encoder_notes = (mismatch,) if mismatch else ()
        layout = SiteLayout(out, encoder_dir_name(encoder.spec.id))
        site_config = features_config(cfg, encoder, precision)
        sink.site_started(len(parsed.rows) + len(parsed.rejected), encoder.spec.id, precision)

    # Rejected rows first: every manifest problem is on screen before hours of embedding start.
    records = [_record_rejected(rejected, layout, sink) for rejected in parsed.rejected]
    embed_seconds = 0.0
    for row in parsed.rows:
        record, status = _process_row(
            row, layout, cfg, encoder, precision, site_config, sink, overwrite
        )
        embed_seconds += record.seconds.get("embedding", 0.0)
        try:
            atomic_write_json(layout.status(row.slide_id), status)
        except OutputWriteError as exc:
            # The outputs are complete (a later run reuses them) but this run cannot say so:
            # the slide is left out of prepared.csv rather than listed without a record.
            record = SlideRecord(
                slide_id=row.slide_id, state="failed", reason=str(exc), stage="status"
            )
        records.append(record)
        sink.slide_finished(record)

    site_error = None
    try:
        if encoder is None:
            _write_patch_index(parsed, layout, records)
        else:
            _write_site_files(parsed, layout, cfg, encoder, precision, cosine, site_config, records)
    except OutputWriteError as exc:
        site_error = str(exc)
    return PrepareSummary(
        out_dir=out,
        records=tuple(records),
        encoder=encoder.spec.id if encoder is not None else "",
        precision=precision,
        bf16_cosine=cosine,
        seconds=time.perf_counter() - started,
        embed_seconds=embed_seconds,
        site_error=site_error,
        patch_only=encoder is None,
        inference=inference.describe() if inference is not None else "",
        inference_notes=(*inference.notes, *encoder_notes) if inference else encoder_notes,
    )


def _process_row(
    row: ManifestRow,
    layout: SiteLayout,
    cfg: PrepareConfig,
    encoder: LoadedEncoder | None,
    precision: str,
    site_config: dict[str, Any],
    sink: PrepareEvents,
    overwrite: bool,
) -> tuple[SlideRecord, dict[str, Any]]:
    """Reuse, prepare, or fail one valid row; returns its record and its status file.

    Without ``encoder`` (patch-only) the slide is cut and labelled only. With one, a patch file
    an earlier run cut from this slide with these settings is embedded as it is."""
    now = _now()
    reusable: PatchFile | None = None
    try:
        slide = fingerprint(row.path)
        hashes = (slide_config_sha256(site_config, row), patches_config_sha256(cfg, row))
        why = "--overwrite" if overwrite else _reuse(layout, row, cfg, hashes, slide, now)
        if isinstance(why, _Reuse):
            return why.record, why.status
        why_cut = why
        if encoder is not None and not overwrite:
            found = _reusable_patches(layout, row, cfg, hashes[1], slide)
            reusable, why_cut = (found, "") if isinstance(found, PatchFile) else (None, found)
        slide_attrs = {**slide.attrs(slide.sample_sha256()), "prepared_at": now}
    except OSError as exc:
        name = exc.filename or row.path
        failed = SlideRecord(
            slide_id=row.slide_id,
            state="failed",
            reason=f"cannot read {name}: {os_error_text(exc)}",
            stage="open",
        )
        return failed, _status(failed, row, now)
    try:
        record = _prepare_slide(
            row, layout, cfg, encoder, precision, hashes, sink, slide_attrs, reusable
        )
        if fingerprint(row.path).stat_sha256 != slide.stat_sha256:
            for path in layout.outputs(row.slide_id):
                path.unlink(missing_ok=True)
            raise _SlideFailure(
                "outputs",
                SlideError(
                    row.slide_id,
                    "the slide file changed while it was being prepared; its outputs were "
                    "removed: run again once the file is complete",
                ),
            )
    except (_SlideFailure, OSError) as failure:
        error = failure.error if isinstance(failure, _SlideFailure) else failure
        stage = failure.stage if isinstance(failure, _SlideFailure) else "open"
        failed = SlideRecord(
            slide_id=row.slide_id,
            state="failed",
            reason=_failure_reason(error),
            stage=stage,
            annotation=_no_tumour_summary(error),
        )
        return failed, _status(failed, row, now)
    status = {**_status(record, row, now), "prepared_at": now, "why_prepared": why}
    status["slide_stat_sha256"] = slide.stat_sha256
    status["last_run_reused"] = list(record.reused)
    if reusable is None:
        status["why_patches_cut"] = why_cut
    return record, status


def _no_tumour_summary(error: Exception) -> dict[str, Any] | None:
    """The annotation block of a slide failed for having no tumour region (else None)."""
    annotations = sys.modules.get(
        "fedpath.client.wsi.annotations"
    )  # not loaded: no annotation read
    if annotations is not None and isinstance(error, annotations.NoTumourRegionError):
        return dict(error.summary)
    return None


def _status(record: SlideRecord, row: ManifestRow, now: str) -> dict[str, Any]:
    """The status file of a slide this run prepared or failed."""
    outcome = "prepared" if record.state == "done" else record.state
    return {
        **record.to_json(),
        "line": row.line,
        "recorded_at": now,
        "last_checked": now,
        "last_run_outcome": outcome,
    }


def _record_rejected(rejected: RejectedRow, layout: SiteLayout, sink: PrepareEvents) -> SlideRecord:
    """A failed record for a manifest row that cannot be prepared, like a slide that failed to
    read: in the summary, in its status file, and in the events sink."""
    record = SlideRecord(
        slide_id=rejected.slide_id or "(no id)",
        state="failed",
        reason="; ".join(rejected.problems),
        stage="manifest",
    )
    now = _now()
    status = {
        **record.to_json(),
        "line": rejected.line,
        "lines": list(rejected.lines),
        "recorded_at": now,
        "last_checked": now,
        "last_run_outcome": "failed",
    }
    try:
        atomic_write_json(layout.rejected_status(rejected), status)
    except OutputWriteError as exc:
        record = SlideRecord(
            slide_id=record.slide_id,
            state="failed",
            reason=f"{record.reason}; and {exc}",
            stage=record.stage,
        )
    sink.slide_finished(record)
    return record


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_patch_index(manifest: Manifest, layout: SiteLayout, records: list[SlideRecord]) -> None:
    """A patch-only run's ``patches.csv``: the slides cut and where their patch files are.

    ``prepared.csv`` and ``site.json`` describe feature bags and are left as they are."""
    by_id = {r.slide_id: r for r in records}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PATCH_INDEX_COLUMNS)
    for row in manifest.rows:
        record = by_id[row.slide_id]
        if record.state == "failed":
            continue
        writer.writerow(_index_row(row, record, layout.coords(row.slide_id), layout.root))
    atomic_write_text(layout.root / PATCH_INDEX_FILE, buffer.getvalue())


def _index_row(row: ManifestRow, record: SlideRecord, path: Path, root: Path) -> list[Any]:
    """One slide's line in ``prepared.csv`` / ``patches.csv`` (same columns, other file)."""
    return [
        row.slide_id,
        row.label,
        row.split or "",
        row.patient_id or "",
        "" if row.annotation_complete is None else str(row.annotation_complete).lower(),
        str(record.has_patch_labels).lower(),
        record.num_patches,
        os.path.relpath(path, root),
    ]


def _write_site_files(
    manifest: Manifest,
    layout: SiteLayout,
    cfg: PrepareConfig,
    encoder: LoadedEncoder,
    precision: str,
    cosine: float | None,
    site_config: dict[str, Any],
    records: list[SlideRecord],
) -> None:
    """Write the local slide index and the aggregate ``site.json`` the server may compare."""
    by_id = {r.slide_id: r for r in records}
    usable = [row for row in manifest.rows if by_id[row.slide_id].state != "failed"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(INDEX_COLUMNS)
    for row in usable:
        record = by_id[row.slide_id]
        writer.writerow(_index_row(row, record, layout.features(row.slide_id), layout.root))
    atomic_write_text(layout.root / INDEX_FILE, buffer.getvalue())

    label_counts = {label: 0 for label in cfg.labels}
    for row in usable:
        label_counts[row.label] += 1
    site = {
        "fedpath_version": __version__,
        "encoder": encoder.spec.id,
        "encoder_sha256": encoder.weights_sha256,
        "feature_dim": encoder.spec.feature_dim,
        "target_mpp": cfg.resolution.target_mpp,
        "patch_size": cfg.resolution.patch_size,
        "labels": list(cfg.labels),
        "precision": precision,
        "bf16_cosine": cosine,
        "config_sha256": sha256_json(site_config),
        "features_dir": os.path.relpath(layout.root / "features" / layout.encoder_dir, layout.root),
        "slides": {
            "usable": len(usable),
            "failed": sum(1 for r in records if r.state == "failed"),
            "by_label": label_counts,
            "with_patch_labels": sum(1 for row in usable if by_id[row.slide_id].has_patch_labels),
        },
        "patches": sum(by_id[row.slide_id].num_patches for row in usable),
        "prepared_at": _now(),
    }
    atomic_write_json(layout.root / SITE_FILE, site)
