"""A ClientApp that answers at once: Flower's per-message floor (process start, pulls, push).

It imports nothing beyond Flower's message types, so the time its messages take is what the
deployment machinery costs by itself; fedpath's ClientApp on top of that pays its imports
(torch, h5py, the trainer), loading bags, and training.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    """Reply with the arrays received (same payload size on the way back)."""
    arrays = next(iter(message.content.array_records.values()), ArrayRecord())
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Reply with one metric, as fedpath's evaluate replies with metrics only."""
    content = RecordDict({"metrics": MetricRecord({"num-examples": 1, "loss": 0.0})})
    return Message(content=content, reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Reply with a small config record, as fedpath's harmonisation query does."""
    content = RecordDict({"config": ConfigRecord({"facts": "{}"})})
    return Message(content=content, reply_to=message)
