"""Data egress (issue 7.4): a site's replies hold parameters and allow-listed aggregates only.

A 2-round run of the real round loop and the real ClientApp handlers (``deploy/inprocess_grid.py``
delivers every message to ``fedpath.client.app.app`` in process) over two synthetic prepared sites;
every reply a site produces is recorded at the ClientApp boundary and judged by
``tests/egress.py``: records by name and type, arrays exactly the model's parameters (names,
shapes, dtypes), metrics from the allow-list and scalar, facts only the documented keys, and
no slide id, patient id, feature file name or data path anywhere in the reply's serialised
bytes. The negative tests make a handler leak (an extra metric, a slide list in the facts, a
coordinates array) past the client's own guard and show the checker catches each.

The same checker judges the raw bytes a real SuperNode sends through the reverse proxy in
``tests/test_reverse_proxy.py`` (the deployment form of this test).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import fedpath.client.app as client_app
from fedpath.deploy.inprocess_grid import InProcessGrid, InProcessSite
from fedpath.server.config import RunConfig
from fedpath.server.federated_run import initial_arrays, run_federated
from fedpath.synthetic.site import SyntheticSiteSpec
from tests.egress import EgressPolicy, EgressReport, check_reply, write_identifiable_site

pytestmark = pytest.mark.usefixtures("flower_task")

SPEC = SyntheticSiteSpec(n_slides=10, feature_dim=16, patches=(10, 30))
LABELS = ("normal", "tumour")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("egress")
    return {
        f"site_{n}": write_identifiable_site(root / f"hospital-{n}-private-data", SPEC, seed=i)
        for i, n in enumerate("ab")
    }


def _cfg(tmp_path: Path) -> RunConfig:
    return RunConfig.from_run_config(
        {
            "num-server-rounds": 2,
            "local-epochs": 1,
            "runs-dir": str(tmp_path / "runs"),
            "run-name": "egress",
            "connect-timeout": 1.0,
        }
    )


def _policy(sites: dict[str, Path], cfg: RunConfig) -> EgressPolicy:
    return EgressPolicy.for_run(initial_arrays(cfg, SPEC.feature_dim), sites.values(), LABELS)


class Recorder:
    """Stands in for ``fedpath.client.app.app``: every reply the real ClientApp returns is kept."""

    def __init__(self, app: Callable[[Message, Context], Message]) -> None:
        self.app = app
        self.replies: list[Message] = []

    def __call__(self, message: Message, context: Context) -> Message:
        reply = self.app(message, context)
        self.replies.append(reply)
        return reply


def _judge(replies: list[Message], policy: EgressPolicy) -> EgressReport:
    report = EgressReport()
    for reply in replies:
        report.add(check_reply(reply, policy))
    return report


def test_policy_names_every_identifying_string_of_the_manifests(sites: dict[str, Path]) -> None:
    """The checker is only as good as its list: slide ids, patient ids, files, paths."""
    policy = _policy(sites, _cfg(Path("/unused")))
    for site in sites.values():
        assert str(site.resolve()) in policy.forbidden
        rows = list(csv.DictReader((site / "prepared.csv").open(encoding="utf-8")))
        for row in rows:
            assert {row["slide_id"], row["patient_id"], row["features"]} <= set(policy.forbidden)
            assert Path(row["features"]).name in policy.forbidden


@pytest.mark.slow
def test_a_two_round_run_sends_only_parameters_and_allow_listed_aggregates(
    sites: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(client_app.app)
    monkeypatch.setattr(client_app, "app", recorder)  # InProcessGrid imports it per message
    grid = InProcessGrid({10 + i: InProcessSite(p, s) for i, (s, p) in enumerate(sites.items())})
    cfg = _cfg(tmp_path)
    run_dir = run_federated(grid, cfg, flwr_run_id=1)
    assert json.loads((run_dir / "final.json").read_text())["status"] == "completed"

    assert recorder.replies and len(recorder.replies) == len(grid.replies)
    assert not any(r.has_error() for r in recorder.replies), [
        r.error.reason for r in recorder.replies if r.has_error()
    ]
    report = _judge(recorder.replies, _policy(sites, cfg))
    assert report.violations == []
    # Not vacuous: the gate's query, two rounds of train + evaluate, the final test evaluate.
    assert report.replies[MessageType.QUERY] == 2
    assert report.replies[MessageType.TRAIN] == 2 * 2
    assert report.replies[MessageType.EVALUATE] >= 2 * 2 + 2
    assert report.bytes_checked > 1000
    # The pooled metrics' sums were among what was judged (issue 20.16/20.17).
    evaluated = [
        dict(r.content.metric_records["metrics"])
        for r in recorder.replies
        if r.metadata.message_type == MessageType.EVALUATE
    ]
    assert all(len(m["slide-hist-pos"]) == 202 and len(m["nll-grid"]) == 81 for m in evaluated)
    assert any(sum(m["patch-hist-tumour"]) > 0 for m in evaluated)


# -- the checker catches a leak ---------------------------------------------------------------


def _train_message(cfg: RunConfig) -> Message:
    arrays = initial_arrays(cfg, SPEC.feature_dim)
    instructions = {
        "server_round": 1,
        "model": cfg.model_config_for(SPEC.feature_dim).model_dump(mode="json"),
        "train": cfg.train_config().model_dump(mode="json"),
    }
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "config": ConfigRecord({"instructions": json.dumps(instructions)}),
        }
    )
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def _context(site: Path) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"data-path": str(site), "site": "site_a"},
        state=RecordDict(),
        run_config={},
    )


def _without_client_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """A careless change: the ClientApp forwards whatever metrics it is given."""
    monkeypatch.setattr(client_app, "check_reply_metrics", lambda metrics, allowed: metrics)


def _first_slide(site: Path) -> dict[str, str]:
    return next(csv.DictReader((site / "prepared.csv").open(encoding="utf-8")))


def test_an_extra_metric_is_caught(sites: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import fedpath.client.federated

    site = sites["site_a"]
    slide = _first_slide(site)["slide_id"]
    real = fedpath.client.federated.train_on_site

    def leaky(*args: Any, **kwargs: Any) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        weights, metrics = real(*args, **kwargs)
        return weights, {**metrics, f"score-{slide}": 0.93}

    monkeypatch.setattr(fedpath.client.federated, "train_on_site", leaky)
    _without_client_guard(monkeypatch)
    cfg = _cfg(Path("/unused"))
    reply = client_app.app(_train_message(cfg), _context(site))
    assert not reply.has_error(), reply.error
    violations = check_reply(reply, _policy(sites, cfg)).violations
    assert f"train reply: metric 'score-{slide}' is not allow-listed for train" in violations
    assert f"train reply: contains {slide!r}" in violations


def test_the_client_guard_alone_also_refuses_the_extra_metric(
    sites: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the careless change, the same leak never becomes a reply at all."""
    import fedpath.client.federated

    real = fedpath.client.federated.train_on_site
    monkeypatch.setattr(
        fedpath.client.federated,
        "train_on_site",
        lambda *a, **k: (real(*a, **k)[0], {**real(*a, **k)[1], "per-slide": 0.5}),
    )
    reply = client_app.app(_train_message(_cfg(Path("/unused"))), _context(sites["site_a"]))
    assert reply.has_error() and "outside the allow-list" in reply.error.reason


def test_slide_ids_in_the_facts_are_caught(
    sites: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedpath.client.site_facts

    site = sites["site_a"]
    real = fedpath.client.site_facts.site_facts
    slide = _first_slide(site)

    def leaky(data_dir: Path, name: str) -> dict[str, Any]:
        facts = real(data_dir, name)
        facts["slides"]["ids"] = [slide["slide_id"]]
        facts["source"] = slide["features"]
        return facts

    monkeypatch.setattr(fedpath.client.site_facts, "site_facts", leaky)
    query = Message(RecordDict({}), dst_node_id=7, message_type=MessageType.QUERY)
    reply = client_app.app(query, _context(site))
    violations = check_reply(reply, _policy(sites, _cfg(Path("/unused")))).violations
    assert "query reply: facts key 'source' is not documented" in violations
    assert "query reply: facts.slides.ids is not a count" in violations
    assert f"query reply: contains {slide['features']!r}" in violations


def test_a_coordinates_array_and_a_reshaped_parameter_are_caught(
    sites: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedpath.client.federated

    real = fedpath.client.federated.train_on_site

    def leaky(*args: Any, **kwargs: Any) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        weights, metrics = real(*args, **kwargs)
        matrix = next(k for k in sorted(weights) if weights[k].ndim == 2)
        weights = {**weights, matrix: weights[matrix].T.copy()}
        weights["coords"] = np.arange(20, dtype=np.int64).reshape(10, 2) * 256
        return weights, metrics

    monkeypatch.setattr(fedpath.client.federated, "train_on_site", leaky)
    cfg = _cfg(Path("/unused"))
    policy = _policy(sites, cfg)
    reply = client_app.app(_train_message(cfg), _context(sites["site_a"]))
    violations = check_reply(reply, policy).violations
    assert "train reply: array 'coords' is not a model parameter" in violations
    assert "train reply: arrays are not exactly the model's parameters" in violations
    matrix = next(k for k in sorted(policy.parameters) if len(policy.parameters[k][0]) == 2)
    assert any(v.startswith(f"train reply: array {matrix!r} is float32[") for v in violations)


def test_an_error_reply_naming_a_file_is_caught(sites: dict[str, Path]) -> None:
    """Error reasons leave the site too: the checker greps them like any content."""
    from flwr.app import Error

    site = sites["site_a"]
    leak = str(site.resolve() / _first_slide(site)["features"])
    request = Message(RecordDict({}), dst_node_id=7, message_type=MessageType.TRAIN)
    reply = Message(Error(code=1, reason=f"site_a: {leak} is truncated"), reply_to=request)
    violations = check_reply(reply, _policy(sites, _cfg(Path("/unused")))).violations
    assert f"train reply: contains {leak!r}" in violations


def test_a_skipped_slide_leaves_the_site_as_a_count_only(tmp_path: Path) -> None:
    """A bad bag is skipped on the site; the reply says how many, never which or why."""
    import h5py

    site = write_identifiable_site(tmp_path / "hospital-c-private-data", SPEC, seed=2)
    train = next(
        r
        for r in csv.DictReader((site / "prepared.csv").open(encoding="utf-8"))
        if r["split"] == "train"
    )
    with h5py.File(site / train["features"], "r+") as fh:
        fh["features"][0, 0] = np.nan
    cfg = _cfg(tmp_path)
    policy = EgressPolicy.for_run(initial_arrays(cfg, SPEC.feature_dim), [site], LABELS)
    reply = client_app.app(_train_message(cfg), _context(site))
    assert not reply.has_error(), reply.error.reason
    assert dict(reply.content.metric_records["metrics"])["skipped-slides"] == 1.0
    report = check_reply(reply, policy)
    assert report.violations == [] and report.replies == {"train": 1}
    assert train["slide_id"] in policy.forbidden  # the grep would have seen it


def test_a_count_with_a_fraction_is_caught(
    sites: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts are whole: digits after the point could carry anything (here, an id's code)."""
    import fedpath.client.federated

    real = fedpath.client.federated.train_on_site

    def leaky(*args: Any, **kwargs: Any) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        weights, metrics = real(*args, **kwargs)
        return weights, {**metrics, "skipped-slides": 1.0417, "num-examples": -1.0}

    monkeypatch.setattr(fedpath.client.federated, "train_on_site", leaky)
    cfg = _cfg(Path("/unused"))
    reply = client_app.app(_train_message(cfg), _context(sites["site_a"]))
    violations = check_reply(reply, _policy(sites, cfg)).violations
    assert "train reply: metric 'skipped-slides' is not a slide count (1.0417)" in violations
    assert "train reply: metric 'num-examples' is not a slide count (-1.0)" in violations


def _evaluate_message(cfg: RunConfig) -> Message:
    message = _train_message(cfg)
    instructions = json.loads(str(message.content.config_records["config"]["instructions"]))
    content = RecordDict(
        {
            "arrays": message.content.array_records["arrays"],
            "config": ConfigRecord(
                {"instructions": json.dumps({**instructions, "eval_split": "test"})}
            ),
        }
    )
    return Message(content, dst_node_id=7, message_type=MessageType.EVALUATE)


def test_per_slide_scores_dressed_as_a_histogram_are_caught(
    sites: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The aggregate lists have fixed lengths and hold whole counts: a list of per-slide
    probabilities under an allowed name, or a new list, cannot pass (issue 20.16)."""
    import fedpath.client.federated

    real = fedpath.client.federated.evaluate_on_site

    def leaky(*args: Any, **kwargs: Any) -> dict[str, Any]:
        metrics = real(*args, **kwargs)
        return {**metrics, "slide-hist-pos": [0.91, 0.12, 0.55], "slide-scores": [0.9, 0.1]}

    monkeypatch.setattr(fedpath.client.federated, "evaluate_on_site", leaky)
    cfg = _cfg(Path("/unused"))
    guarded = client_app.app(_evaluate_message(cfg), _context(sites["site_a"]))
    assert guarded.has_error() and "outside the allow-list" in guarded.error.reason

    _without_client_guard(monkeypatch)
    reply = client_app.app(_evaluate_message(cfg), _context(sites["site_a"]))
    assert not reply.has_error(), reply.error
    violations = check_reply(reply, _policy(sites, cfg)).violations
    assert "evaluate reply: metric 'slide-scores' is not allow-listed for evaluate" in violations
    assert "evaluate reply: metric 'slide-hist-pos' has 3 entries, not the fixed 202" in violations


def test_a_histogram_of_the_right_length_must_still_hold_whole_counts(
    sites: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedpath.client.federated

    real = fedpath.client.federated.evaluate_on_site

    def leaky(*args: Any, **kwargs: Any) -> dict[str, Any]:
        metrics = real(*args, **kwargs)
        hist = [0.0] * 2002
        hist[:3] = [0.913, 0.127, 0.5]  # three slides' scores in the first bins
        return {**metrics, "patch-hist-normal": hist, "nll-grid": [-1.0] * 81}

    monkeypatch.setattr(fedpath.client.federated, "evaluate_on_site", leaky)
    cfg = _cfg(Path("/unused"))
    guarded = client_app.app(_evaluate_message(cfg), _context(sites["site_a"]))
    assert guarded.has_error() and "must hold" in guarded.error.reason
    _without_client_guard(monkeypatch)
    reply = client_app.app(_evaluate_message(cfg), _context(sites["site_a"]))
    violations = check_reply(reply, _policy(sites, cfg)).violations
    assert "evaluate reply: metric 'patch-hist-normal' holds 0.913, not a whole count" in violations
    assert (
        "evaluate reply: metric 'nll-grid' holds -1.0, not a finite non-negative number"
        in violations
    )


# -- the wire checker (what tests/test_reverse_proxy.py runs on nginx's captured bodies) ------


def _wire(reply: Message) -> list[tuple[str, bytes]]:
    """The Fleet request bodies a SuperNode sends for ``reply``: PushMessages, then PushObject."""
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
    )

    tree = get_object_tree(reply)
    objects = get_all_nested_objects(reply)
    head = PushMessagesRequest(
        messages_list=[message_to_proto(remove_content_from_message(reply))],
        message_object_trees=[tree],
    )
    bodies = [("/v1/fleet/push-messages", head.SerializeToString())]
    for object_id, obj in objects.items():
        request = PushObjectRequest(object_id=object_id, object_content=obj.deflate())
        bodies.append(("/v1/fleet/push-object", request.SerializeToString()))
    return bodies


def test_the_wire_checker_passes_a_real_reply_and_catches_a_leaky_one(
    sites: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedpath.client.federated
    from tests.egress import check_fleet_requests

    site = sites["site_a"]
    cfg = _cfg(Path("/unused"))
    policy = _policy(sites, cfg)
    clean = client_app.app(_train_message(cfg), _context(site))
    report = check_fleet_requests(_wire(clean), policy)
    assert report.violations == [] and report.replies == {"train": 1}
    assert report.objects == len(_wire(clean)) - 1

    slide = _first_slide(site)["slide_id"]
    real = fedpath.client.federated.train_on_site

    def leaky(*args: Any, **kwargs: Any) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        weights, metrics = real(*args, **kwargs)
        weights["coords"] = np.arange(20, dtype=np.int64).reshape(10, 2) * 256
        return weights, {**metrics, f"score-{slide}": 0.93}

    monkeypatch.setattr(fedpath.client.federated, "train_on_site", leaky)
    _without_client_guard(monkeypatch)
    reply = client_app.app(_train_message(cfg), _context(site))
    violations = check_fleet_requests(_wire(reply), policy).violations
    assert any(f"contains {slide!r}" in v for v in violations)
    assert any(f"metric 'score-{slide}' is not allow-listed" in v for v in violations)
    assert any("array 'coords' is not a model parameter" in v for v in violations)
    assert any("ArrayRecord" in v and "coords" in v for v in violations)
