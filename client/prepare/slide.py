"""One slide's preparation: read it, segment, place and label patches, embed, write.

Everything here concerns a single slide, and every failure is raised as ``SlideFailure`` naming
the stage it reached, so the site-level run (``pipeline``) records it and goes on with the next
slide. A failed attempt's outputs are removed, and the feature bag is written before the patch
file, so a killed run leaves nothing that a resumed run would trust.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpath.client.config import PrepareConfig, TissueConfig
from fedpath.client.prepare.layout import SiteLayout
from fedpath.client.prepare.manifest import ManifestRow
from fedpath.client.prepare.patchfile import PATCH_FILE_VERSION, PatchFile
from fedpath.client.prepare.records import PrepareEvents, SlideRecord
from fedpath.client.prepare.settings_hash import patches_config
from fedpath.client.wsi.patching import PatchGrid, patch_grid, write_coords_h5
from fedpath.client.wsi.qc import qc_background, render_qc_png, tissue_contours_geojson
from fedpath.client.wsi.reader import SlideInfo, WsiReader
from fedpath.client.wsi.resolution import ReadPlan, plan_read
from fedpath.client.wsi.tissue import TissueMask, tissue_mask_for_slide
from fedpath.common.atomic import atomic_write_json
from fedpath.common.errors import EmptyTissueError
from fedpath.common.featurebag import FeatureBagWriter

if TYPE_CHECKING:  # imported where used: a patch-only run imports no torch, and a slide
    # without annotation no shapely (start-up is most of a patch-only command's time)
    from fedpath.client.embed.registry import LoadedEncoder
    from fedpath.client.wsi.annotations import AnnotationOutcome


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


class SlideFailure(Exception):
    """Carries the stage at which a slide failed alongside the original error."""

    def __init__(self, stage: str, error: Exception) -> None:
        super().__init__(str(error))
        self.stage = stage
        self.error = error


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


def prepare_slide(
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
    """Prepare one slide; raises ``SlideFailure`` naming the stage on any expected error.

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
        raise SlideFailure(stages[-1], error) from error
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
