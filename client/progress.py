"""Terminal rendering of preparation progress and results (the CLI's side of ``PrepareEvents``).

Kept apart from the pipeline so library code never prints: the pipeline emits events, this
module turns them into rich progress bars and a summary table.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from client.prepare.records import PrepareSummary, SlideRecord

_STATE_STYLE = {"done": "green", "reused": "cyan", "failed": "bold red"}


class RichPrepareEvents:
    """Two bars (slides, patches of the current slide) and one line per finished slide."""

    def __init__(self, console: Console, site: str = "") -> None:
        self._console = console
        self._site = f"[{site}] " if site else ""
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._slides: TaskID | None = None
        self._patches: TaskID | None = None

    def __enter__(self) -> RichPrepareEvents:
        self._progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def site_started(self, total_slides: int, encoder: str, precision: str) -> None:
        self._console.print(f"{self._site}encoder [bold]{encoder}[/] ({precision})")
        self._slides = self._progress.add_task(f"{self._site}slides", total=total_slides, rate="")
        self._patches = self._progress.add_task(
            f"{self._site}patches", total=None, rate="", visible=False
        )

    def slide_started(self, slide_id: str, num_patches: int) -> None:
        if self._patches is not None:
            self._progress.reset(
                self._patches,
                total=num_patches,
                description=f"{self._site}{slide_id}",
                visible=True,
            )

    def patches_embedded(self, count: int) -> None:
        if self._patches is None:
            return
        self._progress.advance(self._patches, count)
        task = self._progress.tasks[self._patches]
        speed = task.finished_speed or task.speed
        if speed:
            self._progress.update(self._patches, rate=f"{speed:.0f} patches/s")

    def slide_finished(self, record: SlideRecord) -> None:
        if self._slides is not None:
            self._progress.advance(self._slides)
        if record.state == "failed":
            self._progress.console.print(
                f"{self._site}[bold red]failed[/] {record.slide_id} "
                f"(at {record.stage}): {escape(record.reason or '')}"
            )


def summary_table(summary: PrepareSummary, title: str = "Preparation summary") -> Table:
    """One row per slide: state, patches, tumour patches, resolution, time, reason."""
    table = Table(title=title, show_lines=False)
    for column, justify in (
        ("slide", "left"),
        ("state", "left"),
        ("patches", "right"),
        ("tumour", "right"),
        ("µm/px (source)", "left"),
        ("seconds", "right"),
        ("reason", "left"),
    ):
        # A reason's file path is one long word: fold it rather than cut it to "…".
        overflow = "fold" if column == "reason" else "ellipsis"
        table.add_column(column, justify=justify, overflow=overflow)  # type: ignore[arg-type]
    for record in summary.records:
        style = _STATE_STYLE[record.state]
        mpp = f"{record.mpp:.3f} ({record.mpp_source})" if record.mpp else ""
        table.add_row(
            record.slide_id,
            f"[{style}]{record.state}[/]",
            str(record.num_patches) if record.state != "failed" else "",
            "" if record.tumour_patches is None else str(record.tumour_patches),
            mpp,
            f"{sum(record.seconds.values()):.1f}" if record.seconds else "",
            escape(record.reason or ""),  # a reason may quote "[annotation]" or a path
        )
    return table


def summary_line(summary: PrepareSummary) -> str:
    """Totals in one line, for logs and the demo's final table."""
    rate = summary.patches_per_second
    return (
        f"{summary.count('done')} done, {summary.count('reused')} reused, "
        f"{summary.count('failed')} failed; {summary.embedded_patches} patches embedded"
        + (f" at {rate:.1f} patches/s" if rate else "")
        + f" ({summary.encoder}, {summary.precision}); {summary.seconds:.1f} s"
    )
