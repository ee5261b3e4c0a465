"""The page's data vocabulary: tables of cells, and how numbers and times are shown in them.

A cell is plain text or a :class:`Cell` of lines of :class:`Span` s, each with a style the
template maps to markup (a warning, a failure reason, a shortened hash). No HTML here: the
template renders these, and its autoescape escapes every text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

NA = "n/a"
NONE = "–"
"""A cell or setting with nothing in it."""

Style = Literal["", "warn", "reason", "strong", "code"]


@dataclass(frozen=True)
class Span:
    """A piece of a cell's text; ``title`` is hover text (the full value of a shortened one)."""

    text: str
    style: Style = ""
    title: str = ""


@dataclass(frozen=True)
class Cell:
    """A table cell of one or more lines, each a sequence of spans."""

    lines: tuple[tuple[Span, ...], ...]


CellValue = str | int | Cell


@dataclass(frozen=True)
class Table:
    """Headers and rows; columns from ``numeric_from`` on are right-aligned (numbers)."""

    headers: list[str]
    rows: list[list[CellValue]]
    numeric_from: int = 1


def cell(*spans: Span) -> Cell:
    """A one-line cell."""
    return Cell((tuple(spans),))


def warn(text: str) -> Cell:
    """A cell whose whole text is a warning."""
    return cell(Span(text, "warn"))


def lines_cell(items: Iterable[str]) -> Cell | str:
    """Plain-text items, one per line in a cell (``–`` for none)."""
    lines = tuple((Span(item),) for item in items)
    return Cell(lines) if lines else NONE


def fmt(value: float | None, digits: int = 4) -> str:
    """A metric as the tables show it: ``n/a`` for missing or NaN."""
    if value is None or math.isnan(value):
        return NA
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}f}"


def utc_time(seconds: float) -> str:
    """A unix time as the tables show it (UTC, to the second)."""
    if not math.isfinite(seconds):
        return NA
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def key_values(items: Sequence[tuple[str, object]]) -> list[tuple[str, str]]:
    """Settings or facts as the page's key-value grid shows them (see :func:`setting_text`)."""
    return [(key, setting_text(value)) for key, value in items]


def setting_text(value: object) -> str:
    """A setting's value as text: JSON's true/false, ``–`` for none or empty."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None or value == "":
        return NONE
    return str(value)
