"""The report's final test results: each site, then all sites; every key of final.json shown.

The headline table's columns are the metrics fedpath knows (in a fixed order); every key of
final.json's test records, known or not, is listed below it, and blocks no other section shows
(calibration, a newer writer's records) after that, so a metric added to the run files later
appears without a change here. Pure data from ``final.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fedpath.server.report.cells import NA, CellValue, Span, Table, cell, fmt, key_values
from fedpath.server.report.settings import flatten_settings
from fedpath.server.run_files import FINAL_FILE, RunFiles

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

LEGACY_GLOBAL_TEST_NOTE = (
    "final.json does not say how its all-sites row (global_test) was computed; fedpath "
    "versions that do not say wrote the mean of the sites' values weighted by their test "
    "slides, not a metric over all slides at once."
)
FINAL_KEYS_SHOWN_ELSEWHERE = frozenset(
    {"status", "reason", "rounds_completed", "num_rounds", "test", "global_test",
     "privacy_guarantee", "privacy"}
)  # fmt: skip


@dataclass(frozen=True)
class Block:
    """Key-value pairs under a heading (no heading: loose values)."""

    heading: str
    items: list[tuple[str, str]]


@dataclass(frozen=True)
class FinalResults:
    """The final section of a run that wrote final.json.

    ``headline`` is None when the run ended without test results; then ``every`` is None too.
    """

    headline: Table | None
    note: str
    every: Table | None
    every_keys: int
    others: list[Block]


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


def global_test_note(overall: dict[str, Any]) -> str:
    """How the all-sites row was computed, in final.json's own words when it has them."""
    pooling = overall.get("pooling")
    text = f"All sites: {pooling}" if isinstance(pooling, str) and pooling else None
    return text or LEGACY_GLOBAL_TEST_NOTE


def every_metric_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> Table:
    """Every key of every row, one metric per line and one column per row (sites, all sites):
    a metric a newer fedpath adds to final.json shows here without a change to the report."""
    keys = metric_columns(m for _, m in rows)
    body: list[list[CellValue]] = [
        [metric_header(key), *(metric_text(m.get(key)) for _, m in rows)] for key in keys
    ]
    return Table(["metric", *(name for name, _ in rows)], body)


def other_blocks(raw: dict[str, Any]) -> list[Block]:
    """Blocks of final.json no other section shows (calibration, a newer writer's records),
    each under its header, then its loose values."""
    blocks = []
    scalars = []
    for key in sorted(set(raw) - FINAL_KEYS_SHOWN_ELSEWHERE):
        value = raw[key]
        if isinstance(value, dict):
            if value:
                blocks.append(Block(metric_header(key), key_values(flatten_settings(value))))
        else:
            scalars.append((key, metric_text(value) if _is_number(value) else value))
    if scalars:
        blocks.append(Block("", key_values(scalars)))
    return blocks


def final_results(run: RunFiles) -> FinalResults | None:
    """The final test results, or None while final.json has not been written."""
    final = run.final
    if final is None:
        return None
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
    others = other_blocks(raw)
    if not records:
        return FinalResults(None, "", None, 0, others)
    headline = [
        key for key in METRIC_HEADERS if any(_is_number(m.get(key)) for _, m in records)
    ] or metric_columns(m for _, m in records)
    rows: list[list[CellValue]] = [
        [
            cell(Span("all sites", "strong")) if m is overall else name,
            *(metric_text(m.get(key)) for key in headline),
        ]
        for name, m in records
    ]
    every = every_metric_table(records)
    return FinalResults(
        Table(["site", *(metric_header(k) for k in headline)], rows),
        global_test_note(overall) if isinstance(overall, dict) else "",
        every,
        len(every.rows),
        others,
    )
