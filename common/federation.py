"""The message protocol between the ServerApp and the hospitals' ClientApps.

Both sides import this module, so the record keys, the instructions a round carries and the
metric names a site may send live in one place. Instructions travel as one JSON string in a
``ConfigRecord`` (Flower's config values are flat scalars; the nested, validated model and
trainer configs would otherwise be flattened and re-assembled by hand on both sides).

The metric names are an allow-list: a site's reply holds model parameters and exactly these
aggregate numbers (counts, losses, AUCs, ε), nothing per slide. ``check_reply_metrics`` is what
both the client (before sending) and the server (on receipt) enforce.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, ValidationError

from client.training.dp_config import DPConfig
from client.training.train_config import TrainConfig
from common.configbase import StrictModel
from common.errors import ConfigError
from common.mil.config import ModelConfig

ARRAYS_KEY = "arrays"
"""ArrayRecord with the model's state dict (global model out, local model back)."""
CONFIG_KEY = "config"
"""ConfigRecord with ``INSTRUCTIONS_FIELD`` (server → site) or site facts (site → server)."""
METRICS_KEY = "metrics"
"""MetricRecord of a site's reply."""
INSTRUCTIONS_FIELD = "instructions"
FACTS_FIELD = "facts"
WEIGHT_METRIC = "num-examples"
"""Flower's conventional weight key: the number of training (or evaluated) slides."""

SKIPPED_METRIC = "skipped-slides"
"""Slides of this message's splits left out because their feature files cannot be used: a
count only (which slides and why stays in the site's log)."""

TRAIN_METRICS = (
    WEIGHT_METRIC,
    SKIPPED_METRIC,
    "train-loss",
    "val-loss",
    "val-auc",
    "val-patch-auc",
    "seconds",
    "epsilon",
    "delta",
    "budget-exhausted",
)
"""What a train reply may hold. Undefined values (no validation slides, DP off) are NaN.

``epsilon``/``delta``: the site's slide-level (ε, δ) spent in this run so far (DP-SGD on).
``budget-exhausted``: 1 when the site refused to train this round because its lifetime
privacy budget would be exceeded (it then returns the global model unchanged), else 0."""
BUDGET_EXHAUSTED_METRIC = "budget-exhausted"
EVALUATE_METRICS = (
    WEIGHT_METRIC,
    SKIPPED_METRIC,
    "loss",
    "auc",
    "patch-auc",
    "balanced-accuracy",
    "f1",
    "seconds",
)
"""What an evaluate reply may hold."""


class RoundInstructions(StrictModel):
    """Everything a site needs to run one train or evaluate message the same way as its peers.

    ``start_epoch`` continues the trainer's per-epoch random streams and oversampling decay
    across rounds (round r trains epochs ``(r-1)·E .. r·E-1``), which is what makes a resumed
    run reproduce an uninterrupted one. ``dp`` switches the site to DP-SGD; every site gets
    the same settings and solves its own σ (when a target ε is given) for its own N.
    """

    server_round: int = Field(ge=0)
    model: ModelConfig
    train: TrainConfig
    start_epoch: int = Field(0, ge=0)
    split_folds: int = Field(5, ge=2, description="k of the k-fold split when no split column")
    split_fold: int = Field(0, ge=0, description="test fold of the k-fold split")
    split_seed: int = Field(0, ge=0)
    eval_split: Literal["val", "test"] = "val"
    labels: tuple[str, ...] = ("normal", "tumour")
    dp: DPConfig = Field(default_factory=DPConfig, description="slide-level DP-SGD (§4.5)")
    run_key: str = Field(
        "",
        description="the run's identity across coordinator restarts (a resumed run keeps it; "
        "Flower's run id changes): sites key their privacy ledger by it",
    )

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: Any) -> RoundInstructions:
        """Parse the instructions of a message; ``ConfigError`` when absent or malformed."""
        if not isinstance(text, str):
            raise ConfigError("the message carries no round instructions")
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ConfigError(f"malformed round instructions: {exc}") from exc


def check_reply_metrics(metrics: Mapping[str, Any], allowed: tuple[str, ...]) -> dict[str, float]:
    """Plain floats of an allow-listed metric dict; refuse unknown keys and non-scalars.

    This is the egress rule: if a future change tried to send, say, per-slide scores, the client
    would refuse to build that reply and the server would refuse to read it.
    """
    unknown = sorted(set(metrics) - set(allowed))
    if unknown:
        raise ValueError(f"metrics outside the allow-list: {unknown}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"metric {key!r} must be a number, got {type(value).__name__}")
        out[key] = float(value)
    return out


def nan_to_none(value: float) -> float | None:
    """JSON has no NaN: undefined metrics are written as null."""
    return None if not math.isfinite(value) else float(value)


def facts_to_json(facts: Mapping[str, Any]) -> str:
    return json.dumps(dict(facts), sort_keys=True)
