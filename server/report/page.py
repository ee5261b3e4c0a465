"""Rendering and writing the report: one self-contained HTML file from a Jinja2 template.

The template (``server/templates/report.html.j2``, package data of ``fedpath.server``) lays out
the data of ``report.content``; Jinja2's autoescape escapes every value, so a site name or an
exception message from a run file is data, never markup. Before a value is escaped it is
path-scrubbed (``report.paths``), so the page names no absolute path of the machine that
rendered it. The plots are PNG data URIs inside the page, and there is no JavaScript and no
external resource: the file is mailed on its own and opened on machines that may be offline.
The page is written atomically.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from fedpath.common import __version__
from fedpath.common.atomic import atomic_write_text
from fedpath.server.report.cells import utc_time
from fedpath.server.report.content import build_content
from fedpath.server.report.paths import PathScrub
from fedpath.server.report.plots import EmbeddedPlot, Plot, render_plots
from fedpath.server.run_files import RunFiles, read_run

REPORT_FILE = "report.html"
TEMPLATE = "report.html.j2"
LEGACY_PLOTS_DIR = "plots"
LEGACY_PLOT_FILES = ("loss.png", "auc.png", "weights.png", "epsilon.png")
"""Earlier versions wrote the plots next to the page; a new render removes those files."""


@dataclass(frozen=True)
class ShownPlot:
    """A plot as the template shows it; ``uri`` is the PNG's data URI."""

    plot: Plot
    uri: Markup
    width: int
    height: int


@jinja2.pass_context
def _scrubbed(context: jinja2.runtime.Context, value: Any) -> Any:
    """Every ``{{ value }}`` of the page passes here before autoescape: text is path-scrubbed;
    markup the template built itself (a macro's output) was scrubbed piece by piece."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return context["scrub"](value)
    return value


@functools.cache
def environment() -> jinja2.Environment:
    """The report's Jinja2 environment: templates from the installed package, autoescape on."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("fedpath.server", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=_scrubbed,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _figure(e: EmbeddedPlot) -> ShownPlot:
    # Base64 text is inert in an attribute, and it must not be path-scrubbed: a '/' run in it
    # could look like a path. Hence Markup (left alone by the scrub), not a plain string.
    return ShownPlot(e.plot, Markup(e.data_uri()), e.width, e.height)


def build_html(run: RunFiles, plots: Sequence[EmbeddedPlot]) -> str:
    """The whole page as one string: no external resource, no script, no absolute path."""
    scrub = PathScrub(run.run_dir)
    return (
        environment()
        .get_template(TEMPLATE)
        .render(
            c=build_content(run, scrub),
            figures=[_figure(e) for e in plots],
            rendered=f"{utc_time(time.time())} UTC",
            version=__version__,
            scrub=scrub,
        )
    )


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
