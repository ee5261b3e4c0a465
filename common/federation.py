"""The message protocol between the ServerApp and the hospitals' ClientApps.

Both sides import this module, so the record keys, the instructions a round carries and the
metric names a site may send live in one place. Instructions travel as one JSON string in a
``ConfigRecord`` (Flower's config values are flat scalars; the nested, validated model and
trainer configs would otherwise be flattened and re-assembled by hand on both sides).

The metric names are an allow-list: a site's reply holds model parameters and exactly these
aggregate numbers (counts, losses, AUCs, ε), nothing per slide. ``check_reply_metrics`` is what
both the client (before sending) and the server (on receipt) enforce.

An evaluate reply also carries *sums* the server adds up over sites (issue 20.16/20.17), each
a list of fixed length: histograms of slide and patch tumour log-odds by label on a fixed grid
(:data:`fedpath.common.calibration.SCORE_EDGES`), slide counts per class and the confusion counts,
calibration-error bins, and the validation NLL summed at every temperature of a fixed grid.
From them the server computes metrics over all sites' slides and patches at once (not a mean
of site metrics) and fits the federated model's temperature and threshold. They are counts
and sums over slides, never a value with a slide's name; for a site with very few slides a
0.1-wide log-odds bin does show what its slides scored, as the site's AUC and accuracy
already narrow it down, which is why the README lists them among what leaves a hospital.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, ValidationError

from fedpath.common.calibration import N_PATCH_BINS, N_SCORE_BINS, TEMPERATURES, SlideCalibration
from fedpath.common.configbase import StrictModel
from fedpath.common.dp_config import DPConfig
from fedpath.common.errors import ConfigError
from fedpath.common.mil.config import ModelConfig
from fedpath.common.train_config import TrainConfig

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
ECE_BINS = 10
"""Calibration-error bins (``fedpath.common.probability_scores.ECE_BINS``, restated so the
protocol is explicit)."""
COUNT_LISTS: dict[str, int | None] = {
    "slide-hist-pos": N_SCORE_BINS,
    "slide-hist-neg": N_SCORE_BINS,
    "patch-hist-tumour": N_PATCH_BINS,
    "patch-hist-normal": N_PATCH_BINS,
    "class-counts": None,
    "confusion": None,
    "ece-count": ECE_BINS,
    "ece-events": ECE_BINS,
}
"""Lists of whole non-negative counts an evaluate reply carries, by length (``None``: the
number of labels, or its square for ``confusion``). ``slide-hist-*``: slides by tumour
log-odds, tumour (pos) and other (neg) slides, two labels only (zeros otherwise);
``patch-hist-*``: labelled patches by instance tumour log-odds (on the finer
``PATCH_EDGES``); ``confusion``: true × predicted
slide counts at the message's decision rule; ``ece-*``: slides and events per ECE bin."""
SUM_LISTS: dict[str, int] = {"nll-grid": len(TEMPERATURES), "ece-prob-sum": ECE_BINS}
"""Lists of non-negative sums over slides: the slide NLL at every grid temperature, and the
judged probability summed per ECE bin."""
EVALUATE_METRICS = (
    WEIGHT_METRIC,
    SKIPPED_METRIC,
    "loss",
    "auc",
    "patch-auc",
    "balanced-accuracy",
    "f1",
    "brier",
    "ece",
    "balanced-accuracy-raw",
    "brier-raw",
    "ece-raw",
    "seconds",
    *COUNT_LISTS,
    *SUM_LISTS,
)
"""What an evaluate reply may hold. With a fitted ``calibration`` in the instructions, loss,
balanced accuracy, F1, Brier, ECE, ``confusion`` and the ``ece-*`` bins are of the calibrated
probabilities at the calibrated threshold, and the ``-raw`` ones of the model's own at the
argmax; without one both are the model's own."""


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
    calibration: SlideCalibration | None = Field(
        None, description="applied to the slide logits before scoring (final test only)"
    )

    def to_json(self) -> str:
        # Without a calibration the JSON is what it was before the field existed: a train
        # message's digest keys the sites' privacy ledgers, and must not change with it.
        return self.model_dump_json(exclude={"calibration"} if self.calibration is None else None)

    @classmethod
    def from_json(cls, text: Any) -> RoundInstructions:
        """Parse the instructions of a message; ``ConfigError`` when absent or malformed."""
        if not isinstance(text, str):
            raise ConfigError("the message carries no round instructions")
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ConfigError(f"malformed round instructions: {exc}") from exc


MetricValue = float | list[int] | list[float]


def _list_length(key: str, n_labels: int) -> int:
    fixed = COUNT_LISTS.get(key, SUM_LISTS.get(key))
    if fixed is not None:
        return fixed
    return n_labels * n_labels if key == "confusion" else n_labels


def check_reply_metrics(
    metrics: Mapping[str, Any], allowed: tuple[str, ...], n_labels: int | None = None
) -> dict[str, MetricValue]:
    """Plain values of an allow-listed metric dict; refuse unknown keys and malformed values.

    Scalars everywhere except the keys of :data:`COUNT_LISTS` (whole, non-negative counts) and
    :data:`SUM_LISTS` (finite non-negative sums), which must be lists of their fixed length
    (``n_labels`` fixes the per-label ones; ``None`` takes it from ``class-counts``).
    This is the egress rule: if a future change tried to send, say, per-slide scores, the client
    would refuse to build that reply and the server would refuse to read it.
    """
    unknown = sorted(set(metrics) - set(allowed))
    if unknown:
        raise ValueError(f"metrics outside the allow-list: {unknown}")
    if n_labels is None and isinstance(metrics.get("class-counts"), list | tuple):
        n_labels = len(metrics["class-counts"])
    out: dict[str, MetricValue] = {}
    for key, value in metrics.items():
        if key in COUNT_LISTS or key in SUM_LISTS:
            out[key] = _check_list(key, value, n_labels or 0)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"metric {key!r} must be a number, got {type(value).__name__}")
        out[key] = float(value)
    return out


def _check_list(key: str, value: Any, n_labels: int) -> list[int] | list[float]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"metric {key!r} must be a list, got {type(value).__name__}")
    length = _list_length(key, n_labels)
    if len(value) != length:
        raise ValueError(f"metric {key!r} must have {length} entries, got {len(value)}")
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in value):
        raise ValueError(f"metric {key!r} must hold numbers only")
    if not all(math.isfinite(float(v)) and float(v) >= 0 for v in value):
        raise ValueError(f"metric {key!r} must hold finite non-negative numbers")
    if key in COUNT_LISTS:
        if not all(float(v).is_integer() for v in value):
            raise ValueError(f"metric {key!r} must hold whole counts")
        return [int(v) for v in value]
    return [float(v) for v in value]


def nan_to_none(value: float) -> float | None:
    """JSON has no NaN: undefined metrics are written as null."""
    return None if not math.isfinite(value) else float(value)


def facts_to_json(facts: Mapping[str, Any]) -> str:
    return json.dumps(dict(facts), sort_keys=True)
