"""Typed readers of a federated run directory: ``config.json``, ``metrics.jsonl``, ``final.json``.

The ServerApp writes these files; the run report (and anything else a coordinator runs after a
run) reads them back from the directory alone, possibly on another machine and with another
fedpath version. The models here are the written contract of those files.

Why ``extra="ignore"`` and not the ``extra="forbid"`` of every fedpath *config*: a config is
typed by a person, so an unknown key is almost always a typo that must not be silently dropped.
A run file is written by a program; a newer ServerApp that adds a field (a new metric, a new
per-round record) must not make an older ``fedpath report`` refuse a whole run. So unknown
fields are ignored, while every field the report *uses* is validated strictly (``strict=True``:
no ``"3"`` for 3, no ``true`` for 1), and a file that breaks the contract is a ``ConfigError``
naming the file -- and, for ``metrics.jsonl``, the line -- instead of a traceback.

Missing numbers are ``null`` (the writer turns NaN into ``null`` to stay strict JSON); a NaN
literal written by a lenient writer is read as well and shown the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedpath.common.configio import format_validation_error
from fedpath.common.errors import ConfigError

CONFIG_FILE, METRICS_FILE, FINAL_FILE = "config.json", "metrics.jsonl", "final.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"round_(\d{4,})\.pt")


class RunFileModel(BaseModel):
    """Base of every run-file record: unknown fields ignored, known fields strictly typed."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class SiteInfo(RunFileModel):
    """What a site declared before round 1 (its ``site.json`` facts, no slide ids).

    Each fact may be ``null``: a site prepared by an older fedpath may not state all of them,
    and the report shows what it has rather than refusing the run.
    """

    encoder: str | None = None
    encoder_sha256: str | None = None
    feature_dim: int | None = None
    target_mpp: float | None = None
    patch_size: int | None = None
    labels: list[str] | None = None
    n_slides: int | None = None
    slides_with_patch_labels: int | None = None


class RunConfigFile(RunFileModel):
    """``config.json``: the run's settings, written once when the run starts."""

    run_config: dict[str, Any]
    fedpath_version: str | None = None
    flwr_run_id: int
    started: str
    model_config_: dict[str, Any] = Field(default_factory=dict, alias="model_config")
    train_config: dict[str, Any] = Field(default_factory=dict)
    sites: dict[str, SiteInfo]
    privacy_guarantee: str
    privacy: dict[str, Any] = Field(default_factory=dict)
    """The guarantee's record (``fedpath.server.guarantee``): kind, numbers, accountant."""


class TrainMetrics(RunFileModel):
    """One site's reply to a training round (aggregate numbers only)."""

    num_examples: int
    train_loss: float | None
    val_loss: float | None = None
    val_auc: float | None = None
    val_patch_auc: float | None = None
    seconds: float | None = None
    skipped_slides: float | None = None
    """Training/validation slides the site left out: their feature bags failed validation."""


class EvalMetrics(RunFileModel):
    """One site's evaluation of the global model (also the shape of the final test results)."""

    num_examples: int
    loss: float | None = None
    auc: float | None = None
    patch_auc: float | None = None
    balanced_accuracy: float | None = None
    f1: float | None = None
    skipped_slides: float | None = None
    """Evaluation slides the site left out: their feature bags failed validation."""


class GlobalMetrics(RunFileModel):
    """Example-weighted aggregates of the sites' training replies in one round."""

    train_loss: float | None = None
    val_loss: float | None = None
    val_auc: float | None = None
    val_patch_auc: float | None = None


class PrivacySpent(RunFileModel):
    """A site's cumulative (ε, δ) after a round."""

    epsilon: float
    delta: float


class ClientLevelRound(RunFileModel):
    """The federation's cumulative client-level (ε, δ) after a round, and that round's noise."""

    epsilon: float
    delta: float
    releases: int = Field(ge=1)
    clip_norm: float
    noise_multiplier: float
    noise_std: float
    max_weight: float
    sample_rate: float = 1.0
    accountant: str


class RoundRecord(RunFileModel):
    """One line of ``metrics.jsonl``: a completed round (``attempt`` > 1 when it was retried)."""

    round: int = Field(ge=1)
    attempt: int = Field(ge=1)
    started: float
    seconds: float
    strategy: str
    sampled: list[str]
    replied: list[str]
    failed: dict[str, str]
    weights: dict[str, float]
    train: dict[str, TrainMetrics]
    evaluate: dict[str, EvalMetrics] = Field(default_factory=dict)
    global_: GlobalMetrics = Field(alias="global")
    privacy: dict[str, PrivacySpent] = Field(default_factory=dict)
    client_dp: ClientLevelRound | None = None
    budget_exhausted: dict[str, PrivacySpent] = Field(default_factory=dict)
    """Sites that answered but did not train: their slide-level privacy budget ran out."""


class FinalRecord(RunFileModel):
    """``final.json``: how the run ended and the final test metrics, per site and pooled.

    ``status`` is kept a string (the contract writes ``completed`` or ``failed``) so a newer
    writer's additional status still renders; the report treats anything but ``completed`` as
    not completed.
    """

    status: str
    reason: str | None = None
    rounds_completed: int
    num_rounds: int
    test: dict[str, EvalMetrics] = Field(default_factory=dict)
    global_test: EvalMetrics | None = None
    privacy_guarantee: str | None = None
    """The guarantee the aggregated rounds delivered (older runs: only in config.json)."""
    privacy: dict[str, Any] = Field(default_factory=dict)

    @field_validator("global_test", mode="before")
    @classmethod
    def _no_results(cls, value: Any) -> Any:
        """A failed run writes ``{}`` (no pooled results): the same as ``null``."""
        return None if value == {} else value


@dataclass(frozen=True)
class RunFiles:
    """Everything a run directory says, read and validated."""

    run_dir: Path
    config: RunConfigFile | None
    """``None`` when the run failed before it started (e.g. the sites' data did not match):
    then ``final.json`` alone says why."""
    rounds: list[RoundRecord]
    final: FinalRecord | None
    latest_checkpoint: Path | None

    @property
    def last_round(self) -> int:
        """The highest round number that completed (0 when none did)."""
        return max((r.round for r in self.rounds), default=0)

    def site_names(self) -> list[str]:
        """Every site the run mentions: configured sites first, then others as they appear."""
        names = dict.fromkeys(self.config.sites if self.config is not None else ())
        for record in self.rounds:
            for group in (
                record.sampled,
                record.replied,
                record.failed,
                record.weights,
                record.train,
                record.evaluate,
                record.privacy,
            ):
                names.update(dict.fromkeys(group))
        if self.final is not None:
            names.update(dict.fromkeys(self.final.test))
        return list(names)


def _validate(model: type[RunFileModel], data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from exc


def _read_json_object(path: Path, model: type[RunFileModel]) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    return _validate(model, data, str(path))


def read_config(run_dir: Path) -> RunConfigFile | None:
    """``config.json``, or ``None`` when the run stopped before writing it."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return None
    return _read_json_object(path, RunConfigFile)


def parse_metrics_line(raw: bytes, where: str) -> RoundRecord:
    """One ``metrics.jsonl`` line; ``where`` (file and line number) prefixes every error."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text ({exc.reason}); the file is corrupt") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); the line is torn "
            f"(the writer was interrupted) or corrupt"
        ) from exc
    return _validate(RoundRecord, data, where)


def read_metrics(run_dir: Path) -> list[RoundRecord]:
    """Every round line of ``metrics.jsonl`` in file order; no file means no round completed.

    Blank lines are skipped; any other line that is not a valid round record is an error naming
    its 1-based line number, because silently dropping a round would misreport the run.
    """
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    try:
        raw_lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from exc
    return [
        parse_metrics_line(raw, f"{path}, line {number}")
        for number, raw in enumerate(raw_lines, start=1)
        if raw.strip()
    ]


def read_final(run_dir: Path) -> FinalRecord | None:
    """``final.json``, or ``None`` while the run is going or after it was interrupted."""
    path = run_dir / FINAL_FILE
    if not path.exists():
        return None
    return _read_json_object(path, FinalRecord)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The highest-numbered ``checkpoints/round_NNNN.pt``, if any."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := CHECKPOINT_PATTERN.fullmatch(p.name)) and p.is_file()
    ]
    return max(found)[1] if found else None


def read_run(run_dir: str | Path) -> RunFiles:
    """Read and validate a whole run directory; ``ConfigError`` names the first bad file/line."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ConfigError(f"run directory {root} does not exist")
    config, final = read_config(root), read_final(root)
    if config is None and final is None:
        raise ConfigError(
            f"{root} is not a federated run directory: it has neither {CONFIG_FILE} nor "
            f"{FINAL_FILE}"
        )
    return RunFiles(
        run_dir=root,
        config=config,
        rounds=read_metrics(root),
        final=final,
        latest_checkpoint=latest_checkpoint(root),
    )
