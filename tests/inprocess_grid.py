"""A Flower ``Grid`` that delivers messages to the real ClientApp in this process.

Used to test the round loop (gate, retries, checkpoints, resume) in seconds without daemons;
the end-to-end tests start real SuperLink/SuperNode processes instead. Sites can be told to
fail (error reply) or to stay silent (timeout) for chosen rounds.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from client.app import app as client_app


@dataclass
class FakeSite:
    data: Path
    name: str
    silent_rounds: set[int] = field(default_factory=set)
    """Rounds (group ids) in which this site never answers (a timeout)."""
    connected: bool = True


class InProcessGrid(Grid):
    """Routes each message to ``client.app.app`` with the addressed site's node config."""

    def __init__(self, sites: dict[int, FakeSite]) -> None:
        self.sites = sites
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._run = None

    def set_run(self, run_id: int) -> None:  # pragma: no cover - Grid API, unused here
        self._run = run_id

    @property
    def run(self):  # pragma: no cover - Grid API, unused here
        return self._run

    def create_message(self, *args, **kwargs) -> Message:  # pragma: no cover
        raise NotImplementedError("the round loop builds its messages itself")

    def get_node_ids(self) -> Iterable[int]:
        return [n for n, s in self.sites.items() if s.connected]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        del timeout
        out: list[Message] = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # the SuperLink sets it
            self.sent.append(message)
            node = message.metadata.dst_node_id
            site = self.sites.get(node)
            if site is None or not site.connected:
                continue
            group = message.metadata.group_id
            if group and int(group) in site.silent_rounds:
                continue
            context = Context(
                run_id=1,
                node_id=node,
                node_config={"data-path": str(site.data), "site": site.name},
                state=RecordDict(),
                run_config={},
            )
            reply = client_app(message, context)
            self.replies.append(reply)
            out.append(reply)
        return out
