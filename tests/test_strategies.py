"""FedAvg / FedMix strategies in Flower's own test style: replies built from real records."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedpath.server.strategies import FedAvgStrategy, FedMixStrategy, ReplyError, build_strategy

pytestmark = pytest.mark.usefixtures("flower_task")


def _reply(node: int, w: np.ndarray, n: int, loss: float, **extra: float) -> Message:
    instruction = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = {"num-examples": n, "train-loss": loss, **extra}
    content = RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=instruction)


def _error(node: int) -> Message:
    instruction = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=1, reason="site_x: disk full"), reply_to=instruction)


def test_fedavg_hand_computed_mean_and_dtype() -> None:
    replies = [
        _reply(2, np.array([3.0, 6.0], dtype=np.float32), 30, 0.5),
        _reply(1, np.array([1.0, 2.0], dtype=np.float32), 10, 1.0),
    ]
    arrays, metrics = FedAvgStrategy().aggregate_train(1, replies)
    w = arrays["w"].numpy()
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, [2.5, 5.0])
    assert metrics["num-examples"] == 40
    assert metrics["train-loss"] == pytest.approx(0.25 * 1.0 + 0.75 * 0.5)


def test_fedmix_weights_logged_per_node_hand_computed() -> None:
    strategy = FedMixStrategy(lam=10.0, beta=1.5)
    replies = [
        _reply(7, np.array([0.0], dtype=np.float32), 10, 1.0),
        _reply(9, np.array([1.0], dtype=np.float32), 30, 0.5),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.last_weights == pytest.approx({7: 0.6943601, 9: 0.3056399})
    np.testing.assert_allclose(arrays["w"].numpy(), [0.3056399], atol=1e-6)
    assert arrays["w"].numpy().dtype == np.float32


def test_error_replies_are_skipped_and_all_errors_give_nothing() -> None:
    strategy = FedAvgStrategy()
    ok = _reply(1, np.array([4.0], dtype=np.float32), 5, 0.3)
    arrays, _ = strategy.aggregate_train(1, [ok, _error(2)])
    np.testing.assert_allclose(arrays["w"].numpy(), [4.0])
    assert strategy.last_weights == {1: 1.0}
    assert strategy.aggregate_train(2, [_error(2)]) == (None, None)
    assert strategy.last_weights == {}


def test_reply_order_does_not_change_the_result() -> None:
    rng = np.random.default_rng(0)
    values = [rng.normal(size=64).astype(np.float32) for _ in range(3)]
    replies = [_reply(i + 1, v, 3 + i, 0.1 * (i + 1)) for i, v in enumerate(values)]
    a, _ = FedMixStrategy().aggregate_train(1, replies)
    b, _ = FedMixStrategy().aggregate_train(1, list(reversed(replies)))
    np.testing.assert_array_equal(a["w"].numpy(), b["w"].numpy())


def test_metrics_outside_the_allow_list_are_refused() -> None:
    bad = _reply(1, np.zeros(1, dtype=np.float32), 5, 0.3, **{"slide-042-score": 0.9})
    with pytest.raises(ReplyError, match="allow-list"):
        FedAvgStrategy().aggregate_train(1, [bad])


def test_sites_reporting_different_metric_keys_are_refused() -> None:
    a = _reply(1, np.zeros(1, dtype=np.float32), 5, 0.3)
    b = _reply(2, np.zeros(1, dtype=np.float32), 5, 0.3, **{"val-auc": 0.5})
    with pytest.raises(ReplyError, match="reports metrics"):
        FedAvgStrategy().aggregate_train(1, [a, b])


def test_build_strategy_and_state() -> None:
    assert build_strategy("fedavg", 1.0, 1.0).state() == {"name": "fedavg"}
    assert build_strategy("fedmix", 2.0, 3.0).state() == {
        "name": "fedmix",
        "lambda": 2.0,
        "beta": 3.0,
    }
    with pytest.raises(ValueError):
        build_strategy("fedprox", 1.0, 1.0)
    with pytest.raises(ValueError):
        FedMixStrategy(lam=-1.0)
