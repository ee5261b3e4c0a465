"""A Flower ``Grid`` that delivers each message to the real ClientApp inside this process.

The round loop, the strategies and the ClientApp are exactly those of a deployment; only the
transport is replaced. That makes it the right tool for the tests of the loop (gate, retries,
checkpoints, resume: seconds instead of minutes) and for accuracy benchmarks that compare
federated with centralised training on one machine, where Flower's ~10 s/round deployment
floor would only add waiting. Sites can be told to stay silent in chosen rounds (a timeout).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

__all__ = ["InProcessGrid", "InProcessSite", "task_identity"]


@contextmanager
def task_identity(run_id: int = 1) -> Iterator[None]:
    """Give this process the task identity a SuperLink or SuperNode would set.

    Flower's ``Message`` constructor reads it; in a deployment Flower sets it before our code
    runs, in-process nothing does. Restored on exit, so tests stay independent.
    """
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@dataclass
class InProcessSite:
    """One hospital: its prepared data, its name, and rounds in which it does not answer."""

    data: Path
    name: str
    silent_rounds: set[int] = field(default_factory=set)
    connected: bool = True
    node_config: dict[str, Any] = field(default_factory=dict)
    """More node config (e.g. ``privacy-budget``), as ``--node-config`` would give it."""


class InProcessGrid(Grid):
    """Routes each message to ``fedpath.client.app.app`` with the addressed site's node config."""

    replies_ready_at_push = True
    """``fedpath.server.replies.send_and_collect`` pulls once: a silent site's reply never comes."""

    def __init__(self, sites: dict[int, InProcessSite], run_id: int = 1) -> None:
        self.sites = sites
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._pending: dict[str, Message] = {}
        self._run = Run.create_empty(run_id)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        return [n for n, s in self.sites.items() if s.connected]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver now; the reply (if the site answers) waits for ``pull_messages``."""
        from fedpath.client.app import app as client_app

        ids: list[str] = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id  # the SuperLink sets it
            self.sent.append(message)
            ids.append(message_id)
            node = message.metadata.dst_node_id
            site = self.sites.get(node)
            if site is None or not site.connected:
                continue
            group = message.metadata.group_id
            if group and group.isdigit() and int(group) in site.silent_rounds:
                continue
            context = Context(
                run_id=self._run.run_id,
                node_id=node,
                node_config={**site.node_config, "data-path": str(site.data), "site": site.name},
                state=RecordDict(),
                run_config={},
            )
            reply = client_app(message, context)
            self.replies.append(reply)
            self._pending[message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(i) for i in message_ids if i in self._pending]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Every reply is ready at once; silent sites simply never answer (the timeout)."""
        del timeout
        return list(self.pull_messages(list(self.push_messages(messages))))
