"""The ClientApp's handlers on a synthetic prepared site: replies, errors, egress rules."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedpath.client.app import app
from fedpath.common.federation import EVALUATE_METRICS, TRAIN_METRICS, check_reply_metrics
from fedpath.server.config import RunConfig
from fedpath.server.strategies import FedAvgStrategy, ReplyError
from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site
from tests.round_messages import round_message

pytestmark = pytest.mark.usefixtures("flower_task")

SPEC = SyntheticSiteSpec(n_slides=10, feature_dim=16, patches=(10, 30))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_site(tmp_path_factory.mktemp("site") / "a", SPEC, seed=0)


def _context(data: Path | None) -> Context:
    node_config = {"site": "site_a"} if data is None else {"data-path": str(data), "site": "site_a"}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _message(kind: str, server_round: int = 1, split: str = "val") -> Message:
    return round_message(kind, SPEC.feature_dim, server_round, split)


def test_query_reports_aggregate_facts_only(site: Path) -> None:
    reply = app(
        Message(RecordDict({}), dst_node_id=7, message_type=MessageType.QUERY), _context(site)
    )
    facts = json.loads(reply.content.config_records["config"]["facts"])
    assert facts["site"] == "site_a" and facts["feature_dim"] == SPEC.feature_dim
    assert facts["slides"]["usable"] == SPEC.n_slides
    assert "slide_0" not in json.dumps(facts) and "features/" not in json.dumps(facts)


def test_train_reply_holds_parameters_and_allow_listed_metrics(site: Path) -> None:
    reply = app(_message(MessageType.TRAIN), _context(site))
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content.metric_records["metrics"])
    assert set(metrics) == set(TRAIN_METRICS)
    assert metrics["num-examples"] == 6
    assert math.isfinite(metrics["train-loss"]) and metrics["train-loss"] >= 0
    arrays = reply.content.array_records["arrays"]
    assert all(v.numpy().dtype == np.float32 for v in arrays.values())
    assert FedAvgStrategy().aggregate_train(1, [reply])[0] is not None


def test_evaluate_reply_on_test_split(site: Path) -> None:
    reply = app(_message(MessageType.EVALUATE, split="test"), _context(site))
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content.metric_records["metrics"])
    assert set(metrics) == set(EVALUATE_METRICS)
    assert metrics["num-examples"] == 2 and 0.0 <= metrics["auc"] <= 1.0


def test_missing_data_path_is_an_error_reply_naming_the_site() -> None:
    reply = app(_message(MessageType.TRAIN), _context(None))
    assert reply.has_error()
    assert reply.error.reason.startswith("site_a: ") and "data-path" in reply.error.reason


def test_unprepared_directory_is_an_error_reply(tmp_path: Path) -> None:
    reply = app(_message(MessageType.TRAIN), _context(tmp_path))
    assert reply.has_error() and "not a prepared site" in reply.error.reason


def test_malformed_instructions_are_an_error_reply(site: Path) -> None:
    message = _message(MessageType.TRAIN)
    message.content.config_records["config"]["instructions"] = '{"server_round": -1}'
    reply = app(message, _context(site))
    assert reply.has_error() and "malformed round instructions" in reply.error.reason


def test_egress_allow_list_refuses_unknown_and_non_scalar_metrics() -> None:
    with pytest.raises(ValueError, match="allow-list"):
        check_reply_metrics({"num-examples": 3, "slide_001": 0.9}, TRAIN_METRICS)
    with pytest.raises(ValueError, match="must be a number"):
        check_reply_metrics({"num-examples": [1.0, 2.0]}, TRAIN_METRICS)


def test_server_rejects_a_reply_without_the_weight_metric() -> None:
    instruction = Message(RecordDict({}), dst_node_id=3, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}),
            "metrics": MetricRecord({"train-loss": 0.5}),
        }
    )
    with pytest.raises(ReplyError, match="node 3: no 'num-examples' metric"):
        FedAvgStrategy().aggregate_train(1, [Message(content, reply_to=instruction)])


def _dp_message(server_round: int, run_config: dict) -> Message:
    """A train message of a run with slide-level DP-SGD on (instructions as the server sends)."""
    from fedpath.server.federated_run import initial_arrays

    cfg = RunConfig.from_run_config(run_config)
    arrays = initial_arrays(cfg, SPEC.feature_dim)
    instructions = {
        "server_round": server_round,
        "model": cfg.model_config_for(SPEC.feature_dim).model_dump(mode="json"),
        "train": cfg.train_config().model_dump(mode="json"),
        "start_epoch": server_round - 1,
        "dp": cfg.dp_config().model_dump(mode="json"),
        "run_key": "run-test",
    }
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "config": ConfigRecord({"instructions": json.dumps(instructions)}),
        }
    )
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


@pytest.mark.slow
def test_dp_train_reply_reports_epsilon_and_keeps_the_history_in_context_state(
    tmp_path: Path,
) -> None:
    from fedpath.client.privacy_ledger import LEDGER_FILE, STATE_KEY

    data = write_synthetic_site(tmp_path / "a", SPEC, seed=0)
    run = {"local-epochs": 1, "dp-noise-multiplier": 1.0, "dp-batch-slides": 2}
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"data-path": str(data), "site": "site_a", "privacy-budget": 100.0},
        state=RecordDict(),
        run_config={},
    )
    first = app(_dp_message(1, run), context)
    assert not first.has_error(), first.error
    metrics = dict(first.content.metric_records["metrics"])
    assert set(metrics) == set(TRAIN_METRICS)
    assert 0 < metrics["epsilon"] < 100 and metrics["delta"] == 1e-5
    assert metrics["budget-exhausted"] == 0.0
    assert STATE_KEY in context.state.config_records
    (data / LEDGER_FILE).unlink()  # the run's history is still in Context.state
    second = dict(app(_dp_message(2, run), context).content.metric_records["metrics"])
    assert second["epsilon"] > metrics["epsilon"]
    entries = json.loads((data / LEDGER_FILE).read_text())["datasets"]
    assert [e["round"] for d in entries.values() for e in d["entries"]] == [1, 2]


def test_a_bad_privacy_budget_in_the_node_config_is_an_error_reply(site: Path) -> None:
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"data-path": str(site), "site": "site_a", "privacy-budget": -2.0},
        state=RecordDict(),
        run_config={},
    )
    reply = app(_message(MessageType.TRAIN), context)
    assert reply.has_error() and "privacy-budget must be > 0" in reply.error.reason


def test_node_log_writes_fedpath_lines_to_stderr_unless_the_process_configured_its_own(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A ClientApp or worker process writes ``fedpath: <message>`` lines to stderr (the
    SuperNode's log); a process that set up the ``fedpath`` loggers gets each record once,
    in its own handlers; nothing stays configured afterwards."""
    import logging

    from fedpath.client.node_log import node_log

    client = logging.getLogger("fedpath.client")
    logger = logging.getLogger("fedpath.client.app")
    before = (list(client.handlers), client.level)
    with node_log():
        logger.info("site_a: train round 1 on cpu")
    assert capsys.readouterr().err == "fedpath: site_a: train round 1 on cpu\n"
    assert (client.handlers, client.level) == before

    seen: list[str] = []

    class Own(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    own, root = Own(), logging.getLogger("fedpath")
    root.addHandler(own)
    saved = root.level
    root.setLevel(logging.INFO)
    try:
        with node_log():
            logger.info("once")
    finally:
        root.removeHandler(own)
        root.setLevel(saved)
    assert seen == ["once"] and "once" not in capsys.readouterr().err


def test_error_reply_names_no_slide_and_logs_the_file(tmp_path: Path, capsys) -> None:
    """NaN in every feature bag fails the round with a redacted reason (it leaves the
    hospital); the SuperNode's log keeps the file under the same reference. (One bad bag alone
    is skipped and the round goes on: ``tests/test_bad_inputs.py``.)"""
    import h5py

    site = write_synthetic_site(tmp_path / "a", SPEC, seed=0)
    bags = sorted(site.rglob("*.h5"))
    first = bags[0]
    for bag in bags:
        with h5py.File(bag, "r+") as fh:
            fh["features"][0, 0] = np.nan
    reply = app(_message(MessageType.TRAIN), _context(site))
    assert reply.has_error()
    reason = reply.error.reason
    assert reason.startswith("site_a: ") and "NaN or Inf" in reason and "[ref " in reason
    assert first.stem not in reason and str(tmp_path) not in reason
    ref = reason.rsplit("[ref ", 1)[1].rstrip("]")
    logged = capsys.readouterr().err
    assert f"[ref {ref}]" in logged and first.name in logged


def test_torch_threads_caps_the_handlers_and_is_restored(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torch-threads`` holds while the handler runs (nodes sharing a machine) and no longer."""
    import torch

    import fedpath.client.federated as federated

    seen: list[int] = []
    real_train, real_evaluate = federated.train_on_site, federated.evaluate_on_site

    def spy(real: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            seen.append(torch.get_num_threads())
            return real(*args, **kwargs)

        return run

    monkeypatch.setattr(federated, "train_on_site", spy(real_train))
    monkeypatch.setattr(federated, "evaluate_on_site", spy(real_evaluate))
    before = torch.get_num_threads()
    config = {"data-path": str(site), "site": "site_a", "torch-threads": 1}
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        context = Context(
            run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={}
        )
        reply = app(_message(kind), context)
        assert not reply.has_error(), reply.error
    assert seen == [1, 1]
    assert torch.get_num_threads() == before
    seen.clear()
    reply = app(_message(MessageType.EVALUATE), _context(site))
    assert not reply.has_error() and seen == [before]


@pytest.mark.parametrize("bad", [0, -1, 2.5, "2", True])
def test_a_bad_torch_threads_is_an_error_reply_naming_the_key(site: Path, bad: object) -> None:
    config = {"data-path": str(site), "site": "site_a", "torch-threads": bad}
    context = Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})
    reply = app(_message(MessageType.TRAIN), context)
    assert reply.has_error() and "torch-threads must be a whole number" in reply.error.reason


FORWARDING_PROCESS = r'''
import os, sys, tempfile, threading
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpath.client.app import app as client_app
from fedpath.client import worker_client
from fedpath.client.worker_protocol import read_frame, records_to_wire, write_frame

data = Path(sys.argv[1])
path = worker_client.socket_path(data, os.getppid())
server = __import__("socket").socket(__import__("socket").AF_UNIX)
server.bind(str(path))
server.listen(1)


def fake_worker() -> None:
    """Answers like the resident worker, without importing anything the worker would."""
    conn, _ = server.accept()
    with conn:
        header, blobs = read_frame(conn)
        out: list[bytes] = []
        reply = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})})
        write_frame(
            conn,
            {"ok": True, "content": records_to_wire(reply, out),
             "state": records_to_wire(RecordDict(), out)},
            out,
        )


threading.Thread(target=fake_worker, daemon=True).start()
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
content = RecordDict(
    {
        "arrays": ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))}),
        "config": ConfigRecord({"instructions": "{}"}),
    }
)
context = Context(
    run_id=1,
    node_id=7,
    node_config={"data-path": str(data), "site": "a", "resident-worker": True},
    state=RecordDict(),
    run_config={},
)
reply = client_app(Message(content, dst_node_id=7, message_type=MessageType.TRAIN), context)
assert not reply.has_error(), reply.error
assert reply.content.array_records["arrays"]["w"].numpy().tolist() == [1.0, 1.0, 1.0]
heavy = sorted(
    m for m in sys.modules
    if m.split(".")[0] in {"torch", "sklearn", "scipy", "opacus", "h5py"}
    or m in {"fedpath.common.federation", "fedpath.client.federated", "fedpath.client.worker"}
)
print(" ".join(heavy))
'''


@pytest.mark.slow
def test_the_forwarding_message_process_imports_no_torch_nor_the_handlers(
    tmp_path: Path,
) -> None:
    """With the resident worker, Flower's per-message process only forwards: importing torch,
    scikit-learn, h5py or even the message schema's pydantic models there costs every message
    of every round, for nothing the forwarding needs."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    runtime = Path(tempfile.mkdtemp(prefix="fw"))  # Unix socket paths: ~100 bytes at most
    try:
        env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
        done = subprocess.run(
            [sys.executable, "-c", FORWARDING_PROCESS, str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"the forwarding process imported {done.stdout.strip()}"


def test_a_site_whose_training_diverges_replies_an_error_not_nan_weights(site: Path) -> None:
    """NaN weights averaged in would make every site's global model NaN; the site says why."""
    message = _message(MessageType.TRAIN)
    config = message.content.config_records["config"]
    instructions = json.loads(str(config["instructions"]))
    instructions["train"]["lr"] = 1e30
    config["instructions"] = json.dumps(instructions)
    reply = app(message, _context(site))
    assert reply.has_error(), "a diverged site sent its weights"
    assert reply.error.reason.startswith("site_a: training diverged in epoch 0")
    assert "lower the learning rate (lr = 1e+30)" in reply.error.reason


def test_an_error_reply_keeps_words_that_are_not_paths(tmp_path: Path) -> None:
    """The redaction turned every slash into a file: the coordinator read "δ = 0.5 is not
    below 1<file> = 1<file> …"; 1/N stays readable, a path (relative ones whole) does not."""
    data = write_synthetic_site(tmp_path / "a", SPEC, seed=0)
    node_config = {"data-path": str(data), "site": "site_a", "privacy-delta": 0.5}
    context = Context(1, 7, node_config, RecordDict(), {})
    run = {"local-epochs": 1, "dp-noise-multiplier": 1.0, "dp-batch-slides": 2}
    reply = app(_dp_message(1, run), context)
    assert reply.has_error()
    assert reply.error.reason.startswith("site_a: δ = 0.5 is not below 1/N = 1/6 for this site")
    assert "<file>" not in reply.error.reason
    (data / "prepared.csv").write_text("slide_id,label\n", encoding="utf-8")
    reply = app(_message(MessageType.TRAIN), _context(data))
    assert reply.has_error() and str(data) not in reply.error.reason
    assert "<file>" in reply.error.reason and "file>/" not in reply.error.reason


def test_a_global_model_with_nan_weights_is_named_as_such(site: Path) -> None:
    """Trained on, NaN weights came back as "training diverged in epoch N" at a site that
    did nothing wrong; the reply now says the model arrived that way."""
    message = _message(MessageType.TRAIN)
    arrays = message.content.array_records["arrays"]
    key = next(k for k, v in arrays.items() if v.numpy().dtype == np.float32)
    poisoned = arrays[key].numpy().copy()
    poisoned.flat[0] = np.nan
    arrays[key] = Array(poisoned)
    reply = app(message, _context(site))
    assert reply.has_error()
    assert reply.error.reason.startswith(
        "site_a: the model to train already holds NaN or Inf weights"
    ), reply.error.reason
