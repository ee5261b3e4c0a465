"""The train and evaluate messages the round loop sends, built the same way for every test.

Tests of the ClientApp and of the resident worker need a real round message (initial model
arrays of the run config's model, the instructions JSON); one builder keeps them from drifting
apart when the message layout changes.
"""

from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedpath.server.config import RunConfig
from fedpath.server.federated_run import initial_arrays


def round_message(
    kind: str, feature_dim: int, server_round: int = 1, split: str = "val", node: int = 7
) -> Message:
    """A ``kind`` (train / evaluate) message of round ``server_round`` with a fresh model."""
    cfg = RunConfig(local_epochs=1)
    arrays = initial_arrays(cfg, feature_dim)
    instructions = {
        "server_round": server_round,
        "model": cfg.model_config_for(feature_dim).model_dump(mode="json"),
        "train": cfg.train_config().model_dump(mode="json"),
        "eval_split": split,
    }
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "config": ConfigRecord({"instructions": json.dumps(instructions)}),
        }
    )
    return Message(content, dst_node_id=node, message_type=kind)
