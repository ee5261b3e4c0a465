"""The hospital's Flower ClientApp: train, evaluate and the harmonisation query.

A SuperNode starts this app in a fresh process for every message, so the module imports only
Flower's light message types at import time; torch, h5py and the trainer are imported inside
the handlers (``fedpath.client.federated``), and so are the message schema's pydantic models
(``fedpath.common.federation``). A node started with ``resident-worker=true`` (the default of
``fedpath node``) runs the handlers in its resident worker instead (:mod:`fedpath.client.worker`),
which keeps those imports loaded between messages; the message process then only forwards,
and imports nothing but Flower, numpy and the socket protocol (``tests/test_client_app.py``
checks it).

The site's data directory comes from the SuperNode's
``--node-config 'data-path="/data/fedpath" site="a"'``; nothing about the site's slides is
taken from the message except the instructions every site receives. A hospital sets its
lifetime slide-level privacy budget there too (``privacy-budget=8.0 privacy-delta=1e-5``):
the privacy ledger in the data directory and the run's ``Context.state`` keep what was spent.
``torch-threads=N`` caps torch's threads for training and evaluation when several nodes share
one machine (:mod:`fedpath.client.threads`); ``bag-cache-mib=N`` caps the memory the resident worker
keeps a run's feature bags in between messages (default 512, 0 = off;
:mod:`client.training.bag_cache`). ``device="cuda:1"`` chooses where this hospital trains and
evaluates (``auto | cpu | cuda | cuda:N | mps``, default auto: a GPU when torch sees one;
:mod:`client.node_device`); the server's run config cannot choose it. Each train and evaluate
message writes one line to the SuperNode's log saying which device ran it and in which
precision; the device is not sent to the server (the reply's metrics are a fixed allow-list of
numbers).

A handler that fails replies with a Flower error message (reason = the fedpath error text),
never with partial content: the server logs it and asks that site again next round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpath.client.node_log import node_log
from fedpath.client.threads import node_torch_threads, torch_threads
from fedpath.common.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from fedpath.client.federated import SitePrivacy
    from fedpath.common.federation import RoundInstructions

app = ClientApp()
logger = logging.getLogger(__name__)


@app.lifespan()
def _lifespan(context: Context) -> Iterator[None]:
    """Around every message: fedpath's log lines go to the SuperNode's log (stderr)."""
    del context
    with node_log():
        yield


def _simulated_site(context: Context) -> Path | None:
    """In Flower's simulation engine a virtual node only knows its ``partition-id``; the run
    config's ``simulation-data`` folder then holds one prepared site per partition."""
    root = context.run_config.get("simulation-data")
    partition = context.node_config.get("partition-id")
    if isinstance(root, str) and root and isinstance(partition, int):
        return Path(root).expanduser() / f"site_{partition:03d}"
    return None


def site_name(context: Context) -> str:
    """The site's name: ``site`` of the node config, else its data folder, else the node id."""
    site = context.node_config.get("site")
    if isinstance(site, str) and site:
        return site
    raw = context.node_config.get("data-path")
    if isinstance(raw, str) and raw:
        return Path(raw).name
    simulated = _simulated_site(context)
    return simulated.name if simulated is not None else f"node {context.node_id}"


def site_of(context: Context) -> tuple[Path, str]:
    """``(data directory, site name)`` from the node config; ``ConfigError`` if unusable."""
    raw = context.node_config.get("data-path")
    simulated = _simulated_site(context)
    if (not isinstance(raw, str) or not raw) and simulated is not None:
        return simulated, site_name(context)
    if not isinstance(raw, str) or not raw:
        raise ConfigError(
            "this SuperNode has no data-path in its node config; start it with "
            "--node-config 'data-path=\"/data/fedpath\"' (see `fedpath node --help`)"
        )
    return Path(raw).expanduser(), site_name(context)


def check_reply_metrics(metrics: Mapping[str, Any], allowed: tuple[str, ...]) -> dict[str, float]:
    """The egress allow-list every reply passes (``common.federation``), imported when a reply
    is built: the forwarding message process never builds one."""
    from fedpath.common.federation import check_reply_metrics as check

    return check(metrics, allowed)


def _instructions(content: RecordDict) -> RoundInstructions:
    from fedpath.common.federation import CONFIG_KEY, INSTRUCTIONS_FIELD, RoundInstructions

    config = content.config_records.get(CONFIG_KEY)
    return RoundInstructions.from_json(None if config is None else config.get(INSTRUCTIONS_FIELD))


def _global_state(content: RecordDict) -> dict:
    from fedpath.common.federation import ARRAYS_KEY

    arrays = content.array_records.get(ARRAYS_KEY)
    if arrays is None:
        raise ConfigError("the message carries no model arrays")
    return {key: value.numpy() for key, value in arrays.items()}


def _guarded(handler: Callable[[Message, Context], Message]) -> Callable[..., Message]:
    """Turn a fedpath error into an error reply naming the site (the server logs it).

    The reason is redacted (:mod:`fedpath.client.error_reply`): it leaves the hospital, so it names
    no slide, patient or file; the full message goes to the SuperNode's log.
    """

    def wrapped(message: Message, context: Context) -> Message:
        from flwr.app import Error

        from fedpath.client.error_reply import error_reason
        from fedpath.common.errors import SITE_REPLY_ERRORS, FedpathError

        try:
            return handler(message, context)
        except SITE_REPLY_ERRORS as exc:
            try:
                data: Path | None = site_of(context)[0]
            except FedpathError:
                data = None
            reason = error_reason(site_name(context), exc, data)
            return Message(Error(code=1, reason=reason), reply_to=message)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def _site_privacy(context: Context, site: str) -> SitePrivacy:
    """The hospital's budget (node config ``privacy-budget``, ``privacy-delta``) and the run's
    privacy entries kept in ``Context.state`` (the ledger on disk is merged with them)."""
    from fedpath.client.federated import SitePrivacy
    from fedpath.client.privacy_ledger import STATE_KEY, NodeBudget, entries_from_state

    budget = NodeBudget.from_node_config(context.node_config)
    record = context.state.config_records.get(STATE_KEY)
    carried = {str(k): entries_from_state(context.state, str(k)) for k in (record or {})}
    return SitePrivacy(budget=budget, run_id=str(context.run_id), site=site, carried=carried)


def _train_line(
    site: str, instructions: RoundInstructions, device: torch.device, metrics: Mapping[str, Any]
) -> str:
    """What the round trained on, for the log: device, precision, slides, seconds."""
    from fedpath.client.training.trainer import resolve_precision
    from fedpath.common.device import describe_device

    head = f"{site}: train round {instructions.server_round}"
    if metrics.get("budget-exhausted") == 1.0:
        return f"{head}: not trained (privacy budget exhausted)"
    precision = resolve_precision(
        instructions.train.precision, device, private=instructions.dp.enabled
    )
    return (
        f"{head} on {describe_device(device)} in {precision}: "
        f"{int(metrics['num-examples'])} slides, {metrics['seconds']:.1f} s"
    )


def train_content(content: RecordDict, context: Context) -> RecordDict:
    """Local epochs on the site's training split, starting from the global model."""
    from fedpath.client.federated import train_on_site
    from fedpath.client.node_device import node_device
    from fedpath.common.federation import ARRAYS_KEY, METRICS_KEY, TRAIN_METRICS

    data, site = site_of(context)
    privacy = _site_privacy(context, site)
    device = node_device(context.node_config)
    instructions = _instructions(content)
    with torch_threads(node_torch_threads(context.node_config)):
        weights, metrics = train_on_site(
            data, instructions, _global_state(content), privacy, device=device
        )
    logger.info(_train_line(site, instructions, device, metrics))
    if privacy.dataset_id is not None:
        from fedpath.client.privacy_ledger import entries_to_state

        entries_to_state(context.state, privacy.dataset_id, privacy.run_entries)
    return RecordDict(
        {
            ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in weights.items()}),
            METRICS_KEY: MetricRecord(check_reply_metrics(metrics, TRAIN_METRICS)),
        }
    )


def evaluate_content(content: RecordDict, context: Context) -> RecordDict:
    """Score the global model on the split the server names (val each round, test at the end)."""
    from fedpath.client.federated import evaluate_on_site
    from fedpath.client.node_device import node_device
    from fedpath.common.device import describe_device
    from fedpath.common.federation import EVALUATE_METRICS, METRICS_KEY

    data, site = site_of(context)
    device = node_device(context.node_config)
    instructions = _instructions(content)
    with torch_threads(node_torch_threads(context.node_config)):
        metrics = evaluate_on_site(data, instructions, _global_state(content), device=device)
    logger.info(
        f"{site}: evaluate ({instructions.eval_split}) round {instructions.server_round} on "
        f"{describe_device(device)} in float32: {int(metrics['num-examples'])} slides, "
        f"{float(metrics['seconds']):.1f} s"
    )
    return RecordDict({METRICS_KEY: MetricRecord(check_reply_metrics(metrics, EVALUATE_METRICS))})


def query_content(content: RecordDict, context: Context) -> RecordDict:
    """The site's aggregate preparation facts, for the server's harmonisation gate."""
    from fedpath.client.site_facts import site_facts
    from fedpath.common.federation import CONFIG_KEY, FACTS_FIELD, facts_to_json

    data, site = site_of(context)
    facts = site_facts(data, site)
    return RecordDict({CONFIG_KEY: ConfigRecord({FACTS_FIELD: facts_to_json(facts)})})


CONTENT_HANDLERS: dict[str, Callable[[RecordDict, Context], RecordDict]] = {
    "train": train_content,
    "evaluate": evaluate_content,
    "query": query_content,
}
"""What each message type does, as a function of content and context: run here, or in the
node's resident worker (:mod:`fedpath.client.worker`), which imports torch once for all messages."""


def _run(op: str, message: Message, context: Context) -> Message:
    """Run ``op`` in the resident worker when the node enabled it, else in this process."""
    from fedpath.client.worker_client import call_worker, worker_enabled

    if worker_enabled(context):
        content = call_worker(op, message.content, context, site_of(context)[0])
    else:
        content = CONTENT_HANDLERS[op](message.content, context)
    return Message(content=content, reply_to=message)


@app.train()
@_guarded
def train(message: Message, context: Context) -> Message:
    """Local epochs on the site's training split, starting from the global model."""
    return _run("train", message, context)


@app.evaluate()
@_guarded
def evaluate(message: Message, context: Context) -> Message:
    """Score the global model on the split the server names (val each round, test at the end)."""
    return _run("evaluate", message, context)


@app.query()
@_guarded
def query(message: Message, context: Context) -> Message:
    """The site's aggregate preparation facts, for the server's harmonisation gate."""
    return _run("query", message, context)
