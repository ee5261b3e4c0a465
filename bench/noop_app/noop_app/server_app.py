"""A ServerApp with fedpath's message pattern and none of its work.

One query to every site, then per round a train message carrying the model arrays (shapes from
the run config, so the payload matches fedpath's model) and an evaluate message carrying them
again, then a final evaluate: the same messages, in the same order, as ``server.rounds``. The
seconds of each round (train + evaluate exchange, like fedpath's ``metrics.jsonl``) go to
``out-file``. Every wait is bounded; a missing reply fails the run.

``reply-poll-interval`` > 0 collects replies the way fedpath's round loop does
(``fedpath.server.replies.send_and_collect``: a pull every that many seconds), so the floor and ours
wait for replies alike; 0 uses Flower's own ``send_and_receive`` (a pull every 3 s), the stock
floor.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} node(s) connected, {minimum} needed")
        time.sleep(1.0)


def _exchange(
    grid: Grid,
    nodes: list[int],
    message_type: str,
    content: Callable[[], RecordDict],
    group: str,
    timeout: float,
    poll_interval: float,
) -> list[Message]:
    """Send ``content()`` to every node and wait for all replies; ``RuntimeError`` otherwise.

    One RecordDict per node, as ``fedpath.server.rounds`` builds them.
    """
    messages = [
        Message(content(), dst_node_id=n, message_type=message_type, group_id=group) for n in nodes
    ]
    if poll_interval > 0:
        from fedpath.server.replies import send_and_collect

        replies = send_and_collect(
            grid, messages, timeout=timeout, poll_interval=poll_interval
        ).replies
    else:
        replies = list(grid.send_and_receive(messages, timeout=timeout))
    good = [r for r in replies if not r.has_error()]
    if len(good) != len(nodes):
        reasons = [r.error.reason for r in replies if r.has_error()]
        raise RuntimeError(f"{message_type}: {len(good)} of {len(nodes)} replied ({reasons})")
    return good


def _content(arrays: dict[str, np.ndarray], server_round: int) -> RecordDict:
    """The model arrays and a small config, as fedpath's train and evaluate messages carry."""
    return RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "config": ConfigRecord({"round": server_round}),
        }
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Query, ``num-server-rounds`` × (train, evaluate), final evaluate."""
    cfg = context.run_config
    rounds = int(cfg["num-server-rounds"])
    timeout = float(cfg["round-timeout"])
    poll = float(cfg.get("reply-poll-interval", 0.0))
    shapes = [tuple(int(d) for d in s) for s in json.loads(str(cfg["shapes"]))]
    out = Path(str(cfg["out-file"])) if cfg.get("out-file") else None
    nodes = _wait_for_nodes(grid, int(cfg["min-sites"]), float(cfg["connect-timeout"]))
    _exchange(grid, nodes, MessageType.QUERY, RecordDict, "0", timeout, poll)
    arrays = {f"a{i}": np.zeros(shape, dtype=np.float32) for i, shape in enumerate(shapes)}
    lines: list[str] = []
    for server_round in range(1, rounds + 1):
        began = time.time()
        group = str(server_round)
        make = partial(_content, arrays, server_round)
        replies = _exchange(grid, nodes, MessageType.TRAIN, make, group, timeout, poll)
        arrays = {k: v.numpy() for k, v in replies[0].content.array_records["arrays"].items()}
        make = partial(_content, arrays, server_round)
        _exchange(grid, nodes, MessageType.EVALUATE, make, group, timeout, poll)
        lines.append(json.dumps({"round": server_round, "seconds": time.time() - began}))
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    make = partial(_content, arrays, rounds)
    _exchange(grid, nodes, MessageType.EVALUATE, make, str(rounds), timeout, poll)
