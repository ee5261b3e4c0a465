"""Drawing one slide's heatmap picture: the slide, its attention and tumour maps, the top patches.

Pure: :func:`render_heatmap` takes a :class:`HeatmapPicture` (model outputs, thumbnail,
outline and patch images, all already read) and returns RGB pixels; nothing here reads a file
or runs a model. Drawing uses matplotlib's object API on an Agg canvas (no pyplot global
state), so it is safe in threads and needs no display.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from fedpath.client.training.heatmap_maps import SlideMaps
from fedpath.common.configbase import StrictModel

__all__ = [
    "HeatmapConfig",
    "HeatmapPicture",
    "blend_overlay",
    "figure_size_px",
    "rasterise_patches",
    "render_heatmap",
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


# --------------------------------------------------------------------------------------------
# Painting values onto a thumbnail grid
# --------------------------------------------------------------------------------------------


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
