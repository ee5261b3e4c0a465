"""Send messages to sites and collect their replies with a short poll.

Flower 1.41's ``Grid.send_and_receive`` on a real SuperLink (``HttpGrid``) pulls the replies,
then sleeps 3 s whenever one is missing. Every phase of a round (the harmonisation query,
train, evaluate) therefore ends on a 3 s tick: a reply that misses one pull waits for the next,
which was most of fedpath's measured overhead per round over Flower's floor (``bench/
federation.py``). Pulling every ``poll_interval`` seconds instead costs one cheap
``PullMessages`` call on the SuperLink's local ServerAppIo API per tick and ends the wait within
``poll_interval`` of the last reply.

It also tells apart the messages the SuperLink refused to take (``push_messages`` gives
``None`` for them): Flower's own loop keeps waiting for those until the timeout, and the round
would then blame the site for not answering.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the run config imports the default interval; keep that import light
    from flwr.app import Message
    from flwr.serverapp import Grid

__all__ = ["DEFAULT_POLL_INTERVAL", "Exchange", "send_and_collect"]

DEFAULT_POLL_INTERVAL = 0.2
"""Seconds between pulls: well under a round's compute, a few cheap local calls per second."""


@dataclass
class Exchange:
    """What one send-and-collect gave: the replies, and who could not be sent to at all."""

    replies: list[Message] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)
    """Destination node ids whose message the SuperLink did not accept."""
    sent: dict[str, int] = field(default_factory=dict)
    """Message id → destination node id of every accepted message: a SuperLink-made error
    reply names its message only by ``reply_to_message_id``, not by the site's node id."""


def send_and_collect(
    grid: Grid,
    messages: Sequence[Message],
    *,
    timeout: float,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Exchange:
    """Push ``messages`` and pull replies every ``poll_interval`` s until all came or ``timeout``.

    Replies include the error replies the SuperLink makes itself for a node that is gone or a
    message that expired. The last pull happens at the deadline, so a reply that arrives just
    before it is not lost to a sleep. A grid with a true ``replies_ready_at_push`` attribute
    (``deploy.inprocess_grid``: it runs the ClientApp inside ``push_messages``) is pulled once:
    what is missing then never comes, so waiting out the timeout would only slow tests.
    """
    if poll_interval <= 0:
        raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
    ids: list[str | None] = list(grid.push_messages(messages))
    if not ids:
        # Flower's HttpGrid gives an empty list when the SuperLink refused the whole push
        # (payload too large): nothing was sent.
        ids = [None] * len(messages)
    if len(ids) != len(messages):
        raise ValueError(f"the grid accepted {len(ids)} ids for {len(messages)} messages")
    exchange = Exchange()
    for message, message_id in zip(messages, ids, strict=True):
        node = int(message.metadata.dst_node_id)
        if message_id:
            exchange.sent[str(message_id)] = node
        else:
            exchange.unsent.append(node)
    pending = set(exchange.sent)
    deadline = clock() + timeout
    immediate = bool(getattr(grid, "replies_ready_at_push", False))
    while pending:
        pulled = list(grid.pull_messages(sorted(pending)))
        exchange.replies.extend(pulled)
        pending.difference_update(str(m.metadata.reply_to_message_id) for m in pulled)
        remaining = deadline - clock()
        if not pending or remaining <= 0 or immediate:
            break
        sleep(min(poll_interval, remaining))
    return exchange
