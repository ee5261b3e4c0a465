"""The run report: one self-contained HTML file rendered from a run directory alone.

A coordinator opens it after (or during) a federated run to see what happened: the settings
and the privacy guarantee, every round (which sites were asked, which answered, which failed
and why, the aggregation weights), per-round curves of loss, AUC, weights and ε, and the final
test table. It is rendered only from ``config.json``, ``metrics.jsonl`` and ``final.json``
(``server.run_files``), so it can be produced again at any time, on any machine, from a copied
run directory, without Flower or the hospitals.

``report.html`` is one file that is mailed on its own: the plots are PNG data URIs inside it,
there is no JavaScript and no external resource (it is opened on hospital and coordinator
machines that may be offline or locked down), and it names no absolute path of the machine
that rendered it: the run directory, its parent folder and the home folder are shown relative
(``checkpoints/…``, ``..``, ``~``), any other absolute path in a setting by its last component.
Settings that the run did not use (FedMix λ/β in a FedAvg run, DP settings with DP off, the
trainer's early stopping, which a federated round never does) are listed apart with the reason,
not among the settings in effect. Every string that comes from a run file (site names, failure
reasons, settings) is HTML-escaped, because a site name or an exception message is data, not
markup.

Plots use matplotlib's object API on an Agg canvas: no pyplot, so no global figure state and no
display backend. Every axis has a title with its unit. The page is written atomically.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from fedpath.common import __version__
from fedpath.common.atomic import atomic_write_text
from fedpath.server.run_files import (
    FINAL_FILE,
    EvalMetrics,
    RoundRecord,
    RunFiles,
    TrainMetrics,
    read_run,
)

REPORT_FILE = "report.html"
LEGACY_PLOTS_DIR = "plots"
LEGACY_PLOT_FILES = ("loss.png", "auc.png", "weights.png", "epsilon.png")
"""Earlier versions wrote the plots next to the page; a new render removes those files."""
PLOT_DPI = 130
CSS_PX_PER_INCH = 96
"""The ``<img>`` is shown at the figure's size in CSS pixels; the extra dots keep it sharp on
high-density screens."""
ANNOTATE_MAX_ROUNDS = 15
"""Up to this many rounds every round is a tick and the weight bars carry their values and
retry/failure marks; beyond it they would overlap."""

GLOBAL_COLOUR = "black"
SITE_MARKERS = "osD^vP*X"
"""A marker shape per site as well as a colour, so sites with equal values stay visible."""
NA = "n/a"

# --------------------------------------------------------------------------------------------
# Data: one record per round, and per-site series over rounds.


def rounds_for_plots(run: RunFiles) -> list[RoundRecord]:
    """One record per round number, in round order; a round written twice keeps its last line.

    A round appears twice only when a run was resumed and redid a round; the later line is the
    one whose weights the following rounds built on.
    """
    by_round: dict[int, RoundRecord] = {}
    for record in run.rounds:
        by_round[record.round] = record
    return [by_round[k] for k in sorted(by_round)]


def _finite(value: float | None) -> float:
    """``None`` as NaN, which matplotlib draws as a gap."""
    return math.nan if value is None else float(value)


def site_series(
    rounds: Sequence[RoundRecord], site: str, get: Callable[[RoundRecord, str], float | None]
) -> list[float]:
    """``get(record, site)`` for each round, NaN where the site has no value that round."""
    return [_finite(get(record, site)) for record in rounds]


def _train_value(name: str) -> Callable[[RoundRecord, str], float | None]:
    def get(record: RoundRecord, site: str) -> float | None:
        metrics = record.train.get(site)
        return None if metrics is None else getattr(metrics, name)

    return get


def _eval_value(name: str) -> Callable[[RoundRecord, str], float | None]:
    def get(record: RoundRecord, site: str) -> float | None:
        metrics = record.evaluate.get(site)
        return None if metrics is None else getattr(metrics, name)

    return get


def _epsilon(record: RoundRecord, site: str) -> float | None:
    spent = record.privacy.get(site)
    return None if spent is None else spent.epsilon


def _has_values(values: Iterable[float]) -> bool:
    return any(math.isfinite(v) for v in values)


# --------------------------------------------------------------------------------------------
# Plots.


ROUND_AXIS = "federated round (no.)"
TRAIN_LOSS_AXIS = "training loss (mean per slide)"
VAL_LOSS_AXIS = "validation loss (slide cross-entropy, nats)"
SLIDE_AUC_AXIS = "validation slide AUC (0–1)"
PATCH_AUC_AXIS = "validation patch AUC (0–1)"
EPSILON_AXIS = "cumulative ε (dimensionless)"
WEIGHT_AXIS = "aggregation weight (share, 0–1)"
"""Axis titles with their unit (or scale, for a unitless number): a plot mailed on its own or
pasted into a slide still says what it shows."""

GLOBAL_LABEL = "all sites (server aggregate)"
GLOBAL_MODEL = "global model evaluated at each site"
LOCAL_MODEL = "each site's model after its local training"


@dataclass(frozen=True)
class Series:
    """One line of a panel: a site's values (or the server's aggregate) over the rounds."""

    label: str
    values: list[float]
    colour: Any
    marker: str = "o"
    is_global: bool = False


@dataclass(frozen=True)
class Panel:
    """One axes of a line figure: a title, a y label and its lines."""

    title: str
    ylabel: str
    series: list[Series]


@dataclass(frozen=True)
class Plot:
    """One figure of the page (embedded as a PNG data URI) and how the page introduces it."""

    name: str
    title: str
    caption: str


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


@dataclass(frozen=True)
class EmbeddedPlot:
    """A rendered figure as the page embeds it: PNG bytes and its display size in CSS px."""

    plot: Plot
    png: bytes
    width: int
    height: int

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


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


def _draw_series(ax: Any, rounds: Sequence[int], s: Series) -> None:
    """A line with markers; a thin dotted line bridges rounds the site missed."""
    kept = [(x, y) for x, y in zip(rounds, s.values, strict=True) if math.isfinite(y)]
    if len(kept) < len(rounds):
        xs, ys = zip(*kept, strict=True)
        ax.plot(xs, ys, color=s.colour, linewidth=0.9, linestyle=":", zorder=1)
    ax.plot(
        rounds,
        s.values,
        color=s.colour,
        linewidth=2.8 if s.is_global else 1.6,
        marker=s.marker,
        markersize=_marker_size(len(rounds), s.is_global),
        markerfacecolor=s.colour if s.is_global else "none",  # open: overlaps stay visible
        markeredgewidth=1.4,
        zorder=3 if s.is_global else 2,
    )


def _marker_size(n_rounds: int, is_global: bool) -> float:
    size = 7.0 if n_rounds <= 2 * ANNOTATE_MAX_ROUNDS else 4.0
    return size * 0.8 if is_global else size


def _legend_entries(panels: Iterable[Panel]) -> tuple[list[Line2D], list[str]]:
    """Each line label once (sites in order, the aggregate last), with its colour and marker."""
    seen: dict[str, Series] = {}
    for s in (s for p in panels for s in p.series):
        seen.setdefault(s.label, s)
    ordered = sorted(seen.values(), key=lambda s: s.is_global)
    handles = [
        Line2D(
            [],
            [],
            color=s.colour,
            marker=s.marker,
            markerfacecolor=s.colour if s.is_global else "none",
            markeredgewidth=1.4,
            linewidth=2.8 if s.is_global else 1.6,
        )
        for s in ordered
    ]
    return handles, [mpl_text(s.label) for s in ordered]


def line_figure(rows: Sequence[Sequence[Panel]], rounds: Sequence[int]) -> Figure:
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
                _draw_series(ax, rounds, s)
            ax.set_title(panel.title, loc="left", fontsize=10.5)
            ax.set_ylabel(panel.ylabel)
            ax.set_xlabel(ROUND_AXIS)
            _round_axis(ax, rounds)
    fig.legend(*_legend_entries(p for row in rows for p in row), loc="outside right upper")
    return fig


def _site_lines(
    rounds: Sequence[RoundRecord],
    sites: Sequence[str],
    colours: dict[str, Any],
    get: Callable[[RoundRecord, str], float | None],
) -> list[Series]:
    lines = [
        Series(s, site_series(rounds, s, get), colours[s], SITE_MARKERS[i % len(SITE_MARKERS)])
        for i, s in enumerate(sites)
    ]
    return [line for line in lines if _has_values(line.values)]


def _global_line(rounds: Sequence[RoundRecord], name: str) -> list[Series]:
    values = [_finite(getattr(r.global_, name)) for r in rounds]
    if not _has_values(values):
        return []
    return [Series(GLOBAL_LABEL, values, GLOBAL_COLOUR, "o", is_global=True)]


def _metric_row(
    metric: str,
    ylabel: str,
    rounds: Sequence[RoundRecord],
    sites: Sequence[str],
    colours: dict[str, Any],
    *,
    global_key: str,
    evaluate_key: str | None,
    train_key: str,
) -> list[Panel]:
    """One metric: the global model at each site (with the aggregate), then the local models.

    The aggregate (``global`` in metrics.jsonl) is what the server pooled from the sites'
    evaluation of the global model, except for the training loss, which only local training
    has; it is drawn in the panel it belongs to.
    """
    local = _site_lines(rounds, sites, colours, _train_value(train_key))
    aggregate = _global_line(rounds, global_key)
    if evaluate_key is None:
        return _panels(
            [Panel(f"{metric} of each site's local training", ylabel, aggregate + local)]
        )
    evaluated = _site_lines(rounds, sites, colours, _eval_value(evaluate_key))
    return _panels(
        [
            Panel(f"{metric}: {GLOBAL_MODEL}", ylabel, aggregate + evaluated),
            Panel(f"{metric}: {LOCAL_MODEL}", ylabel, local),
        ]
    )


def _panels(candidates: Iterable[Panel]) -> list[Panel]:
    return [p for p in candidates if p.series]


def _rows(candidates: Iterable[list[Panel]]) -> list[list[Panel]]:
    return [row for row in candidates if row]


def loss_rows(
    rounds: Sequence[RoundRecord], sites: Sequence[str], colours: Any
) -> list[list[Panel]]:
    """Training loss (local training only), then validation loss (global and local models)."""
    return _rows(
        [
            _metric_row("last-epoch loss", TRAIN_LOSS_AXIS, rounds, sites, colours,
                        global_key="train_loss", evaluate_key=None, train_key="train_loss"),
            _metric_row("loss", VAL_LOSS_AXIS, rounds, sites, colours,
                        global_key="val_loss", evaluate_key="loss", train_key="val_loss"),
        ]
    )  # fmt: skip


def auc_rows(
    rounds: Sequence[RoundRecord], sites: Sequence[str], colours: Any
) -> list[list[Panel]]:
    """Validation slide AUC, then patch AUC (localisation), global and local models."""
    return _rows(
        [
            _metric_row("slide AUC", SLIDE_AUC_AXIS, rounds, sites, colours,
                        global_key="val_auc", evaluate_key="auc", train_key="val_auc"),
            _metric_row("patch AUC", PATCH_AUC_AXIS, rounds, sites, colours,
                        global_key="val_patch_auc", evaluate_key="patch_auc",
                        train_key="val_patch_auc"),
        ]
    )  # fmt: skip


def epsilon_rows(
    rounds: Sequence[RoundRecord], sites: Sequence[str], colours: Any
) -> list[list[Panel]]:
    """Cumulative ε per site; δ in the title when all sites share it, else in the legend."""
    deltas = {site: spent.delta for record in rounds for site, spent in record.privacy.items()}
    lines = _site_lines(rounds, sites, colours, _epsilon)
    title = "privacy spent: cumulative ε per site"
    if len(set(deltas.values())) == 1:
        title += f" (δ = {next(iter(deltas.values())):.0e})"
    else:
        lines = [replace(s, label=f"{s.label} (δ = {deltas[s.label]:.0e})") for s in lines]
    return _rows([_panels([Panel(title, EPSILON_AXIS, lines)])])


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
        heights = [r.weights.get(site, 0.0) for r in rounds]
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
        return line_figure(rows, xs) if rows else None

    emit(
        Plot("loss", "Loss", "Training and validation loss per round." + gaps),
        lines(loss_rows(rounds, sites, colours)),
    )
    emit(
        Plot(
            "auc",
            "AUC",
            "Validation slide AUC and patch AUC (localisation, where sites have patch labels)"
            " per round." + gaps,
        ),
        lines(auc_rows(rounds, sites, colours)),
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
        lines(epsilon_rows(rounds, sites, colours)),
    )
    return made


def render_plots(run: RunFiles) -> list[EmbeddedPlot]:
    """The run's plots as PNGs for the page."""
    return [embed(plot, fig) for plot, fig in figures(run, rounds_for_plots(run))]


# --------------------------------------------------------------------------------------------
# HTML.


class Html(str):
    """Markup that is already safe; every other table cell is escaped."""


def esc(value: Any) -> str:
    """Escape text for HTML (both ``<>&`` and quotes, so it is safe in attributes too)."""
    return html.escape(str(value), quote=True)


def fmt(value: float | None, digits: int = 4) -> str:
    """A metric as the tables show it: ``n/a`` for missing or NaN."""
    if value is None or math.isnan(value):
        return NA
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}f}"


def _cell(value: Any) -> str:
    return value if isinstance(value, Html) else esc(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric_from: int = 1) -> Html:
    """A table; columns from ``numeric_from`` on are right-aligned (numbers)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_cell(v)}</td>' if i >= numeric_from else f"<td>{_cell(v)}</td>"
            for i, v in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return Html(
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def lines_html(items: Iterable[str]) -> Html:
    """Plain-text items, escaped, one per line in a cell."""
    return Html("<br>".join(esc(i) for i in items) or "–")


def planned_rounds(run: RunFiles) -> int | None:
    """The number of rounds the run was configured for, if known."""
    if run.final is not None:
        return run.final.num_rounds
    planned = run.config.run_config.get("num-server-rounds") if run.config else None
    return planned if isinstance(planned, int) and not isinstance(planned, bool) else None


def status_text(run: RunFiles) -> tuple[str, str]:
    """(CSS class, sentence) saying how the run ended, or that it has not."""
    planned = planned_rounds(run)
    of = f" of {planned}" if planned is not None else ""
    final = run.final
    if final is None:
        done = run.last_round
        where = f"after round {done}{of}" if done else "before its first round completed"
        return "running", f"No final results: run in progress or interrupted {where}."
    rounds = f"{final.rounds_completed} of {final.num_rounds} rounds"
    if final.status == "completed":
        return "ok", f"Completed: {rounds}."
    reason = f": {final.reason}" if final.reason else ""
    return "failed", f"Run {final.status} after {rounds}{reason}."


def _kv_grid(items: Iterable[tuple[str, Any]]) -> Html:
    cells = "".join(
        f'<div><span class="key">{esc(k)}</span> {esc(_setting(v))}</div>' for k, v in items
    )
    return Html(f'<div class="settings">{cells}</div>')


def _setting(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None or value == "":
        return "–"
    return str(value)


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key in sorted(data):
        value = data[key]
        if isinstance(value, dict) and value:
            items.extend(_flatten(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def run_title(run: RunFiles) -> str:
    """``run <Flower run id>``, or the directory's name when config.json was never written."""
    if run.config is not None:
        return f"run {run.config.flwr_run_id}"
    return f"run directory {run.run_dir.name}"


def header_html(run: RunFiles, scrub: PathScrub) -> str:
    """Title, status, the main facts, the privacy guarantee and the run settings."""
    cfg = run.config
    css, sentence = status_text(run)
    title = f"<h1>fedpath run report: {esc(run_title(run))}</h1>"
    banner = f'<p class="status {css}">{esc(sentence)}</p>'
    if cfg is None:
        missing = (
            "<p>config.json is missing: the run stopped before it started, so no settings, "
            "sites or privacy guarantee were recorded.</p>"
        )
        return f"{title}{banner}{missing}"
    strategy = cfg.run_config.get("strategy") or (run.rounds[-1].strategy if run.rounds else NA)
    facts = [
        ("Flower run id", cfg.flwr_run_id),
        ("fedpath version", cfg.fedpath_version),
        ("started (UTC)", cfg.started),
        ("strategy", strategy),
        ("sites", len(run.site_names())),
        ("rounds completed", run.last_round),
    ]
    if run.latest_checkpoint is not None:
        facts.append(("latest checkpoint", run.latest_checkpoint.relative_to(run.run_dir)))
    return (
        f"{title}{banner}{_kv_grid(facts)}"
        f'<h2>Privacy guarantee</h2><p class="privacy">{esc(guarantee_text(run))}</p>'
        f"{privacy_summary_html(run)}{client_level_html(run)}"
        f"<h2>Run settings</h2>"
        f"{settings_html(cfg.run_config, unused_run_settings(cfg.run_config), scrub)}"
        f'<p class="note">{esc(PATH_SETTINGS_NOTE)}</p>'
    )


# --------------------------------------------------------------------------------------------
# Settings that apply, and those that do not.

NO_EARLY_STOPPING = (
    "a federated round trains local-epochs with no validation inside the round, so there is "
    "no early stopping and no best-epoch choice: the server's round count decides"
)
DP_SGD_SAMPLING = (
    "slide-level DP-SGD draws each step's slides by Poisson sampling, one slide per forward "
    "pass, and clips each slide's gradient to dp-max-grad-norm"
)
PATH_SETTINGS_NOTE = (
    "Paths are shown relative to the run directory (.. is the folder that holds it, ~ the "
    "home folder); other absolute paths by their last part: the report names no absolute "
    "path of the machine it was rendered on."
)


def _number(value: Any) -> float:
    """A numeric setting as a float (0 for anything else: the off value of every DP knob)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return 0.0


def unused_run_settings(run_config: dict[str, Any]) -> dict[str, str]:
    """Run-config keys this run did not use, each with the reason (from the run's own values).

    A key only listed here was recorded (config.json holds every key with its default) but
    could not have changed the run: showing it among the settings in effect would suggest it
    did.
    """
    unused: dict[str, str] = {}
    strategy = run_config.get("strategy")
    if strategy is not None and strategy != "fedmix":
        for key in ("fedmix-lambda", "fedmix-beta"):
            unused[key] = f"λ and β weigh FedMix only; the strategy is {strategy}"
    if run_config.get("client-dp", "off") == "off":
        for key in run_config:
            if key.startswith("client-dp-"):
                unused[key] = "client-level DP is off (client-dp = off)"
    sigma = _number(run_config.get("dp-noise-multiplier"))
    target = _number(run_config.get("dp-target-epsilon"))
    if sigma == 0 and target == 0:
        for key in run_config:
            if key.startswith("dp-") and key not in ("dp-noise-multiplier", "dp-target-epsilon"):
                unused[key] = (
                    "slide-level DP-SGD is off (dp-noise-multiplier and dp-target-epsilon are 0)"
                )
    elif sigma == 0:
        unused["dp-noise-multiplier"] = "σ is solved from dp-target-epsilon"
    elif target == 0:
        unused["dp-target-epsilon"] = "σ is given by dp-noise-multiplier"
    if run_config.get("resume") == "":
        unused["resume"] = "not a resumed run"
    if run_config.get("simulation-data") == "":
        unused["simulation-data"] = "not a simulation: each SuperNode names its own data"
    return unused


def unused_train_settings(
    train_config: dict[str, Any], run_config: dict[str, Any]
) -> dict[str, str]:
    """Keys of the recorded trainer config (flattened) that a federated round does not use."""
    unused = {
        key: NO_EARLY_STOPPING
        for key in ("patience", "min_epochs", "stopping_loss")
        if key in train_config
    }
    supervision = train_config.get("supervision")
    if isinstance(supervision, dict) and supervision.get("mode") == "weak":
        for key in ("annotated_positives", "attention_weight", "oversample_weight",
                    "oversample_decay"):  # fmt: skip
            if key in supervision:
                unused[f"supervision.{key}"] = "supervision is weak: patch labels are not used"
    dp_on = _number(run_config.get("dp-noise-multiplier")) > 0 or (
        _number(run_config.get("dp-target-epsilon")) > 0
    )
    if dp_on:
        for key in ("grad_clip", "steps_per_epoch", "max_batch_patches"):
            if key in train_config:
                unused[key] = DP_SGD_SAMPLING
        if isinstance(supervision, dict):
            for key in ("pair_normal_tumour", "oversample_weight", "oversample_decay"):
                if key in supervision:
                    unused[f"supervision.{key}"] = DP_SGD_SAMPLING
    return unused


def is_absolute_path(text: str) -> bool:
    """True for a POSIX or Windows absolute path (the run may come from either kind of host)."""
    return PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute()


def shown_path(value: Any, scrub: PathScrub) -> Any:
    """A string setting as the page shows it: run-relative where :class:`PathScrub` can make it
    so, and an absolute path it cannot (a data folder elsewhere) by its last part: ``…/name``."""
    if not isinstance(value, str):
        return value
    value = scrub(value)
    if not is_absolute_path(value):
        return value
    name = re.split(r"[\\/]", value.rstrip("\\/"))[-1]
    return f"…/{name}" if name and not name.endswith(":") else "…"


def settings_html(
    settings: dict[str, Any], unused: dict[str, str], scrub: PathScrub, *, flatten: bool = False
) -> str:
    """The settings in effect as a grid; those the run did not use apart, with the reason."""
    items = _flatten(settings) if flatten else sorted(settings.items())
    used = [(k, shown_path(v, scrub)) for k, v in items if k not in unused]
    skipped = [(k, shown_path(v, scrub)) for k, v in items if k in unused]
    shown = _kv_grid(used)
    if not skipped:
        return shown
    rows = [[key, _setting(value), unused[key]] for key, value in skipped]
    return (
        f"{shown}<details><summary>{len(skipped)} recorded setting(s) did not apply to this "
        f"run</summary>{table(['setting', 'value', 'why it did not apply'], rows, 99)}"
        "</details>"
    )


def guarantee_text(run: RunFiles) -> str:
    """What the aggregated rounds delivered (final.json), else what config.json planned."""
    if run.final is not None and run.final.privacy_guarantee:
        return run.final.privacy_guarantee
    return run.config.privacy_guarantee if run.config is not None else NA


def client_level_html(run: RunFiles) -> str:
    """The federation's client-level ε after each round, with the noise that round got."""
    rows = [
        [
            str(r.round),
            fmt(r.client_dp.epsilon, 3),
            f"{r.client_dp.delta:.1e}",
            f"{r.client_dp.clip_norm:g}",
            f"{r.client_dp.noise_multiplier:g}",
            f"{r.client_dp.max_weight:.3f}",
            f"{r.client_dp.noise_std:.3g}",
            r.client_dp.accountant,
        ]
        for r in rounds_for_plots(run)
        if r.client_dp is not None
    ]
    if not rows:
        return ""
    return (
        "<h3>Client-level DP (sites as privacy unit): ε of the federation by round</h3>"
        "<p>Each site's update is clipped to norm C at the server and the aggregate gets "
        "Gaussian noise of std σ·C·max w (the largest aggregation weight of the round).</p>"
        + table(
            ["round", "ε", "δ", "C", "σ", "max w", "noise std", "accountant"],
            rows,
        )
    )


def privacy_summary_html(run: RunFiles) -> str:
    """Each site's latest (ε, δ), or a plain statement that no ε was reported."""
    latest: dict[str, tuple[int, float, float]] = {}
    for record in run.rounds:
        for site, spent in record.privacy.items():
            latest[site] = (record.round, spent.epsilon, spent.delta)
    if not latest:
        return "<p>No site reported a privacy budget (ε) in any round.</p>"
    rows = [
        (site, fmt(eps, 3), f"{delta:.1e}", rnd)
        for site in run.site_names()
        if site in latest
        for rnd, eps, delta in [latest[site]]
    ]
    return str(table(["site", "ε spent", "δ", "as of round"], rows))


METRIC_HEADERS = {
    "num_examples": "slides",
    "loss": "loss",
    "auc": "slide AUC",
    "patch_auc": "patch AUC",
    "balanced_accuracy": "balanced accuracy",
    "f1": "F1",
    "brier": "Brier score",
    "ece": "ECE",
    "threshold": "threshold",
    "temperature": "temperature",
}
"""Column order and headers of the metrics fedpath knows; any other key final.json holds is
shown after them under its own name, so a metric added to the run files appears here without
a change to the report."""
_ACRONYMS = {"auc": "AUC", "ece": "ECE", "f1": "F1", "ci": "CI", "nll": "NLL", "ap": "AP"}


def metric_header(key: str) -> str:
    """``patch_auc_pooled`` → ``patch AUC pooled``: a readable header for any metric key."""
    if key in METRIC_HEADERS:
        return METRIC_HEADERS[key]
    return " ".join(_ACRONYMS.get(word, word) for word in key.split("_"))


def metric_text(value: Any) -> str:
    """Any JSON metric value as a cell: numbers to 4 places, a (low, high) pair as a range, a
    ``{"value", "low", "high"}`` record as ``value (low – high)``."""
    if value is None:
        return NA
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, list):
        if len(value) == 2 and all(isinstance(v, int | float) for v in value):
            return f"{metric_text(value[0])} – {metric_text(value[1])}"
        return ", ".join(metric_text(v) for v in value) or NA
    if isinstance(value, dict):
        if "value" in value:
            text = metric_text(value["value"])
            low, high = value.get("low"), value.get("high")
            if isinstance(low, int | float) and isinstance(high, int | float):
                text += f" ({metric_text(float(low))} – {metric_text(float(high))})"
            return text
        return "; ".join(f"{k} {metric_text(v)}" for k, v in value.items()) or NA
    return str(value)


def _raw_final(run: RunFiles) -> dict[str, Any]:
    """``final.json`` as written, for the metric keys the typed reader does not know (yet)."""
    try:
        data = json.loads((run.run_dir / FINAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def metric_columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Every metric key of the rows: fedpath's known ones in their order, then others sorted."""
    present = {key for row in rows for key in row}
    known = [key for key in METRIC_HEADERS if key in present]
    return known + sorted(present - set(METRIC_HEADERS))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


LEGACY_GLOBAL_TEST_NOTE = (
    "final.json does not say how its all-sites row (global_test) was computed; fedpath "
    "versions that do not say wrote the mean of the sites' values weighted by their test "
    "slides, not a metric over all slides at once."
)
FINAL_KEYS_SHOWN_ELSEWHERE = frozenset(
    {"status", "reason", "rounds_completed", "num_rounds", "test", "global_test",
     "privacy_guarantee", "privacy"}
)  # fmt: skip


def _global_test_note(overall: dict[str, Any]) -> str:
    """How the all-sites row was computed, in final.json's own words when it has them."""
    pooling = overall.get("pooling")
    text = f"All sites: {pooling}" if isinstance(pooling, str) and pooling else None
    return f'<p class="note">{esc(text or LEGACY_GLOBAL_TEST_NOTE)}</p>'


def all_metrics_html(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Every key of every row, one metric per line and one column per row (sites, all sites):
    a metric a newer fedpath adds to final.json shows here without a change to the report."""
    keys = metric_columns(m for _, m in rows)
    body = [[metric_header(key), *(metric_text(m.get(key)) for _, m in rows)] for key in keys]
    return (
        "<details><summary>Every test metric final.json holds "
        f"({len(keys)} keys)</summary>"
        f"{table(['metric', *(name for name, _ in rows)], body)}</details>"
    )


def other_final_html(raw: dict[str, Any]) -> str:
    """Blocks of final.json no other section shows (calibration, a newer writer's records)."""
    parts = []
    scalars = []
    for key in sorted(set(raw) - FINAL_KEYS_SHOWN_ELSEWHERE):
        value = raw[key]
        if isinstance(value, dict):
            if value:
                parts.append(f"<h3>{esc(metric_header(key))}</h3>{_kv_grid(_flatten(value))}")
        else:
            scalars.append((key, metric_text(value) if _is_number(value) else value))
    if scalars:
        parts.append(_kv_grid(scalars))
    return "".join(parts)


def final_html(run: RunFiles) -> str:
    """The final test table: each site, then all sites; every metric key of final.json shown.

    The table's columns are the headline metrics fedpath knows (in a fixed order); every key
    of final.json's test records, known or not, is listed below it, so a metric added to the
    run files later (calibration, intervals) appears without a change here.
    """
    final = run.final
    if final is None:
        return f"<h2>Final test results</h2><p>{esc(status_text(run)[1])}</p>"
    raw = _raw_final(run)
    tests = raw.get("test") if isinstance(raw.get("test"), dict) else {}
    records: list[tuple[str, dict[str, Any]]] = [
        (site, tests[site])
        for site in run.site_names()
        if site in final.test and isinstance(tests.get(site), dict)
    ]
    overall = raw.get("global_test") if final.global_test is not None else None
    if isinstance(overall, dict):
        records.append(("all sites", overall))
    others = other_final_html(raw)
    if not records:
        return f"<h2>Final test results</h2><p>The run ended without test results.</p>{others}"
    headline = [
        key for key in METRIC_HEADERS if any(_is_number(m.get(key)) for _, m in records)
    ] or metric_columns(m for _, m in records)
    rows: list[list[Any]] = [
        [
            Html("<strong>all sites</strong>") if m is overall else name,
            *(metric_text(m.get(key)) for key in headline),
        ]
        for name, m in records
    ]
    note = _global_test_note(overall) if isinstance(overall, dict) else ""
    return (
        "<h2>Final test results</h2><p>The final global model on each site's test split.</p>"
        f"{table(['site', *(metric_header(k) for k in headline)], rows)}{note}"
        f"{all_metrics_html(records)}{others}"
    )


def plots_html(plots: Sequence[EmbeddedPlot], tokens: dict[str, str]) -> str:
    """The figures; each ``<img>`` holds a marker token that becomes its data URI last."""
    if not plots:
        return "<h2>Curves</h2><p>No round has completed yet: nothing to plot.</p>"
    figures = "".join(
        f'<figure><h3>{esc(e.plot.title)}</h3><img src="{tokens[e.plot.name]}" '
        f'width="{e.width}" height="{e.height}" alt="{esc(e.plot.title)}">'
        f"<figcaption>{esc(e.plot.caption)}</figcaption></figure>"
        for e in plots
    )
    return f"<h2>Curves</h2>{figures}"


def utc_time(seconds: float) -> str:
    """A unix time as the tables show it (UTC, to the second)."""
    if not math.isfinite(seconds):
        return NA
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def _attempt(record: RoundRecord) -> Html:
    if record.attempt == 1:
        return Html("1")
    return Html(f'<span class="warn">{record.attempt} (retried)</span>')


def _failed(record: RoundRecord) -> Html:
    if not record.failed:
        return Html("–")
    return Html(
        "<br>".join(
            f'<span class="warn">{esc(site)}</span>: <span class="reason">{esc(reason)}</span>'
            for site, reason in record.failed.items()
        )
    )


def rounds_html(run: RunFiles) -> str:
    """Every line of metrics.jsonl as a row: who was asked, who answered, who failed and why."""
    if not run.rounds:
        return "<h2>Rounds</h2><p>No round has completed yet.</p>"
    rows = [
        [
            str(r.round),
            _attempt(r),
            utc_time(r.started),
            lines_html(r.sampled),
            lines_html(r.replied),
            _failed(r),
            lines_html(f"{site}: {w:.3f}" for site, w in r.weights.items()),
            fmt(r.global_.train_loss),
            fmt(r.global_.val_auc),
            f"{r.seconds:.1f}",
        ]
        for r in run.rounds
    ]
    headers = [
        "round",
        "attempt",
        "started (UTC)",
        "sampled",
        "replied",
        "failed (reason)",
        "weights",
        "train loss",
        "val AUC",
        "seconds",
    ]
    return (
        "<h2>Rounds</h2><p>One row per completed round. Train loss and val AUC are the "
        "server's aggregates over the sites that replied.</p>"
        f"{table(headers, rows, numeric_from=7)}{_duplicate_rounds_note(run)}"
    )


def _duplicate_rounds_note(run: RunFiles) -> str:
    counts: dict[int, int] = {}
    for record in run.rounds:
        counts[record.round] = counts.get(record.round, 0) + 1
    repeated = [str(k) for k, n in counts.items() if n > 1]
    if not repeated:
        return ""
    return (
        f'<p class="warn">Round(s) {esc(", ".join(repeated))} appear on more than one line '
        "(a resumed run redid them); the curves use the last line of each.</p>"
    )


def _site_state(record: RoundRecord, site: str) -> Html:
    if site in record.failed:
        reason = esc(record.failed[site])
        return Html(f'<span class="warn">failed</span>: <span class="reason">{reason}</span>')
    if site in record.budget_exhausted:
        return Html(
            '<span class="warn">privacy budget exhausted</span>: not trained, not aggregated'
        )
    if site in record.replied:
        return Html("replied")
    if site in record.sampled:
        return Html('<span class="warn">no answer</span>')
    return Html("not sampled")


def _site_round_row(record: RoundRecord, site: str) -> list[Any]:
    t = record.train.get(site)
    e = record.evaluate.get(site)
    p = record.privacy.get(site)
    w = record.weights.get(site)
    return [
        str(record.round),
        site,
        _site_state(record, site),
        NA if w is None else f"{w:.3f}",
        NA if t is None else str(t.num_examples),
        fmt(None if t is None else t.train_loss),
        fmt(None if t is None else t.val_loss),
        fmt(None if t is None else t.val_auc),
        fmt(None if t is None else t.val_patch_auc),
        fmt(None if t is None else t.seconds, 1),
        fmt(None if e is None else e.loss),
        fmt(None if e is None else e.auc),
        _skipped_cell(t, e),
        fmt(None if p is None else p.epsilon, 3),
    ]


def _skipped_count(metrics: TrainMetrics | EvalMetrics | None) -> int | None:
    if metrics is None or metrics.skipped_slides is None:
        return None
    return int(metrics.skipped_slides)


def _skipped_cell(train: TrainMetrics | None, evaluation: EvalMetrics | None) -> Html | str:
    counts = (_skipped_count(train), _skipped_count(evaluation))
    if counts == (None, None):
        return NA
    text = " / ".join(NA if c is None else str(c) for c in counts)
    return Html(f'<span class="warn">{esc(text)}</span>') if any(counts) else text


def skipped_slides_html(run: RunFiles) -> str:
    """A warning naming each site and round where slides were left out (counts only).

    Slide ids never leave a hospital, so the page can only say how many and where to look.
    """
    notes = []
    for record in run.rounds:
        for site in run.site_names():
            train = _skipped_count(record.train.get(site)) or 0
            evaluation = _skipped_count(record.evaluate.get(site)) or 0
            if train or evaluation:
                notes.append(
                    f"round {record.round}, {esc(site)}: {train} training/validation and "
                    f"{evaluation} evaluation slide(s)"
                )
    if not notes:
        return ""
    return (
        '<p class="warn">Slides left out because their feature bags failed validation '
        "(wrong dimension or encoder, NaN/Inf, unreadable): "
        f"{'; '.join(notes)}. The site's own log names each slide and the problem; "
        "re-run <code>fedpath prepare</code> there.</p>"
    )


def site_rounds_html(run: RunFiles) -> str:
    """Each site's numbers in each round (training reply, evaluation of the global model, ε)."""
    if not run.rounds:
        return ""
    sites = run.site_names()
    rows = [_site_round_row(r, s) for r in run.rounds for s in sites]
    headers = [
        "round",
        "site",
        "state",
        "weight",
        "train slides",
        "train loss",
        "val loss",
        "val AUC",
        "val patch AUC",
        "train s",
        "eval loss",
        "eval AUC",
        "skipped (train / eval)",
        "ε",
    ]
    return (
        "<h2>Per-site results by round</h2><p>Train and val columns are the site's reply "
        "after local training; eval columns are the global model evaluated at the site.</p>"
        f"{table(headers, rows, numeric_from=3)}{skipped_slides_html(run)}"
    )


def _opt(value: Any) -> str:
    return "–" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def sites_html(run: RunFiles) -> str:
    """What each site declared before round 1 (the harmonisation facts)."""
    if run.config is None or not run.config.sites:
        return ""
    rows = [
        [
            name,
            _opt(s.encoder),
            Html(f'<code title="{esc(s.encoder_sha256)}">{esc(s.encoder_sha256[:12])}</code>')
            if s.encoder_sha256
            else "–",
            _opt(s.feature_dim),
            _opt(s.target_mpp),
            _opt(s.patch_size),
            ", ".join(s.labels) if s.labels else "–",
            _opt(s.n_slides),
            _opt(s.slides_with_patch_labels),
        ]
        for name, s in run.config.sites.items()
    ]
    headers = ["site", "encoder", "weights sha256", "feature dim", "µm/px", "patch px",
               "labels", "slides", "with patch labels"]  # fmt: skip
    return f"<h2>Sites</h2>{table(headers, rows, numeric_from=3)}"


def configs_html(run: RunFiles, scrub: PathScrub) -> str:
    """The model and training configuration the sites trained with."""
    if run.config is None:
        return ""
    parts = []
    model, train = run.config.model_config_, run.config.train_config
    if model:
        parts.append(f"<h3>Model</h3>{settings_html(model, {}, scrub, flatten=True)}")
    if train:
        unused = unused_train_settings(train, run.config.run_config)
        parts.append(
            "<h3>Local training (each site, each round)</h3><p>epochs is the local epochs of "
            f"one round.</p>{settings_html(train, unused, scrub, flatten=True)}"
        )
    return f"<h2>Model and training configuration</h2>{''.join(parts)}" if parts else ""


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1150px; margin: 1.5em auto; padding: 0 1em; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; }
.status { padding: 0.6em 0.9em; border-radius: 4px; font-weight: 600; white-space: pre-wrap; }
.reason { white-space: pre-wrap; }
.status.ok { background: #e3f4e3; border: 1px solid #7bbf7b; }
.status.failed { background: #fbe3e3; border: 1px solid #d67a7a; }
.status.running { background: #fff4d6; border: 1px solid #d9b44a; }
.privacy { background: #eef3fb; border-left: 4px solid #5b84c4; padding: 0.5em 0.8em; }
.settings { display: grid; grid-template-columns: repeat(auto-fill, minmax(17em, 1fr));
            gap: 0.2em 1.2em; font-size: 0.92em; }
.key { color: #666; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; vertical-align: top; }
th { background: #f0f0f0; text-align: left; }
tbody tr:nth-child(even) { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.warn { color: #b22222; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
.note { font-size: 0.9em; color: #555; }
details { margin: 0.4em 0; font-size: 0.92em; }
summary { cursor: pointer; color: #555; }
figcaption { font-size: 0.9em; color: #555; }
footer { margin-top: 2em; font-size: 0.85em; color: #777; }
"""


class PathScrub:
    """Rewrites the absolute paths of the rendering machine that a run's text may hold.

    Failure reasons and settings are written by the ServerApp on the coordinator's machine and
    can name its folders (a checkpoint that could not be read, ``runs-dir``, ``resume``). The
    page is mailed, so they are shown relative to the run directory: the run directory's
    content as ``checkpoints/…``, the run directory itself by its name, its parent folder as
    ``..`` and the home folder as ``~``. Both the path as given and as resolved (symlinks) are
    rewritten, in plain and in HTML-escaped form; a match must start and end at a path
    boundary, so ``/runs/demo`` is not rewritten inside ``/data/runs/demo-2``.
    """

    def __init__(self, run_dir: Path, home: Path | None = None) -> None:
        resolved = run_dir.resolve()
        name = resolved.name or "."
        pairs: dict[str, str] = {}
        for root in dict.fromkeys([run_dir.absolute(), resolved]):
            pairs[str(root)] = name
            parent = root.parent
            if parent != Path(parent.anchor):
                pairs[str(parent)] = ".."
        if home is None:
            try:
                home = Path.home()
            except (RuntimeError, KeyError):  # no HOME and no passwd entry
                home = None
        if home is not None and home.is_absolute() and home != Path(home.anchor):
            pairs.setdefault(str(home), "~")
        self._rules: list[tuple[re.Pattern[str], str]] = []
        for old, new in sorted(pairs.items(), key=lambda item: len(item[0]), reverse=True):
            for form_old, form_new in {(old, new), (esc(old), esc(new))}:
                inside = "" if new == name else new + "/"
                self._rules.append((re.compile(_BEFORE + re.escape(form_old) + r"[/\\]"), inside))
                self._rules.append((re.compile(_BEFORE + re.escape(form_old) + _AFTER), form_new))

    def __call__(self, text: str) -> str:
        for pattern, replacement in self._rules:
            text = pattern.sub(lambda _m, r=replacement: r, text)
        return text


_BEFORE = r"(?<![\w.\-/\\])"
_AFTER = r"(?![\w.\-])"


def build_html(run: RunFiles, plots: Sequence[EmbeddedPlot]) -> str:
    """The whole page as one string: no external resource, no script, no absolute path.

    The page is built with a marker token per image, rewritten by :class:`PathScrub` and only
    then given the images' data URIs, so base64 text can never be mistaken for a path.
    """
    scrub = PathScrub(run.run_dir)
    rendered = f"{utc_time(time.time())} UTC"
    nonce = secrets.token_hex(8)
    tokens = {e.plot.name: f"fedpath-plot-{nonce}-{e.plot.name}" for e in plots}
    body = "".join(
        [
            header_html(run, scrub),
            final_html(run),
            plots_html(plots, tokens),
            rounds_html(run),
            site_rounds_html(run),
            sites_html(run),
            configs_html(run, scrub),
        ]
    )
    page = scrub(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>fedpath {esc(run_title(run))}</title><style>{CSS}</style></head>"
        f"<body>{body}<footer>Rendered {esc(rendered)} by fedpath {esc(__version__)} from "
        f"config.json, metrics.jsonl and final.json of the run directory "
        f"{esc(run.run_dir.resolve().name)}. This page is one self-contained file: it can be "
        "mailed or moved on its own.</footer></body></html>\n"
    )
    for e in plots:
        page = page.replace(tokens[e.plot.name], e.data_uri(), 1)
    return page


def remove_legacy_plots(out: Path) -> None:
    """Delete the ``plots/*.png`` an earlier fedpath wrote next to the page (and the folder if
    that leaves it empty): the page no longer links them, and stale curves beside a fresh
    report would mislead whoever opens the folder. Other files are left alone."""
    folder = out / LEGACY_PLOTS_DIR
    if not folder.is_dir():
        return
    for name in LEGACY_PLOT_FILES:
        (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: someone keeps other files there
        folder.rmdir()


def write_report(run: RunFiles, out_dir: str | Path | None = None) -> Path:
    """Write the report of an already-read run (``out_dir`` defaults to its run directory)."""
    out = Path(out_dir) if out_dir is not None else run.run_dir
    page = out / REPORT_FILE
    atomic_write_text(page, build_html(run, render_plots(run)))
    remove_legacy_plots(out)
    return page


def render_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the self-contained ``report.html`` into ``run_dir`` (or ``out_dir``).

    Raises ``ConfigError`` when the run directory or one of its files is malformed. Returns the
    path of the page.
    """
    return write_report(read_run(run_dir), out_dir)
