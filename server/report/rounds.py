"""The report's round tables: what every round did, each site's numbers, and privacy spent.

Pure data from metrics.jsonl (``RunFiles.rounds``): who was asked, who answered, who failed
and why, the weights, each site's training and evaluation numbers, skipped slides, and ε.
"""

from __future__ import annotations

from typing import Any

from fedpath.server.report.cells import (
    NA,
    NONE,
    Cell,
    CellValue,
    Span,
    Table,
    cell,
    fmt,
    lines_cell,
    utc_time,
    warn,
)
from fedpath.server.report.series import rounds_for_plots
from fedpath.server.run_files import EvalMetrics, RoundRecord, RunFiles, TrainMetrics


def _attempt(record: RoundRecord) -> CellValue:
    return "1" if record.attempt == 1 else warn(f"{record.attempt} (retried)")


def _failed(record: RoundRecord) -> CellValue:
    if not record.failed:
        return NONE
    return Cell(
        tuple(
            (Span(site, "warn"), Span(": "), Span(reason, "reason"))
            for site, reason in record.failed.items()
        )
    )


def rounds_table(run: RunFiles) -> Table | None:
    """Every line of metrics.jsonl as a row: who was asked, who answered, who failed and why."""
    if not run.rounds:
        return None
    rows = [
        [
            str(r.round),
            _attempt(r),
            utc_time(r.started),
            lines_cell(r.sampled),
            lines_cell(r.replied),
            _failed(r),
            lines_cell(f"{site}: {w:.3f}" for site, w in r.weights.items()),
            fmt(r.global_.train_loss),
            fmt(r.global_.val_auc),
            f"{r.seconds:.1f}",
        ]
        for r in run.rounds
    ]
    headers = ["round", "attempt", "started (UTC)", "sampled", "replied", "failed (reason)",
               "weights", "train loss", "val AUC", "seconds"]  # fmt: skip
    return Table(headers, rows, numeric_from=7)


def repeated_rounds(run: RunFiles) -> list[int]:
    """Rounds on more than one line of metrics.jsonl (a resumed run redid them)."""
    counts: dict[int, int] = {}
    for record in run.rounds:
        counts[record.round] = counts.get(record.round, 0) + 1
    return [k for k, n in counts.items() if n > 1]


def _site_state(record: RoundRecord, site: str) -> CellValue:
    if site in record.failed:
        return cell(Span("failed", "warn"), Span(": "), Span(record.failed[site], "reason"))
    if site in record.budget_exhausted:
        return cell(Span("privacy budget exhausted", "warn"), Span(": not trained, not aggregated"))
    if site in record.replied:
        return "replied"
    if site in record.sampled:
        return warn("no answer")
    return "not sampled"


def _site_round_row(record: RoundRecord, site: str) -> list[CellValue]:
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


def _skipped_cell(train: TrainMetrics | None, evaluation: EvalMetrics | None) -> CellValue:
    counts = (_skipped_count(train), _skipped_count(evaluation))
    if counts == (None, None):
        return NA
    text = " / ".join(NA if c is None else str(c) for c in counts)
    return warn(text) if any(counts) else text


def skipped_slides(run: RunFiles) -> list[str]:
    """Each site and round where slides were left out, with the counts (never slide ids:
    they never leave a hospital, so the page can only say how many and where to look)."""
    notes = []
    for record in run.rounds:
        for site in run.site_names():
            train = _skipped_count(record.train.get(site)) or 0
            evaluation = _skipped_count(record.evaluate.get(site)) or 0
            if train or evaluation:
                notes.append(
                    f"round {record.round}, {site}: {train} training/validation and "
                    f"{evaluation} evaluation slide(s)"
                )
    return notes


def site_rounds_table(run: RunFiles) -> Table | None:
    """Each site's numbers in each round (training reply, evaluation of the global model, ε)."""
    if not run.rounds:
        return None
    sites = run.site_names()
    rows = [_site_round_row(r, s) for r in run.rounds for s in sites]
    headers = ["round", "site", "state", "weight", "train slides", "train loss", "val loss",
               "val AUC", "val patch AUC", "train s", "eval loss", "eval AUC",
               "skipped (train / eval)", "ε"]  # fmt: skip
    return Table(headers, rows, numeric_from=3)


def client_level_table(run: RunFiles) -> Table | None:
    """The federation's client-level ε after each round, with the noise that round got."""
    rows: list[list[CellValue]] = [
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
        return None
    return Table(["round", "ε", "δ", "C", "σ", "max w", "noise std", "accountant"], rows)


def privacy_summary_table(run: RunFiles) -> Table | None:
    """Each site's latest (ε, δ); None when no site reported an ε."""
    latest: dict[str, tuple[int, float, float]] = {}
    for record in run.rounds:
        for site, spent in record.privacy.items():
            latest[site] = (record.round, spent.epsilon, spent.delta)
    if not latest:
        return None
    rows: list[list[Any]] = [
        [site, fmt(eps, 3), f"{delta:.1e}", rnd]
        for site in run.site_names()
        if site in latest
        for rnd, eps, delta in [latest[site]]
    ]
    return Table(["site", "ε spent", "δ", "as of round"], rows)
