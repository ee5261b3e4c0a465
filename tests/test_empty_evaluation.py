"""A site with no slide in the evaluated split still answers with the whole protocol."""

from __future__ import annotations

import math

from flwr.app import MessageType

from fedpath.client.federated import _empty_evaluation
from fedpath.common.federation import EVALUATE_METRICS, check_reply_metrics
from fedpath.server.pooled import PooledCounts
from tests.egress import _check_metrics


def test_empty_evaluation_has_every_key_the_server_checks_and_pools_to_nothing() -> None:
    for n_labels in (2, 3):
        reply = {**_empty_evaluation(n_labels), "seconds": 0.1}
        assert set(reply) == set(EVALUATE_METRICS)
        assert _check_metrics(reply, MessageType.EVALUATE, "empty site", n_labels) == []
        checked = check_reply_metrics(reply, EVALUATE_METRICS, n_labels)
        assert checked["confusion"] == [0] * (n_labels * n_labels)
        assert checked["class-counts"] == [0] * n_labels
        pooled = PooledCounts(n_labels)
        pooled.add(checked)
        assert pooled.sites == 0 and math.isnan(reply["auc"])
