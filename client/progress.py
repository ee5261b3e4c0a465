"""Rendering of preparation progress and results (the CLI's side of ``PrepareEvents``).

Kept apart from the pipeline so library code never prints: the pipeline emits events, this
module turns them into rich progress bars on a terminal, or into plain lines when stdout is a
log (systemd, nohup, docker logs, ``> log``), where a live bar is only drawn once at the end and
a table folds a reason into a column a dozen characters wide. ``bar_or_lines`` makes the same
choice for the other commands' bars (local train/eval/heatmaps, synth, demo).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fedpath.client.prepare.records import PrepareEvents, PrepareSummary, SlideRecord

HEARTBEAT_SECONDS = 30.0
"""Longest silence of a log while a preparation runs: a line at least this often."""

STAGE_TEXT = {
    "encoder": "loading encoder",
    "inference plan": "planning how the encoder runs",
    "tissue": "segmenting tissue and placing patches",
    "annotation": "labelling patches from the annotation",
    "embedding": "embedding patches",
    "outputs": "writing coordinates and QC pictures",
}
"""What a person reads for each stage the pipeline announces (``PrepareEvents.stage_started``)."""

SLIDE_STAGES = frozenset({"tissue", "annotation", "embedding", "outputs"})
"""Stages whose subject is a slide id; the others (encoder, inference plan) concern the run."""


def site_stage_line(stage: str, subject: str) -> str:
    """The line that says a run-wide step began (its subject: the encoder)."""
    if stage == "encoder":
        return f"loading encoder {subject}"
    if stage == "inference plan":
        return (
            f"planning how {subject} runs: device, precision, engine (the first run on a "
            "machine exports the encoder and measures the engines)"
        )
    return f"{STAGE_TEXT.get(stage, stage)} {subject}"


_STATE_STYLE = {"done": "green", "reused": "cyan", "failed": "bold red"}


def is_log(console: Console) -> bool:
    """True when the console writes to a log rather than a person's terminal: live bars and
    tables are then replaced by plain lines."""
    return not console.is_terminal or console.is_dumb_terminal


def log_writer(console: Console) -> Callable[[str], None]:
    """Write one plain line: no markup, no wrapping (a path stays whole for grep), flushed."""

    def write(line: str) -> None:
        console.print(line, markup=False, emoji=False, highlight=False, soft_wrap=True)

    return write


@contextmanager
def prepare_events(console: Console, site: str = "") -> Iterator[PrepareEvents]:
    """The progress sink ``prepare`` and ``demo`` use: bars on a terminal, lines in a log."""
    events: RichPrepareEvents | LogPrepareEvents
    if is_log(console):
        events = LogPrepareEvents(log_writer(console), site=site)
    else:
        events = RichPrepareEvents(console, site)
    with events:
        yield events


def duration(seconds: float) -> str:
    """``45 s``, ``12 min 05 s``, ``3 h 02 min``: an ETA a person reads at a glance."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def finished_line(record: SlideRecord, site: str = "") -> str:
    """One line for a slide's outcome; a failure reads ``failed <slide> (at <stage>): <reason>``."""
    prefix = f"[{site}] " if site else ""
    if record.state == "failed":
        return f"{prefix}failed {record.slide_id} (at {record.stage}): {record.reason or ''}"
    tumour = "" if record.tumour_patches is None else f" ({record.tumour_patches} tumour)"
    mpp = f", {record.mpp:.3f} µm/px ({record.mpp_source})" if record.mpp else ""
    note = f"; {record.reason}" if record.reason else ""
    if record.state == "reused":
        return (
            f"{prefix}reused {record.slide_id}: {record.num_patches} patches{tumour}, already "
            f"prepared with these settings{mpp}{note}"
        )
    seconds = sum(record.seconds.values())
    rate = f", {record.num_patches / seconds:.1f} patches/s" if seconds > 0 else ""
    return (
        f"{prefix}done {record.slide_id}: {record.num_patches} patches{tumour} in "
        f"{seconds:.1f} s{rate}{mpp}{note}"
    )


class _Heartbeat(ABC):
    """A background thread calling ``tick`` every ``poll`` seconds while the block runs.

    ``poll=None`` starts no thread (tests call ``tick`` themselves with a fake clock).
    """

    _poll: float | None
    _stop: threading.Event
    _thread: threading.Thread | None

    @abstractmethod
    def tick(self) -> None:
        """Write a line if the reporter has been silent for its interval."""

    def __enter__(self) -> Self:
        if self._poll is not None:
            self._thread = threading.Thread(target=self._beat, name="fedpath-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        assert self._poll is not None
        while not self._stop.wait(self._poll):
            self.tick()


class LogPrepareEvents(_Heartbeat):
    """Plain lines for a log: one when each slide starts and ends, and a heartbeat.

    A heartbeat line comes whenever ``interval`` seconds pass without a line: during
    embedding it gives patches done / total, the rate and the ETA; during any other long step
    (loading or exporting an encoder, segmenting a gigapixel slide, writing its QC picture) it
    says which step is still running. ``tick`` emits it; a background thread calls ``tick``
    every ``poll`` seconds so a step that reports nothing (one huge batch, an export) is
    covered too. Tests pass ``clock`` and call ``tick`` themselves (``poll=None``: no thread).
    """

    def __init__(
        self,
        write: Callable[[str], None],
        *,
        site: str = "",
        clock: Callable[[], float] = time.monotonic,
        interval: float = HEARTBEAT_SECONDS,
        poll: float | None = 1.0,
    ) -> None:
        self._write = write
        self._site = site
        self._prefix = f"[{site}] " if site else ""
        self._clock = clock
        self._interval = interval
        self._poll = poll
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_line = clock()
        self._total_slides = 0
        self._finished = 0
        self._slide: str | None = None
        self._stage: str | None = None
        self._stage_since = self._last_line
        self._patches_total = 0
        self._patches_done = 0
        self._prepared = 0
        self._prepared_seconds = 0.0

    def _line(self, text: str) -> None:
        """Write a line and restart the silence count; the caller holds the lock."""
        self._write(self._prefix + text)
        self._last_line = self._clock()

    def _where(self) -> str:
        return f"slide {min(self._finished + 1, self._total_slides)}/{self._total_slides} "

    def stage_started(self, stage: str, subject: str) -> None:
        with self._lock:
            self._stage, self._stage_since = stage, self._clock()
            if stage not in SLIDE_STAGES:
                self._slide = None
                self._line(site_stage_line(stage, subject))
                return
            self._slide = subject
            if stage == "tissue":  # a slide's first step: the log says which slide is on
                self._line(f"{self._where()}{subject}: {STAGE_TEXT[stage]}")

    def site_started(self, total_slides: int, encoder: str, precision: str) -> None:
        with self._lock:
            self._total_slides = total_slides
            self._stage = None
            self._line(f"encoder {encoder} ({precision}); {total_slides} slide(s) to prepare")

    def slide_started(self, slide_id: str, num_patches: int) -> None:
        with self._lock:
            self._slide, self._stage, self._stage_since = slide_id, "embedding", self._clock()
            self._patches_total, self._patches_done = num_patches, 0
            self._line(f"{self._where()}{slide_id}: started, {num_patches} patches to embed")

    def patches_embedded(self, count: int) -> None:
        with self._lock:
            self._patches_done += count
        self.tick()

    def slide_finished(self, record: SlideRecord) -> None:
        with self._lock:
            self._finished += 1
            self._slide, self._stage = None, None
            line = finished_line(record, self._site)
            if record.state == "done":
                self._prepared += 1
                self._prepared_seconds += sum(record.seconds.values())
                line += self._site_eta()
            self._write(line)
            self._last_line = self._clock()

    def _site_eta(self) -> str:
        """``; 3/1000 slides, about 2 h 10 min left at this pace``: the slides left times the
        mean time of the slides this run prepared (a slide reused later costs less)."""
        left = self._total_slides - self._finished
        if left <= 0 or self._prepared == 0:
            return ""
        seconds = left * self._prepared_seconds / self._prepared
        eta = f"about {duration(seconds)}" if seconds >= 1 else "less than a second"
        return f"; {self._finished}/{self._total_slides} slides, {eta} left at this pace"

    def tick(self) -> None:
        """Write a heartbeat line if ``interval`` seconds passed since the last line."""
        with self._lock:
            now = self._clock()
            if now - self._last_line < self._interval:
                return
            self._line(self._heartbeat(now))

    def _heartbeat(self, now: float) -> str:
        elapsed = now - self._stage_since
        if self._stage == "embedding" and self._slide is not None:
            done, total = self._patches_done, self._patches_total
            head = f"{self._where()}{self._slide}: {done}/{total} patches"
            if done == 0 or elapsed <= 0:
                return f"{head} after {duration(elapsed)}, no batch finished yet"
            rate = done / elapsed
            percent = f" ({done / total:.0%})" if total else ""
            eta = duration((total - done) / rate)
            return f"{head}{percent}, {rate:.1f} patches/s, ETA {eta}"
        if self._stage is not None:
            text = STAGE_TEXT.get(self._stage, self._stage)
            subject = f"{self._where()}{self._slide}: " if self._slide is not None else ""
            return f"{subject}still {text} after {duration(elapsed)}"
        return f"still working: {self._finished}/{self._total_slides} slide(s) finished"


class LogProgress(_Heartbeat):
    """The part of rich ``Progress`` the commands use, as plain lines for a log.

    A live bar in a log is drawn once, at the end: a training run or a federated demo sat
    silent until then. Here every step that carries a status (an epoch's losses, a scored
    slide, a round's AUC) is one line ``<task> <done>/<total>: <status> (<elapsed>)``; steps
    without one (a synthesised slide) give a line at most every ``interval`` seconds and on the
    last step. A step longer than ``interval`` (a long epoch, a round waiting for its sites)
    gets a ``still running`` line from a background thread that calls ``tick`` every ``poll``
    seconds (tests pass ``clock``, ``poll=None`` and call ``tick`` themselves).
    """

    def __init__(
        self,
        console: Console,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = HEARTBEAT_SECONDS,
        poll: float | None = 1.0,
    ) -> None:
        self.console = console
        self._write = log_writer(console)
        self._clock = clock
        self._interval = interval
        self._poll = poll
        self._tasks: list[dict[str, Any]] = []
        self._last_line = clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> None:
        """A ``still running`` line for the unfinished task if ``interval`` s passed silent."""
        with self._lock:
            now = self._clock()
            running = [t for t in self._tasks if t["total"] is None or t["completed"] < t["total"]]
            if not running or now - self._last_line < self._interval:
                return
            task = running[-1]
            elapsed = duration(now - task["started"])
            self._write(f"{task['description']} {_count(task)}: still running ({elapsed})")
            self._last_line = now

    def add_task(
        self, description: str, total: float | None = 100.0, completed: float = 0, **fields: Any
    ) -> TaskID:
        fields.pop("visible", None)
        with self._lock:
            self._tasks.append(
                {
                    "description": description,
                    "total": total,
                    "completed": completed,
                    "fields": fields,
                    "started": self._clock(),
                }
            )
            return TaskID(len(self._tasks) - 1)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(
        self,
        task_id: TaskID,
        *,
        total: float | None = None,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        **fields: Any,
    ) -> None:
        with self._lock:
            self._update(self._tasks[task_id], total, completed, advance, description, fields)

    def _update(
        self,
        task: dict[str, Any],
        total: float | None,
        completed: float | None,
        advance: float | None,
        description: str | None,
        fields: dict[str, Any],
    ) -> None:
        fields.pop("visible", None)
        fields.pop("refresh", None)
        before = (task["description"], dict(task["fields"]))
        was_done = task["total"] is not None and task["completed"] >= task["total"]
        if total is not None:
            task["total"] = total
        if completed is not None:
            task["completed"] = completed
        if advance is not None:
            task["completed"] += advance
        if description is not None:
            task["description"] = description
        task["fields"].update(fields)
        now = self._clock()
        said = (task["description"], task["fields"]) != before and any(
            str(v) for v in task["fields"].values()
        )
        done = task["total"] is not None and task["completed"] >= task["total"]
        if said or (done and not was_done) or now - self._last_line >= self._interval:
            self._line(task, now)

    def _line(self, task: dict[str, Any], now: float) -> None:
        count = _count(task)
        status = "; ".join(str(v) for v in task["fields"].values() if str(v))
        text = f"{task['description']} {count}" + (f": {status}" if status else "")
        self._write(f"{text} ({duration(now - task['started'])})")
        self._last_line = now


def _count(task: dict[str, Any]) -> str:
    return f"{task['completed']:g}" + (f"/{task['total']:g}" if task["total"] else "")


def bar_or_lines(console: Console, *columns: ProgressColumn | str) -> Progress | LogProgress:
    """A rich bar with ``columns`` on a terminal, ``LogProgress`` lines in a log."""
    if is_log(console):
        return LogProgress(console)
    return Progress(*columns, console=console)


class RichPrepareEvents:
    """Two bars (slides, patches of the current slide) and one line per finished slide."""

    def __init__(self, console: Console, site: str = "") -> None:
        self._console = console
        # markup text: "[site_a]" unescaped is taken for a style and vanishes
        self._site = escape(f"[{site}]") + " " if site else ""
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

    def stage_started(self, stage: str, subject: str) -> None:
        if stage not in SLIDE_STAGES:
            self._progress.console.print(f"{self._site}{escape(site_stage_line(stage, subject))}")
        elif self._patches is not None:
            self._progress.reset(
                self._patches,
                description=f"{self._site}{escape(subject)}: {STAGE_TEXT.get(stage, stage)}",
                visible=True,
                rate="",
            )
            # a pulsing bar with no count: reset() keeps the previous slide's total otherwise
            next(t for t in self._progress.tasks if t.id == self._patches).total = None

    def site_started(self, total_slides: int, encoder: str, precision: str) -> None:
        self._console.print(f"{self._site}encoder [bold]{escape(encoder)}[/] ({precision})")
        self._slides = self._progress.add_task(f"{self._site}slides", total=total_slides, rate="")
        self._patches = self._progress.add_task(
            f"{self._site}patches", total=None, rate="", visible=False
        )

    def slide_started(self, slide_id: str, num_patches: int) -> None:
        if self._patches is not None:
            self._progress.reset(
                self._patches,
                total=num_patches,
                description=f"{self._site}{escape(slide_id)}",
                visible=True,
                rate="",
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
        if self._patches is not None:  # a finished slide's bar does not linger as if running
            self._progress.update(self._patches, visible=False)
        if record.state == "failed":
            self._progress.console.print(
                f"{self._site}[bold red]failed[/] {escape(record.slide_id)} "
                f"(at {record.stage}): {escape(record.reason or '')}"
            )


def summary_table(summary: PrepareSummary, title: str = "Preparation summary") -> Table:
    """One row per slide: state, patches, tumour patches, resolution, time.

    The reasons are not a column (at 80 columns it was 13 characters wide and a path folded
    over a dozen lines): ``reason_lines`` prints them below, one line each."""
    table = Table(title=title, show_lines=False)
    for column, justify in (
        ("slide", "left"),
        ("state", "left"),
        ("patches", "right"),
        ("tumour", "right"),
        ("µm/px (source)", "left"),
        ("seconds", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for record in summary.records:
        style = _STATE_STYLE[record.state]
        mpp = f"{record.mpp:.3f} ({record.mpp_source})" if record.mpp else ""
        table.add_row(
            escape(record.slide_id),
            f"[{style}]{record.state}[/]",
            str(record.num_patches) if record.state != "failed" else "",
            "" if record.tumour_patches is None else str(record.tumour_patches),
            mpp,
            f"{sum(record.seconds.values()):.1f}" if record.seconds else "",
        )
    return table


def reason_lines(summary: PrepareSummary) -> list[str]:
    """One plain line per slide that has something to say: ``failed <slide> (at <stage>):
    <reason>`` for a failure, ``note <slide>: <note>`` for a slide prepared with a remark
    (an annotation outline ignored, a slide label only)."""
    lines = [finished_line(r) for r in summary.records if r.state == "failed"]
    lines += [
        f"note {r.slide_id}: {r.reason}"
        for r in summary.records
        if r.state != "failed" and r.reason
    ]
    return lines


def print_summary(console: Console, summary: PrepareSummary) -> None:
    """The end of a ``prepare`` run: on a terminal the table, then (terminal and log alike)
    one unwrapped line per failure or note; a log already holds a line per slide."""
    write = log_writer(console)
    if is_log(console):
        write("Preparation summary")
    else:
        console.print(summary_table(summary))
    for line in reason_lines(summary):
        write(line)
    if summary.inference:
        write(f"encoder ran as: {summary.inference}")
    for note in summary.inference_notes:
        write(f"  {note}")


def summary_line(summary: PrepareSummary) -> str:
    """Totals in one line, for logs and the demo's final table."""
    rate = summary.patches_per_second
    return (
        f"{summary.count('done')} done, {summary.count('reused')} reused, "
        f"{summary.count('failed')} failed; {summary.embedded_patches} patches embedded"
        + (f" at {rate:.1f} patches/s" if rate else "")
        + f" ({summary.encoder}, {summary.precision}); {summary.seconds:.1f} s"
    )
