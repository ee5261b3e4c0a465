"""Reply collection with a short poll (``server.replies``) and the round loop's use of it."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Error, Message, MessageType, RecordDict

from fedpath.common.federation import RoundInstructions
from fedpath.server.config import RunConfig
from fedpath.server.replies import send_and_collect
from fedpath.server.rounds import Federation

pytestmark = pytest.mark.usefixtures("flower_task")


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class TimedGrid:
    """A grid whose sites answer at given (fake) times; ``None`` = never; ``refused`` = the
    SuperLink does not take the message (``push_messages`` gives ``None``, as Flower's does)."""

    def __init__(
        self, clock: FakeClock, answer_at: dict[int, float | None], refused: Iterable[int] = ()
    ) -> None:
        self.clock, self.answer_at, self.refused = clock, answer_at, set(refused)
        self.sent: dict[str, Message] = {}
        self.pulls: list[float] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str | None]:
        ids: list[str | None] = []
        for i, message in enumerate(messages):
            node = int(message.metadata.dst_node_id)
            if node in self.refused:
                ids.append(None)
                continue
            message_id = f"m{node}-{i}"
            message.metadata.__dict__["_message_id"] = message_id
            self.sent[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls.append(self.clock.now)
        out = []
        for message_id in message_ids:
            message = self.sent.get(message_id)
            due = None if message is None else self.answer_at[int(message.metadata.dst_node_id)]
            if due is not None and due <= self.clock.now:
                out.append(Message(RecordDict({}), reply_to=self.sent.pop(message_id)))
        return out


def _messages(nodes: Iterable[int]) -> list[Message]:
    return [Message(RecordDict({}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]


def test_the_wait_ends_within_one_poll_interval_of_the_last_reply() -> None:
    """Regression: Flower's loop sleeps 3 s between pulls, so every phase of a round ended on
    a 3 s tick (bench/federation: 6.7 s/round over the no-op floor)."""
    clock = FakeClock()
    grid = TimedGrid(clock, {1: 0.05, 2: 1.31, 3: 0.7})
    exchange = send_and_collect(
        grid, _messages([1, 2, 3]), timeout=60, poll_interval=0.2, clock=clock, sleep=clock.sleep
    )
    assert sorted(int(r.metadata.src_node_id) for r in exchange.replies) == [1, 2, 3]
    assert exchange.unsent == []
    assert 1.31 <= clock.now <= 1.31 + 0.2 + 1e-9
    assert max(clock.sleeps) <= 0.2


def test_a_silent_site_is_waited_for_until_the_timeout_and_the_last_pull_is_at_the_deadline() -> (
    None
):
    clock = FakeClock()
    grid = TimedGrid(clock, {1: 0.1, 2: None, 3: 10.0})
    exchange = send_and_collect(
        grid, _messages([1, 2, 3]), timeout=10.0, poll_interval=3.0, clock=clock, sleep=clock.sleep
    )
    # Node 3 answers exactly at the deadline: the final pull is made then, not skipped.
    assert sorted(int(r.metadata.src_node_id) for r in exchange.replies) == [1, 3]
    assert grid.pulls[-1] == pytest.approx(10.0)
    assert clock.now == pytest.approx(10.0)


def test_a_message_the_superlink_refused_is_reported_and_not_waited_for() -> None:
    clock = FakeClock()
    grid = TimedGrid(clock, {1: 0.0, 2: 0.0}, refused={2})
    exchange = send_and_collect(
        grid, _messages([1, 2]), timeout=900, poll_interval=0.2, clock=clock, sleep=clock.sleep
    )
    assert exchange.unsent == [2]
    assert [int(r.metadata.src_node_id) for r in exchange.replies] == [1]
    assert clock.now == 0.0


def test_error_replies_are_collected_like_any_other() -> None:
    clock = FakeClock()
    grid = TimedGrid(clock, {1: 0.5})
    (message,) = _messages([1])
    original = grid.pull_messages

    def pull_with_error(ids: Iterable[str]) -> list[Message]:
        sent = dict(grid.sent)
        answered = original(ids)  # the site's replies that are due, turned into errors
        return [
            Message(
                Error(code=3, reason="Node Unavailable"),
                reply_to=sent[r.metadata.reply_to_message_id],
            )
            for r in answered
        ]

    grid.pull_messages = pull_with_error  # type: ignore[method-assign]
    exchange = send_and_collect(
        grid, [message], timeout=5, poll_interval=0.2, clock=clock, sleep=clock.sleep
    )
    assert len(exchange.replies) == 1 and exchange.replies[0].has_error()


def test_the_poll_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        send_and_collect(TimedGrid(FakeClock(), {}), [], timeout=1, poll_interval=0)  # type: ignore[arg-type]


def test_the_run_config_bounds_the_poll_interval() -> None:
    from fedpath.common.errors import ConfigError

    assert RunConfig.from_run_config({}).reply_poll_interval == pytest.approx(0.2)
    assert RunConfig.from_run_config({"reply-poll-interval": 1.5}).reply_poll_interval == 1.5
    for bad in (0, -1, 11):
        with pytest.raises(ConfigError, match=r"reply.poll.interval"):
            RunConfig.from_run_config({"reply-poll-interval": bad})


def test_the_round_names_a_refused_message_instead_of_a_timeout() -> None:
    clock = FakeClock()
    grid = TimedGrid(clock, {1: 0.0, 2: 0.0}, refused={2})
    cfg = RunConfig.from_run_config({"round-timeout": 5.0})
    federation = Federation(
        grid=grid,  # type: ignore[arg-type]
        cfg=cfg,
        log=None,  # type: ignore[arg-type]
        strategy=None,  # type: ignore[arg-type]
    )
    instructions = RoundInstructions(
        server_round=1, model=cfg.model_config_for(8), train=cfg.train_config()
    )
    good, failed = federation._exchange(
        [1, 2], {"w": np.zeros(2, np.float32)}, instructions, MessageType.TRAIN
    )
    assert [int(m.metadata.src_node_id) for m in good] == [1]
    assert set(failed) == {2}
    assert "did not accept" in failed[2]


def test_a_grid_whose_replies_are_ready_at_push_is_pulled_once() -> None:
    """The in-process grid answers inside ``push_messages``: a silent site's reply never comes,
    so the round does not wait out its timeout (it did, and the fault tests hung)."""
    clock = FakeClock()
    grid = TimedGrid(clock, {1: 0.0, 2: None})
    grid.replies_ready_at_push = True  # type: ignore[attr-defined]
    exchange = send_and_collect(
        grid, _messages([1, 2]), timeout=900, poll_interval=0.2, clock=clock, sleep=clock.sleep
    )
    assert [int(r.metadata.src_node_id) for r in exchange.replies] == [1]
    assert len(grid.pulls) == 1 and clock.now == 0.0


def test_an_empty_id_list_means_the_superlink_refused_the_whole_push() -> None:
    """Flower's HttpGrid returns [] when the SuperLink refuses the payload as too large."""
    clock = FakeClock()
    grid = TimedGrid(clock, {1: 0.0, 2: 0.0})
    grid.push_messages = lambda messages: []  # type: ignore[method-assign]
    exchange = send_and_collect(
        grid, _messages([1, 2]), timeout=900, poll_interval=0.2, clock=clock, sleep=clock.sleep
    )
    assert exchange.unsent == [1, 2] and exchange.replies == [] and exchange.sent == {}
    assert grid.pulls == [] and clock.now == 0.0


def test_ids_that_cannot_be_paired_with_the_messages_are_an_error() -> None:
    """Pairing a short id list with the first messages would blame the wrong sites."""
    grid = TimedGrid(FakeClock(), {1: 0.0, 2: 0.0})
    grid.push_messages = lambda messages: ["only-one"]  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="1 ids for 2 messages"):
        send_and_collect(grid, _messages([1, 2]), timeout=1)


def test_the_exchange_maps_each_accepted_message_to_its_node() -> None:
    clock = FakeClock()
    grid = TimedGrid(clock, {1: 0.0, 2: 0.0}, refused={2})
    exchange = send_and_collect(
        grid, _messages([1, 2]), timeout=1, poll_interval=0.2, clock=clock, sleep=clock.sleep
    )
    assert exchange.sent == {"m1-0": 1}
