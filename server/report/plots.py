"""The report's figures: matplotlib drawings of ``report.series``, rendered to PNG bytes.

Plots use matplotlib's object API on an Agg canvas: no pyplot, so no global figure state and
no display backend. Every axis has a title with its unit. The page embeds each PNG as a data
URI, so the report stays one file.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from fedpath.server.report.series import (
    ROUND_AXIS,
    WEIGHT_AXIS,
    Panel,
    Series,
    auc_rows,
    epsilon_rows,
    loss_rows,
    rounds_for_plots,
    weights,
)
from fedpath.server.run_files import RoundRecord, RunFiles

PLOT_DPI = 130
CSS_PX_PER_INCH = 96
"""The ``<img>`` is shown at the figure's size in CSS pixels; the extra dots keep it sharp on
high-density screens."""
ANNOTATE_MAX_ROUNDS = 15
"""Up to this many rounds every round is a tick and the weight bars carry their values and
retry/failure marks; beyond it they would overlap."""
GLOBAL_COLOUR = "black"


@dataclass(frozen=True)
class Plot:
    """One figure of the page and how the page introduces it."""

    name: str
    title: str
    caption: str


@dataclass(frozen=True)
class EmbeddedPlot:
    """A rendered figure as the page embeds it: PNG bytes and its display size in CSS px."""

    plot: Plot
    png: bytes
    width: int
    height: int

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def site_colours(sites: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per site, the same in every plot (tab10, tab20 beyond ten sites)."""
    cmap = colormaps["tab10" if len(sites) <= 10 else "tab20"]
    return {site: cmap(i % cmap.N) for i, site in enumerate(sites)}


def mpl_text(text: str) -> str:
    """A site name as matplotlib shows it literally: no mathtext, not hidden from legends."""
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PLOT_DPI, metadata={"Software": None})
    return buffer.getvalue()


def embed(plot: Plot, fig: Figure) -> EmbeddedPlot:
    """Render ``fig`` to PNG; the page shows it at the figure's size (96 CSS px per inch)."""
    width, height = fig.get_size_inches()
    return EmbeddedPlot(
        plot, _png(fig), round(width * CSS_PX_PER_INCH), round(height * CSS_PX_PER_INCH)
    )


def _round_axis(ax: Any, rounds: Sequence[int]) -> None:
    if len(rounds) <= ANNOTATE_MAX_ROUNDS:
        ax.set_xticks(list(rounds))  # every round labelled, also a single one
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rounds:
        ax.set_xlim(min(rounds) - 0.3, max(rounds) + 0.3)
    ax.grid(True, alpha=0.3)


def _colour(s: Series, colours: dict[str, Any]) -> Any:
    return GLOBAL_COLOUR if s.site is None else colours[s.site]


def _draw_series(ax: Any, rounds: Sequence[int], s: Series, colour: Any) -> None:
    """A line with markers; a thin dotted line bridges rounds the site missed."""
    kept = [(x, y) for x, y in zip(rounds, s.values, strict=True) if math.isfinite(y)]
    if len(kept) < len(rounds):
        xs, ys = zip(*kept, strict=True)
        ax.plot(xs, ys, color=colour, linewidth=0.9, linestyle=":", zorder=1)
    ax.plot(
        rounds,
        s.values,
        color=colour,
        linewidth=2.8 if s.is_global else 1.6,
        marker=s.marker,
        markersize=_marker_size(len(rounds), s.is_global),
        markerfacecolor=colour if s.is_global else "none",  # open: overlaps stay visible
        markeredgewidth=1.4,
        zorder=3 if s.is_global else 2,
    )


def _marker_size(n_rounds: int, is_global: bool) -> float:
    size = 7.0 if n_rounds <= 2 * ANNOTATE_MAX_ROUNDS else 4.0
    return size * 0.8 if is_global else size


def _legend_entries(
    panels: Iterable[Panel], colours: dict[str, Any]
) -> tuple[list[Line2D], list[str]]:
    """Each line label once (sites in order, the aggregate last), with its colour and marker."""
    seen: dict[str, Series] = {}
    for s in (s for p in panels for s in p.series):
        seen.setdefault(s.label, s)
    ordered = sorted(seen.values(), key=lambda s: s.is_global)
    handles = [
        Line2D(
            [],
            [],
            color=_colour(s, colours),
            marker=s.marker,
            markerfacecolor=_colour(s, colours) if s.is_global else "none",
            markeredgewidth=1.4,
            linewidth=2.8 if s.is_global else 1.6,
        )
        for s in ordered
    ]
    return handles, [mpl_text(s.label) for s in ordered]


def line_figure(
    rows: Sequence[Sequence[Panel]], rounds: Sequence[int], colours: dict[str, Any]
) -> Figure:
    """Rows of one or two panels over the same rounds; panels in a row share their y axis.

    A row holds one metric; its two panels are the global model and the local models, so the
    same y scale makes them directly comparable. A row with one panel spans the width. Every
    panel has its own round axis with ticks and title, so a panel read alone is labelled.
    """
    mosaic = [[f"{r}.0", f"{r}.{len(row) - 1}"] for r, row in enumerate(rows)]
    fig = Figure(figsize=(12.0, 0.9 + 3.4 * len(rows)), layout="constrained")
    axes = fig.subplot_mosaic(mosaic)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            ax = axes[f"{r}.{c}"]
            if c:
                ax.sharey(axes[f"{r}.0"])
            for s in panel.series:
                _draw_series(ax, rounds, s, _colour(s, colours))
            ax.set_title(panel.title, loc="left", fontsize=10.5)
            ax.set_ylabel(panel.ylabel)
            ax.set_xlabel(ROUND_AXIS)
            _round_axis(ax, rounds)
    entries = _legend_entries((p for row in rows for p in row), colours)
    fig.legend(*entries, loc="outside right upper")
    return fig


def _text_colour(background: Any) -> str:
    """Black or white, whichever reads better on ``background`` (an RGBA tuple)."""
    r, g, b = background[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def weights_figure(rounds: Sequence[RoundRecord], sites: Sequence[str], colours: Any) -> Figure:
    """Stacked bars: each round's aggregation weights; failures and retries marked above."""
    fig = Figure(figsize=(9.0, 3.8), layout="constrained")
    ax = fig.subplots()
    xs = [r.round for r in rounds]
    bottom = [0.0] * len(rounds)
    annotate = len(rounds) <= ANNOTATE_MAX_ROUNDS
    for site in sites:
        heights = weights(rounds, site)
        if not any(heights):
            continue
        ax.bar(xs, heights, bottom=bottom, color=colours[site], label=mpl_text(site), width=0.6)
        if annotate:
            for x, h, b in zip(xs, heights, bottom, strict=True):
                if h >= 0.05:
                    ax.text(
                        x,
                        b + h / 2,
                        f"{h:.2f}",
                        ha="center",
                        va="center",
                        fontsize=9,
                        color=_text_colour(colours[site]),
                    )
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    if annotate:
        for x, record in zip(xs, rounds, strict=True):
            marks = []
            if record.failed:
                marks.append(f"{len(record.failed)} failed")
            if record.attempt > 1:
                marks.append(f"attempt {record.attempt}")
            if marks:
                ax.text(
                    x,
                    1.03,
                    ", ".join(marks),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color="firebrick",
                )
    ax.set_ylim(0, 1.15)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_ylabel(WEIGHT_AXIS)
    ax.set_xlabel(ROUND_AXIS)
    ax.set_title("aggregation weights per round", loc="left", fontsize=11)
    _round_axis(ax, xs)
    ax.grid(False, axis="x")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="outside right upper")  # top of stack first
    return fig


def figures(run: RunFiles, rounds: Sequence[RoundRecord]) -> list[tuple[Plot, Figure]]:
    """Every plot the run has data for, in page order (a plot without data is left out)."""
    sites = run.site_names()
    colours = site_colours(sites)
    xs = [r.round for r in rounds]
    gaps = (
        " Left: the global model of the round evaluated at each site, with the server's"
        " aggregate over the sites in black; right: each site's own model after its local"
        " training. A dotted stretch bridges rounds in which a site did not reply."
    )
    made: list[tuple[Plot, Figure]] = []

    def emit(plot: Plot, fig: Figure | None) -> None:
        if fig is not None:
            made.append((plot, fig))

    def lines(rows: list[list[Panel]]) -> Figure | None:
        return line_figure(rows, xs, colours) if rows else None

    emit(
        Plot("loss", "Loss", "Training and validation loss per round." + gaps),
        lines(loss_rows(rounds, sites)),
    )
    emit(
        Plot(
            "auc",
            "AUC",
            "Validation slide AUC and patch AUC (localisation, where sites have patch labels)"
            " per round." + gaps,
        ),
        lines(auc_rows(rounds, sites)),
    )
    has_weights = any(r.weights for r in rounds)
    emit(
        Plot(
            "weights",
            "Aggregation weights",
            "Each bar is one round's weights (they sum to 1); a site that failed gets none.",
        ),
        weights_figure(rounds, sites, colours) if has_weights else None,
    )
    emit(
        Plot(
            "epsilon",
            "Privacy spent",
            "Cumulative ε of each site over all its local training so far.",
        ),
        lines(epsilon_rows(rounds, sites)),
    )
    return made


def render_plots(run: RunFiles) -> list[EmbeddedPlot]:
    """The run's plots as PNGs for the page."""
    return [embed(plot, fig) for plot, fig in figures(run, rounds_for_plots(run))]
