"""FedAvg and FedMix as Flower Message-API strategies (DESIGN §4.6).

Both subclass Flower's own ``FedAvg`` and replace only ``aggregate_train``: sampling and message
construction stay Flower's, while the weights come from :mod:`fedpath.server.aggregation`, are kept
per reply for the run log (``last_weights``), and the average keeps the arrays' dtype (Flower's
``aggregate_arrayrecords`` returns float64 for float32 models under numpy 2).

Replies are aggregated in ascending node-id order, so the floating-point sum, and with it the
global model, does not depend on the order in which sites happened to answer: a resumed run
then reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedpath.common.federation import TRAIN_METRICS, WEIGHT_METRIC, check_reply_metrics
from fedpath.server.aggregation import fedavg_weights, fedmix_weights, weighted_average

__all__ = ["FedAvgStrategy", "FedMixStrategy", "ReplyError", "build_strategy"]


class ReplyError(ValueError):
    """A reply cannot be aggregated (missing records, metrics outside the allow-list, ...)."""


def _reply_parts(message: Message) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    content = message.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        raise ReplyError(
            f"node {message.metadata.src_node_id}: expected one ArrayRecord and one "
            f"MetricRecord, got {len(content.array_records)} and {len(content.metric_records)}"
        )
    arrays = next(iter(content.array_records.values()))
    metrics = next(iter(content.metric_records.values()))
    try:
        clean = check_reply_metrics(dict(metrics), TRAIN_METRICS)
    except ValueError as exc:
        raise ReplyError(f"node {message.metadata.src_node_id}: {exc}") from exc
    if WEIGHT_METRIC not in clean:
        raise ReplyError(f"node {message.metadata.src_node_id}: no {WEIGHT_METRIC!r} metric")
    return {k: v.numpy() for k, v in arrays.items()}, clean


class FedAvgStrategy(FedAvg):
    """FedAvg with ``w_i = n_i / Σ n`` (``n_i`` = training slides), dtype-preserving."""

    name = "fedavg"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(weighted_by_key=WEIGHT_METRIC, **kwargs)
        self.last_weights: dict[int, float] = {}

    def weights(self, metrics: list[dict[str, float]]) -> np.ndarray:
        """Aggregation weight per reply, in the order given."""
        return fedavg_weights([m[WEIGHT_METRIC] for m in metrics])

    def state(self) -> dict[str, Any]:
        """What a checkpoint must hold to rebuild this strategy (its settings)."""
        return {"name": self.name}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint's ``state()``: the settings come from the run config, so
        plain averaging has nothing to restore (client-level DP restores its accountant)."""
        del state

    def begin_aggregation(self, global_arrays: Mapping[str, np.ndarray]) -> None:
        """The round loop's hook before ``aggregate_train``: the global model the replies were
        trained from. Averaging does not need it; client-level DP clips each reply's difference
        from it (``fedpath.server.client_dp``)."""
        del global_arrays

    def round_log(self) -> dict[str, Any]:
        """Fields this strategy adds to the round's ``metrics.jsonl`` line (none here)."""
        return {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted average of the replies without errors; ``(None, None)`` when none is left."""
        del server_round
        good = sorted(
            (m for m in replies if not m.has_error()), key=lambda m: m.metadata.src_node_id
        )
        self.last_weights = {}
        if not good:
            return None, None
        parts = [_reply_parts(m) for m in good]
        metrics = [p[1] for p in parts]
        keys = set(metrics[0])
        for message, m in zip(good, metrics, strict=True):
            if set(m) != keys:
                raise ReplyError(
                    f"node {message.metadata.src_node_id} reports metrics {sorted(m)}, "
                    f"others report {sorted(keys)}"
                )
        w = self.weights(metrics)
        averaged = weighted_average([p[0] for p in parts], w)
        self.last_weights = {m.metadata.src_node_id: float(x) for m, x in zip(good, w, strict=True)}
        summary = MetricRecord(
            {
                key: float(np.dot(w, [m[key] for m in metrics]))
                for key in sorted(keys)
                if key != WEIGHT_METRIC
            }
        )
        summary[WEIGHT_METRIC] = int(sum(m[WEIGHT_METRIC] for m in metrics))
        return ArrayRecord({k: Array(v) for k, v in averaged.items()}), summary


class FedMixStrategy(FedAvgStrategy):
    """FedMix: data-quantity weights plus ``λ``× loss-proportional weights with exponent ``β``."""

    name = "fedmix"

    def __init__(self, lam: float = 10.0, beta: float = 1.5, **kwargs: Any) -> None:
        if lam < 0 or beta <= 0:
            raise ValueError(f"FedMix needs λ >= 0 and β > 0; got λ={lam}, β={beta}")
        super().__init__(**kwargs)
        self.lam = lam
        self.beta = beta

    def weights(self, metrics: list[dict[str, float]]) -> np.ndarray:
        return fedmix_weights(
            [m[WEIGHT_METRIC] for m in metrics],
            [m["train-loss"] for m in metrics],
            self.lam,
            self.beta,
        )

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "lambda": self.lam, "beta": self.beta}


def build_strategy(name: str, lam: float, beta: float) -> FedAvgStrategy:
    """The strategy a run config names; sampling is done by the round loop, not by Flower."""
    if name == "fedavg":
        return FedAvgStrategy()
    if name == "fedmix":
        return FedMixStrategy(lam=lam, beta=beta)
    raise ValueError(f"unknown strategy {name!r} (fedavg or fedmix)")
