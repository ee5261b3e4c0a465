"""Everything the report says, as data: assembled from a run directory's files alone.

``build_content`` reads nothing but the already-read ``RunFiles`` (config.json, metrics.jsonl,
final.json) and returns plain values and tables; the page template lays them out. Absolute
paths in settings are shown run-relative here (``report.paths``); the page scrubs every other
value the same way as it renders it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpath.server.report.cells import NA, NONE, CellValue, Span, Table, cell, key_values
from fedpath.server.report.final import FinalResults, final_results
from fedpath.server.report.paths import PathScrub
from fedpath.server.report.rounds import (
    client_level_table,
    privacy_summary_table,
    repeated_rounds,
    rounds_table,
    site_rounds_table,
    skipped_slides,
)
from fedpath.server.report.settings import (
    Settings,
    settings_view,
    unused_run_settings,
    unused_train_settings,
)
from fedpath.server.run_files import RunFiles


@dataclass(frozen=True)
class RunSetup:
    """What config.json recorded: the main facts, the privacy section and the settings."""

    facts: list[tuple[str, str]]
    guarantee: str
    privacy: Table | None
    client_dp: Table | None
    run_settings: Settings
    sites: Table | None
    model: Settings | None
    train: Settings | None


@dataclass(frozen=True)
class ReportContent:
    """The page's content; ``setup`` is None when config.json was never written."""

    title: str
    status: str
    sentence: str
    setup: RunSetup | None
    final: FinalResults | None
    rounds: Table | None
    repeated_rounds: list[int]
    site_rounds: Table | None
    skipped_slides: list[str]
    run_dir_name: str


def planned_rounds(run: RunFiles) -> int | None:
    """The number of rounds the run was configured for, if known."""
    if run.final is not None:
        return run.final.num_rounds
    planned = run.config.run_config.get("num-server-rounds") if run.config else None
    return planned if isinstance(planned, int) and not isinstance(planned, bool) else None


def status_text(run: RunFiles) -> tuple[str, str]:
    """(status: ok, failed or running; sentence) saying how the run ended, or that it has not."""
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


def run_title(run: RunFiles) -> str:
    """``run <Flower run id>``, or the directory's name when config.json was never written."""
    if run.config is not None:
        return f"run {run.config.flwr_run_id}"
    return f"run directory {run.run_dir.name}"


def guarantee_text(run: RunFiles) -> str:
    """What the aggregated rounds delivered (final.json), else what config.json planned."""
    if run.final is not None and run.final.privacy_guarantee:
        return run.final.privacy_guarantee
    return run.config.privacy_guarantee if run.config is not None else NA


def _opt(value: Any) -> str:
    return NONE if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def sites_table(run: RunFiles) -> Table | None:
    """What each site declared before round 1 (the harmonisation facts)."""
    if run.config is None or not run.config.sites:
        return None
    rows: list[list[CellValue]] = [
        [
            name,
            _opt(s.encoder),
            cell(Span(s.encoder_sha256[:12], "code", title=s.encoder_sha256))
            if s.encoder_sha256
            else NONE,
            _opt(s.feature_dim),
            _opt(s.target_mpp),
            _opt(s.patch_size),
            ", ".join(s.labels) if s.labels else NONE,
            _opt(s.n_slides),
            _opt(s.slides_with_patch_labels),
        ]
        for name, s in run.config.sites.items()
    ]
    headers = ["site", "encoder", "weights sha256", "feature dim", "µm/px", "patch px",
               "labels", "slides", "with patch labels"]  # fmt: skip
    return Table(headers, rows, numeric_from=3)


def run_setup(run: RunFiles, scrub: PathScrub) -> RunSetup | None:
    """The facts, privacy and settings config.json recorded (None without config.json)."""
    cfg = run.config
    if cfg is None:
        return None
    strategy = cfg.run_config.get("strategy") or (run.rounds[-1].strategy if run.rounds else NA)
    facts: list[tuple[str, Any]] = [
        ("Flower run id", cfg.flwr_run_id),
        ("fedpath version", cfg.fedpath_version),
        ("started (UTC)", cfg.started),
        ("strategy", strategy),
        ("sites", len(run.site_names())),
        ("rounds completed", run.last_round),
    ]
    if run.latest_checkpoint is not None:
        facts.append(("latest checkpoint", run.latest_checkpoint.relative_to(run.run_dir)))
    model, train = cfg.model_config_, cfg.train_config
    return RunSetup(
        facts=key_values(facts),
        guarantee=guarantee_text(run),
        privacy=privacy_summary_table(run),
        client_dp=client_level_table(run),
        run_settings=settings_view(cfg.run_config, unused_run_settings(cfg.run_config), scrub),
        sites=sites_table(run),
        model=settings_view(model, {}, scrub, flatten=True) if model else None,
        train=settings_view(
            train, unused_train_settings(train, cfg.run_config), scrub, flatten=True
        )
        if train
        else None,
    )


def build_content(run: RunFiles, scrub: PathScrub | None = None) -> ReportContent:
    """The report of ``run`` as data (``scrub`` defaults to the run directory's own)."""
    scrub = scrub if scrub is not None else PathScrub(run.run_dir)
    status, sentence = status_text(run)
    return ReportContent(
        title=run_title(run),
        status=status,
        sentence=sentence,
        setup=run_setup(run, scrub),
        final=final_results(run),
        rounds=rounds_table(run),
        repeated_rounds=repeated_rounds(run),
        site_rounds=site_rounds_table(run),
        skipped_slides=skipped_slides(run),
        run_dir_name=Path(run.run_dir).resolve().name,
    )
