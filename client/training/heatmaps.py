"""Per-slide heatmaps of a trained MIL model, painted over the slide for a pathologist to judge.

A slide-level AUC says whether a model is right, not whether it is right for the right reason.
The heatmap answers that on the hospital's own slides: it shows where the model looked
(attention) and which patches it calls tumour (instance probability) next to the slide itself,
the pathologist's tumour outline when one exists, and the most attended patches at full
resolution. Everything is written on the hospital's disk; nothing here is ever sent.

This module gathers one slide's inputs (its bag, the slide's pixels, the outline), has the
model's per-patch outputs computed (:mod:`~fedpath.client.training.heatmap_maps`), the
picture drawn (:mod:`~fedpath.client.training.heatmap_render`) and writes the PNG. It never
prints. :func:`write_slide_heatmap` raises fedpath errors naming the slide;
:func:`write_heatmaps` turns them into one :class:`HeatmapRecord` per slide (written, or
skipped with the reason) so one bad slide never costs the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np

from fedpath.client.config import AnnotationConfig, ResolutionConfig
from fedpath.client.training.bags import load_bag
from fedpath.client.training.heatmap_maps import slide_maps, top_k_indices
from fedpath.client.training.heatmap_render import HeatmapConfig, HeatmapPicture, render_heatmap
from fedpath.client.training.site_index import BagEntry
from fedpath.client.wsi.annotations import load_annotation
from fedpath.client.wsi.patching import read_coords_h5
from fedpath.client.wsi.qc import slide_thumbnail
from fedpath.client.wsi.reader import WsiReader
from fedpath.client.wsi.resolution import plan_read, round_half_up
from fedpath.common.atomic import atomic_write_bytes
from fedpath.common.errors import FeatureBagError, FedpathError, SlideError
from fedpath.common.featurebag import plain_value
from fedpath.common.mil.models import MILModel

__all__ = [
    "HeatmapConfig",
    "HeatmapRecord",
    "SlideSource",
    "annotation_settings_of",
    "outline_rings",
    "read_patch_images",
    "write_heatmaps",
    "write_slide_heatmap",
]


@dataclass(frozen=True)
class SlideSource:
    """Where one slide's pixels (and optional tumour outline) are: the manifest row's facts."""

    slide_id: str
    path: Path
    annotation: Path | None = None
    mpp_override: float | None = None
    coords_file: Path | None = None
    """``patches/<id>.h5`` of the prepared site: the patch footprint when the bag lacks it."""


@dataclass(frozen=True)
class HeatmapRecord:
    """Outcome for one slide: the PNG written, or why it was skipped."""

    slide_id: str
    path: Path | None
    error: str | None = None
    warnings: tuple[str, ...] = ()
    probs: tuple[float, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


def _bag_geometry(
    entry: BagEntry, coords_file: Path | None
) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Coordinates, level-0 patch side and attrs of a bag, without reading its features again.

    fedpath bags record ``patch_size_level0``; for others the prepared coordinate file
    (CLAM/TRIDENT layout) says it.
    """
    try:
        with h5py.File(entry.features, "r") as fh:
            coords = np.asarray(fh["coords"][()])
            attrs = {k: plain_value(v) for k, v in fh.attrs.items()}
    except (OSError, KeyError) as exc:
        raise FeatureBagError(str(entry.features), f"cannot read its coords ({exc})") from exc
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    size = attrs.get("patch_size_level0")
    if size is None and coords_file is not None and coords_file.is_file():
        grid, _ = read_coords_h5(coords_file)
        size = grid.patch_size_level0
    if not isinstance(size, int | float) or size <= 0:
        raise FeatureBagError(
            str(entry.features), "records no patch_size_level0 and no patches/<id>.h5 gives it"
        )
    return coords, int(size), attrs


def _check_fits_slide(slide_id: str, coords: np.ndarray, size: int, dims: tuple[int, int]) -> None:
    """Refuse a slide file whose extent does not hold the bag's patches (wrong or re-scanned).

    A patch may overhang the right or bottom edge by less than its size (CLAM and TRIDENT grids
    do), so only patches starting outside the slide prove the file is another one.
    """
    if coords.size == 0:
        return
    right, bottom = int(coords[:, 0].max()) + size, int(coords[:, 1].max()) + size
    if coords.min() < 0 or right > dims[0] + size or bottom > dims[1] + size:
        raise SlideError(
            slide_id,
            f"its patches reach ({right}, {bottom}) but the slide file is {dims[0]}×{dims[1]} px: "
            "is the manifest pointing at another scan than the one prepared?",
        )


def read_patch_images(
    reader: WsiReader,
    coords: np.ndarray,
    patch_size_level0: int,
    patch_size_px: int,
    target_mpp: float,
) -> list[np.ndarray]:
    """Read patches at the resolution the encoder saw (same level choice as preparation)."""
    cfg = ResolutionConfig(target_mpp=target_mpp, patch_size=patch_size_px)
    plan = plan_read(reader.info.mpp, reader.info.level_downsamples, cfg)
    read = max(1, round_half_up(patch_size_level0 / plan.level_downsample))
    images: list[np.ndarray] = []
    for x, y in np.asarray(coords).tolist():
        rgb = reader.read_region((int(x), int(y)), plan.level, (read, read))
        if read != patch_size_px:
            interpolation = cv2.INTER_AREA if read > patch_size_px else cv2.INTER_LINEAR
            rgb = cv2.resize(rgb, (patch_size_px, patch_size_px), interpolation=interpolation)
        images.append(rgb)
    return images


def annotation_settings_of(attrs: dict[str, Any]) -> AnnotationConfig:
    """The annotation classes ``fedpath prepare`` labelled this bag's patches with.

    A site that set its own ``tumour_classes`` must see the same regions outlined as those
    its patch labels came from; bags prepared before the settings were recorded use the
    defaults, which were then the only choice.
    """
    recorded = attrs.get("annotation_settings")
    if not recorded:
        return AnnotationConfig()
    try:
        return AnnotationConfig.model_validate_json(str(recorded))
    except ValueError as exc:
        raise FedpathError(f"its recorded annotation settings are unreadable ({exc})") from exc


def outline_rings(
    annotation: Path, dims: tuple[int, int], settings: AnnotationConfig
) -> list[np.ndarray]:
    """Level-0 rings (exteriors and holes) of the tumour outlines of an annotation file."""
    parsed = load_annotation(annotation, settings, dims)
    rings: list[np.ndarray] = []
    for polygon in parsed.tumour:
        rings.append(polygon.exterior)
        rings.extend(polygon.holes)
    return rings


# --------------------------------------------------------------------------------------------
# Per slide and per site
# --------------------------------------------------------------------------------------------


def _encode_png(rgb: np.ndarray, path: Path) -> bytes:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise FedpathError(f"heatmap {path}: OpenCV could not encode it as PNG")
    return encoded.tobytes()


def write_slide_heatmap(
    model: MILModel,
    entry: BagEntry,
    source: SlideSource,
    out_path: Path,
    labels: Sequence[str],
    cfg: HeatmapConfig,
    *,
    feature_dim: int | None = None,
) -> HeatmapRecord:
    """Score one slide, draw its heatmap and write it atomically; raises on any failure.

    An unreadable annotation is not fatal: the picture is drawn without the outline and the
    record carries a warning, since the model's maps are still worth looking at.
    """
    bag = load_bag(entry, feature_dim)
    coords, size, attrs = _bag_geometry(entry, source.coords_file)
    if coords.shape != (bag.num_patches, 2):
        raise FeatureBagError(
            str(entry.features), f"coords {coords.shape} do not match {bag.num_patches} patches"
        )
    maps = slide_maps(model, bag)
    warnings: list[str] = []
    with WsiReader(
        source.path, slide_id=entry.slide_id, mpp_override=source.mpp_override
    ) as reader:
        dims = reader.info.dimensions
        _check_fits_slide(entry.slide_id, coords, size, dims)
        thumbnail, downsample = slide_thumbnail(reader, cfg.thumbnail_side)
        top = top_k_indices(maps.attention, cfg.top_k)
        patch_px = int(attrs.get("patch_size_px") or 256)
        target_mpp = float(attrs.get("target_mpp") or size / patch_px * reader.info.mpp)
        top_images = read_patch_images(reader, coords[top], size, patch_px, target_mpp)
    outline: tuple[np.ndarray, ...] | None = None
    if source.annotation is not None:
        try:
            outline = tuple(outline_rings(source.annotation, dims, annotation_settings_of(attrs)))
        except FedpathError as exc:
            warnings.append(f"outline not drawn: {exc}")
    picture = HeatmapPicture(
        slide_id=entry.slide_id,
        labels=tuple(labels),
        label=entry.label,
        maps=maps,
        thumbnail=thumbnail,
        downsample=downsample,
        coords=coords,
        patch_size_level0=size,
        outline=outline,
        top=top,
        top_images=tuple(top_images),
        patch_labels=None if bag.patch_labels is None else bag.patch_labels.numpy(),
        patch_note=f" ({patch_px} px at {target_mpp:g} µm/px)",
    )
    atomic_write_bytes(out_path, _encode_png(render_heatmap(picture, cfg), out_path))
    return HeatmapRecord(
        entry.slide_id, out_path, warnings=tuple(warnings), probs=tuple(map(float, maps.probs))
    )


def write_heatmaps(
    model: MILModel,
    entries: Sequence[BagEntry],
    sources: dict[str, SlideSource],
    out_dir: Path,
    labels: Sequence[str],
    cfg: HeatmapConfig,
    *,
    feature_dim: int | None = None,
    on_slide: Callable[[HeatmapRecord], None] | None = None,
) -> list[HeatmapRecord]:
    """``out_dir/<slide_id>.png`` for every entry; a slide that fails is recorded and skipped.

    ``sources`` maps slide ids to their files (from the manifest); a slide missing from it
    fails with that reason. ``on_slide`` sees each record as soon as it is final.
    """
    records: list[HeatmapRecord] = []
    for entry in entries:
        source = sources.get(entry.slide_id)
        try:
            if source is None:
                raise SlideError(
                    entry.slide_id, "not in the manifest given, so its slide file is unknown"
                )
            record = write_slide_heatmap(
                model,
                entry,
                source,
                out_dir / f"{entry.slide_id}.png",
                labels,
                cfg,
                feature_dim=feature_dim,
            )
        except Exception as exc:
            # One odd slide (moved file, corrupt tile, broken bag) must not cost the others the
            # hospital is waiting to look at; the reason goes into the record.
            record = HeatmapRecord(entry.slide_id, None, error=_reason(exc))
        records.append(record)
        if on_slide is not None:
            on_slide(record)
    return records


def _reason(error: Exception) -> str:
    """The library error's own text; anything unexpected keeps its type for a bug report."""
    if isinstance(error, FedpathError):
        return str(error)
    return f"{type(error).__name__}: {error}"
