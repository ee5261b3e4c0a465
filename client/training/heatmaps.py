"""Per-slide heatmaps of a trained MIL model, painted over the slide for a pathologist to judge.

A slide-level AUC says whether a model is right, not whether it is right for the right reason.
The heatmap answers that on the hospital's own slides: it shows where the model looked
(attention) and which patches it calls tumour (instance probability) next to the slide itself,
the pathologist's tumour outline when one exists, and the most attended patches at full
resolution. Everything is written on the hospital's disk; nothing here is ever sent.

Attention is painted as *percentiles within the slide* (rank / N): raw attention sums to 1
over a slide, so a 300-patch biopsy and a 30,000-patch resection would have incomparable
scales. Ranks put every slide on the same 0-1 colour scale (the top tenth of a slide is always
the same colour), at the price of showing relative, not absolute, focus.

The module never prints. :func:`write_slide_heatmap` raises fedpath errors naming the slide;
:func:`write_heatmaps` turns them into one :class:`HeatmapRecord` per slide (written, or
skipped with the reason) so one bad slide never costs the others. Drawing
uses matplotlib's object API on an Agg canvas (no pyplot global state), so it is safe in
threads and needs no display.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import torch
from pydantic import Field

from fedpath.client.config import AnnotationConfig, ResolutionConfig
from fedpath.client.training.bags import Bag, load_bag
from fedpath.client.training.site_index import BagEntry
from fedpath.client.training.trainer import out_of_memory_as_error
from fedpath.client.wsi.annotations import load_annotation
from fedpath.client.wsi.patching import read_coords_h5
from fedpath.client.wsi.qc import slide_thumbnail
from fedpath.client.wsi.reader import WsiReader
from fedpath.client.wsi.resolution import plan_read, round_half_up
from fedpath.common.atomic import atomic_write_bytes
from fedpath.common.configbase import StrictModel
from fedpath.common.errors import FeatureBagError, FedpathError, SlideError
from fedpath.common.featurebag import plain_value
from fedpath.common.mil.models import MILModel

__all__ = [
    "HeatmapConfig",
    "HeatmapPicture",
    "HeatmapRecord",
    "SlideMaps",
    "SlideSource",
    "attention_percentiles",
    "blend_overlay",
    "figure_size_px",
    "rasterise_patches",
    "read_patch_images",
    "render_heatmap",
    "slide_maps",
    "top_k_indices",
    "write_heatmaps",
    "write_slide_heatmap",
]

ATTENTION_CMAP = "turbo"
"""Attention percentiles: a rainbow pathologists know from CLAM's jet maps, but perceptually
ordered (turbo), so the hottest tenth stands out without false bands."""
TUMOUR_CMAP = "RdBu_r"
"""Tumour probability: diverging at the decision threshold 0.5, blue normal, red tumour."""
OUTLINE_COLOUR = "#00ff66"
"""Ground-truth outline: bright green over a black halo, visible on every colour of both maps."""
TOP_K_COLOUR = "#ffd400"
"""Top-k boxes on the plain slide panel: yellow stands out on H&E pink and purple."""
_DPI = 100
_HEADER_PX = 110
_COLOURBAR_PX = 125
_STRIP_TITLE_PX = 80
_ASPECT_RANGE = (0.35, 1.6)
"""Panel height / width is clamped to this: a very long or tall slide is letterboxed inside
its panel rather than making the picture a thin ribbon or a tower."""


class HeatmapConfig(StrictModel):
    """How heatmap pictures are drawn; defaults give a ~2,100 px wide PNG per slide."""

    top_k: int = Field(8, ge=0, le=24, description="most attended patches shown in the strip")
    thumbnail_side: int = Field(
        1024, ge=64, le=8192, description="about this many px on the thumbnail's long side"
    )
    width_px: int = Field(2100, ge=900, le=8000, description="width of the PNG")
    alpha: float = Field(
        0.5, gt=0, le=1, description="opacity of the colours over the slide (lower: more tissue)"
    )


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
class SlideMaps:
    """One slide's model outputs, per real patch, in the bag's patch order."""

    probs: np.ndarray
    """``[C]`` softmax of the slide logits."""
    attention: np.ndarray
    """``[N]`` attention of the branch shown (the predicted class's for ``clam_mb``)."""
    branch: int
    n_branches: int
    percentile: np.ndarray
    """``[N]`` attention rank / N in (0, 1]; ties share their mean rank."""
    tumour_prob: np.ndarray
    """``[N]`` softmax of the instance logits, tumour column."""
    instance_trained: bool
    """False for ``abmil``, whose instance probabilities are a readout of the slide head."""

    @property
    def pred(self) -> int:
        return int(np.argmax(self.probs))


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


# --------------------------------------------------------------------------------------------
# Pure numerics: percentiles, top-k, painting values onto a thumbnail grid
# --------------------------------------------------------------------------------------------


def attention_percentiles(attention: np.ndarray) -> np.ndarray:
    """Within-slide rank / N of each value, in (0, 1]: the largest is 1, ties share a rank."""
    values = np.asarray(attention, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"attention must be a non-empty 1-D array, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("attention contains NaN or infinite values")
    n = values.size
    ranks = np.empty(n, dtype=np.float64)
    ranks[np.argsort(values, kind="stable")] = np.arange(1, n + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    mean_rank = np.bincount(inverse, weights=ranks) / counts
    return mean_rank[inverse] / n


def top_k_indices(attention: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` most attended patches, most attended first (stable on ties)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    order = np.argsort(-np.asarray(attention, dtype=np.float64), kind="stable")
    return order[: min(k, order.size)]


def rasterise_patches(
    values: np.ndarray,
    coords: np.ndarray,
    patch_size_level0: int,
    downsample: tuple[float, float],
    shape: tuple[int, int],
) -> np.ndarray:
    """Paint one value per patch over its footprint on an ``H×W`` grid; NaN where no patch is.

    A thumbnail pixel belongs to a patch when its centre lies inside the patch's level-0
    footprint ``[x, x + size)`` scaled by ``downsample`` (level-0 px per pixel), so patches of
    a gap-free grid tile the picture without gaps or double counting; a patch smaller than a
    pixel still paints the pixel holding its top-left corner. Where patches overlap the mean is
    shown. Vectorised with a 2-D difference array: O(N + H·W), no loop over patches.
    """
    values = np.asarray(values, dtype=np.float64)
    coords = np.asarray(coords)
    height, width = shape
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be N×2, got shape {coords.shape}")
    if values.shape != (coords.shape[0],):
        raise ValueError(f"values has shape {values.shape}, expected ({coords.shape[0]},)")
    if patch_size_level0 <= 0 or min(downsample) <= 0 or height <= 0 or width <= 0:
        raise ValueError("patch size, downsample and shape must be positive")
    dx, dy = downsample
    x0 = np.floor(coords[:, 0] / dx + 0.5).astype(np.int64)
    y0 = np.floor(coords[:, 1] / dy + 0.5).astype(np.int64)
    x1 = np.maximum(
        np.floor((coords[:, 0] + patch_size_level0) / dx + 0.5).astype(np.int64), x0 + 1
    )
    y1 = np.maximum(
        np.floor((coords[:, 1] + patch_size_level0) / dy + 0.5).astype(np.int64), y0 + 1
    )
    x0, x1 = np.clip(x0, 0, width), np.clip(x1, 0, width)
    y0, y1 = np.clip(y0, 0, height), np.clip(y1, 0, height)
    inside = (x1 > x0) & (y1 > y0)
    total = np.zeros((height + 1, width + 1), dtype=np.float64)
    count = np.zeros((height + 1, width + 1), dtype=np.float64)
    for grid, weight in ((total, values[inside]), (count, np.ones(int(inside.sum())))):
        a, b, c, d = y0[inside], y1[inside], x0[inside], x1[inside]
        np.add.at(grid, (a, c), weight)
        np.add.at(grid, (a, d), -weight)
        np.add.at(grid, (b, c), -weight)
        np.add.at(grid, (b, d), weight)
    total = total.cumsum(axis=0).cumsum(axis=1)[:height, :width]
    count = np.rint(count.cumsum(axis=0).cumsum(axis=1)[:height, :width])
    out = np.full((height, width), np.nan, dtype=np.float64)
    covered = count > 0
    out[covered] = total[covered] / count[covered]
    return out


def blend_overlay(
    thumbnail: np.ndarray, grid: np.ndarray, cmap: Any, alpha: float, vmin: float, vmax: float
) -> np.ndarray:
    """The thumbnail with ``cmap(grid)`` blended in at ``alpha`` where ``grid`` is finite."""
    if thumbnail.shape[:2] != grid.shape:
        raise ValueError(f"grid {grid.shape} does not match thumbnail {thumbnail.shape[:2]}")
    finite = np.isfinite(grid)
    scaled = np.clip((np.where(finite, grid, vmin) - vmin) / (vmax - vmin), 0.0, 1.0)
    colours = np.asarray(cmap(scaled))[..., :3] * 255.0
    weight = np.where(finite, alpha, 0.0)[..., None]
    blended = thumbnail.astype(np.float64) * (1.0 - weight) + colours * weight
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Model outputs and slide pixels
# --------------------------------------------------------------------------------------------


def slide_maps(model: MILModel, bag: Bag) -> SlideMaps:
    """Score one bag in eval mode without gradients and keep every per-patch output."""
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with out_of_memory_as_error(device, "scoring the slide"), torch.no_grad():
            out = model(bag.features.unsqueeze(0).to(device), None)
    finally:
        model.train(was_training)
    # Widened on the CPU (MPS has no float64): a slide's outputs are small.
    probs = torch.softmax(out.logits[0].cpu().double(), dim=-1).numpy()
    pred = int(np.argmax(probs))
    branch = pred if out.attention.shape[1] > 1 else 0
    attention = out.attention[0, branch].cpu().double().numpy()
    tumour = torch.softmax(out.instance_logits[0].cpu().double(), dim=-1)[:, 1].numpy()
    return SlideMaps(
        probs=probs,
        attention=attention,
        branch=branch,
        n_branches=int(out.attention.shape[1]),
        percentile=attention_percentiles(attention),
        tumour_prob=tumour,
        instance_trained=bool(model.has_instance_task),
    )


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


def _outline_rings(
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
# The picture
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeatmapPicture:
    """Everything drawn for one slide (no I/O left: ``render_heatmap`` is a pure function)."""

    slide_id: str
    labels: tuple[str, ...]
    label: int
    maps: SlideMaps
    thumbnail: np.ndarray
    downsample: tuple[float, float]
    coords: np.ndarray
    patch_size_level0: int
    outline: tuple[np.ndarray, ...] | None
    """Level-0 tumour rings; ``None`` when no annotation is known (empty: annotated, no tumour)."""
    top: np.ndarray
    top_images: tuple[np.ndarray, ...]
    patch_labels: np.ndarray | None = None
    patch_note: str = ""


def _panel_aspect(thumbnail: np.ndarray) -> float:
    height, width = thumbnail.shape[:2]
    return float(np.clip(height / max(width, 1), *_ASPECT_RANGE))


def figure_size_px(
    thumbnail_shape: tuple[int, ...], n_top: int, cfg: HeatmapConfig
) -> tuple[int, int]:
    """(width, height) of the PNG ``render_heatmap`` draws for this thumbnail and strip."""
    panel = cfg.width_px / 3.0
    aspect = float(np.clip(thumbnail_shape[0] / max(thumbnail_shape[1], 1), *_ASPECT_RANGE))
    height = _HEADER_PX + panel * aspect + _COLOURBAR_PX
    if n_top:
        height += cfg.width_px / max(n_top, 6) + _STRIP_TITLE_PX
    return cfg.width_px, math.ceil(height)


def _title(picture: HeatmapPicture) -> tuple[str, str]:
    maps, labels = picture.maps, picture.labels
    probs = ", ".join(f"P({name}) = {p:.2f}" for name, p in zip(labels, maps.probs, strict=True))
    line1 = (
        f"{picture.slide_id}   label: {labels[picture.label]}   "
        f"predicted: {labels[maps.pred]}   ({probs})"
    )
    n = picture.coords.shape[0]
    line2 = f"{n} patches of {picture.patch_size_level0} level-0 px{picture.patch_note}"
    if picture.outline is None:
        line2 += "   ·   no annotation: ground truth not shown"
    return line1, line2


def _draw_outline(ax: Any, picture: HeatmapPicture) -> None:
    from matplotlib import patheffects

    if not picture.outline:
        return
    dx, dy = picture.downsample
    halo = [patheffects.withStroke(linewidth=4.0, foreground="black")]
    for ring in picture.outline:
        closed = np.vstack((ring, ring[:1]))
        ax.plot(
            closed[:, 0] / dx - 0.5,
            closed[:, 1] / dy - 0.5,
            color=OUTLINE_COLOUR,
            linewidth=1.8,
            path_effects=halo,
        )


def _draw_top_boxes(ax: Any, picture: HeatmapPicture) -> None:
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    dx, dy = picture.downsample
    size = picture.patch_size_level0
    halo = [patheffects.withStroke(linewidth=3.0, foreground="black")]
    for rank, index in enumerate(picture.top, start=1):
        x, y = picture.coords[index]
        box = Rectangle(
            (x / dx - 0.5, y / dy - 0.5),
            size / dx,
            size / dy,
            fill=False,
            edgecolor=TOP_K_COLOUR,
            linewidth=1.5,
            path_effects=halo,
        )
        ax.add_patch(box)
        ax.text(
            x / dx,
            y / dy - 1,
            str(rank),
            color=TOP_K_COLOUR,
            fontsize=11,
            fontweight="bold",
            va="bottom",
            ha="left",
            path_effects=halo,
        )


def _image_axes(ax: Any, image: np.ndarray, title: str) -> None:
    ax.imshow(image, interpolation="antialiased")
    ax.set_title(title, fontsize=14)
    ax.set_xticks([])
    ax.set_yticks([])


def _colourbar(fig: Any, cax: Any, cmap: Any, label: str) -> None:
    """A fixed 0-1 scale: the same colour means the same value on every slide's picture."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap), cax=cax, orientation="horizontal")
    bar.set_ticks([0.0, 0.25, 0.5, 0.75, 1.0])
    bar.ax.tick_params(labelsize=11)
    bar.set_label(label, fontsize=12)


def _legend(ax: Any, picture: HeatmapPicture) -> None:
    """Say what the lines and boxes drawn over the slide are."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    ax.axis("off")
    handles: list[Any] = []
    if picture.outline is not None:
        outline = Line2D([0], [0], color=OUTLINE_COLOUR, linewidth=3)
        handles.append((outline, "ground-truth tumour outline (annotation)"))
    if len(picture.top):
        box = Rectangle((0, 0), 1, 1, fill=False, edgecolor=TOP_K_COLOUR, linewidth=2.5)
        handles.append((box, f"top {len(picture.top)} attended patches (numbered, shown below)"))
    if handles:
        ax.legend(
            [h for h, _ in handles],
            [t for _, t in handles],
            loc="center",
            fontsize=12,
            frameon=False,
        )


def _draw_strip(fig: Any, spec: Any, picture: HeatmapPicture) -> None:
    columns = max(len(picture.top), 6)
    cells = spec.subgridspec(1, columns, wspace=0.04)
    names = {1: "tumour", 0: "normal", -1: "unknown"}
    for rank, (index, image) in enumerate(zip(picture.top, picture.top_images, strict=True)):
        ax = fig.add_subplot(cells[0, rank])
        ax.imshow(image)
        ax.set_xticks([])
        ax.set_yticks([])
        pct = picture.maps.percentile[index]
        prob = picture.maps.tumour_prob[index]
        text = f"#{rank + 1}   attention pct {pct:.2f}\nP(tumour) {prob:.2f}"
        if picture.patch_labels is not None:
            text += f"\nannotated: {names.get(int(picture.patch_labels[index]), '?')}"
        ax.set_title(text, fontsize=11, linespacing=1.3)


def render_heatmap(picture: HeatmapPicture, cfg: HeatmapConfig) -> np.ndarray:
    """Draw the heatmap as an ``H×W×3`` uint8 RGB array of size :func:`figure_size_px`.

    Top row: the slide with the tumour outline and the top-k boxes; attention percentiles;
    instance tumour probability, both painted per patch footprint with ``cfg.alpha``. Under
    them their colour bars (0-1 fixed, so slides compare), then the top-k patches.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = figure_size_px(picture.thumbnail.shape, len(picture.top), cfg)
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    panel = width / 3.0
    rows = [_HEADER_PX, panel * _panel_aspect(picture.thumbnail), _COLOURBAR_PX]
    if len(picture.top):
        rows.append(width / max(len(picture.top), 6) + _STRIP_TITLE_PX)
    spec = fig.add_gridspec(
        len(rows),
        3,
        height_ratios=rows,
        left=0.01,
        right=0.99,
        top=1.0,
        bottom=0.005,
        wspace=0.03,
        hspace=0.08,
    )
    header = fig.add_subplot(spec[0, :])
    header.axis("off")
    line1, line2 = _title(picture)
    header.text(0.0, 0.78, line1, fontsize=17, fontweight="bold", va="center")
    header.text(0.0, 0.42, line2, fontsize=13, va="center", color="#333333")

    shape = picture.thumbnail.shape[:2]
    maps = picture.maps
    attention_cmap, tumour_cmap = colormaps[ATTENTION_CMAP], colormaps[TUMOUR_CMAP]
    painted_att = rasterise_patches(
        maps.percentile, picture.coords, picture.patch_size_level0, picture.downsample, shape
    )
    painted_tum = rasterise_patches(
        maps.tumour_prob, picture.coords, picture.patch_size_level0, picture.downsample, shape
    )
    branch = f" (branch: {picture.labels[maps.branch]})" if maps.n_branches > 1 else ""
    tumour_title = "instance tumour probability"
    if not maps.instance_trained:
        tumour_title += " (abmil: slide head per patch)"

    ax_slide = fig.add_subplot(spec[1, 0])
    _image_axes(ax_slide, picture.thumbnail, "slide")
    ax_att = fig.add_subplot(spec[1, 1])
    _image_axes(
        ax_att,
        blend_overlay(picture.thumbnail, painted_att, attention_cmap, cfg.alpha, 0.0, 1.0),
        f"attention, percentile within slide{branch}",
    )
    ax_tum = fig.add_subplot(spec[1, 2])
    _image_axes(
        ax_tum,
        blend_overlay(picture.thumbnail, painted_tum, tumour_cmap, cfg.alpha, 0.0, 1.0),
        tumour_title,
    )
    for ax in (ax_slide, ax_att, ax_tum):
        _draw_outline(ax, picture)
    _draw_top_boxes(ax_slide, picture)

    bars = spec[2, :].subgridspec(2, 3, height_ratios=[1, 2.6], wspace=0.12)
    _legend(fig.add_subplot(spec[2, 0]), picture)
    for column, cmap, label in (
        (1, attention_cmap, "attention percentile (1 = most attended patch of this slide)"),
        (2, tumour_cmap, "P(tumour) per patch"),
    ):
        _colourbar(fig, fig.add_subplot(bars[0, column]), cmap, label)
    if len(picture.top):
        _draw_strip(fig, spec[3, :], picture)

    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


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
            outline = tuple(_outline_rings(source.annotation, dims, annotation_settings_of(attrs)))
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
