"""What may leave a hospital, as a checker the data-egress tests run over a site's messages.

Issue 7 asks for proof that a site sends model parameters and an allow-list of aggregate
numbers, nothing else: no slide ids, file names, coordinates, per-slide scores or features.
The checker below is deliberately independent of the code it checks (``client/app.py`` has its
own guard, ``check_reply_metrics``): it re-derives the rules from the protocol constants and
the documented facts keys, and judges two forms of a reply:

* a ``Message`` as the ClientApp returned it (``check_reply``), walking the RecordDict and
  grepping its serialised bytes (Flower's protobuf serde and the deflated objects the SuperNode
  actually pushes) for every identifying string of the site's manifest;
* the raw bodies a SuperNode POSTed to the Fleet API (``check_fleet_requests``), e.g. captured
  by the reverse proxy in ``tests/test_reverse_proxy.py``: every pushed object is typed and
  checked against the message it belongs to, and every byte is grepped.

Violations are returned as strings (not raised) so a negative test can show which rule fired.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord

from fedpath.common.federation import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVALUATE_METRICS,
    FACTS_FIELD,
    METRICS_KEY,
    TRAIN_METRICS,
)
from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site

FACTS_KEYS = frozenset(
    {
        "site",
        "fedpath_version",
        "encoder",
        "encoder_sha256",
        "feature_dim",
        "target_mpp",
        "patch_size",
        "labels",
        "slides",
    }
)
"""The harmonisation facts ``client/site_facts.py`` documents: aggregate, no slide ids."""
SLIDE_COUNT_KEYS = frozenset({"usable", "by_label", "with_patch_labels"})

LAYOUT: dict[str, dict[str, type]] = {
    MessageType.TRAIN: {ARRAYS_KEY: ArrayRecord, METRICS_KEY: MetricRecord},
    MessageType.EVALUATE: {METRICS_KEY: MetricRecord},
    MessageType.QUERY: {CONFIG_KEY: ConfigRecord},
}
"""The records each reply type may carry, by name and type."""
METRICS_OF: dict[str, tuple[str, ...]] = {
    MessageType.TRAIN: TRAIN_METRICS,
    MessageType.EVALUATE: EVALUATE_METRICS,
}
COUNT_METRICS = frozenset({"num-examples", "skipped-slides"})
"""Metrics that are slide counts: whole and non-negative, so their fraction digits cannot
carry anything else (e.g. an encoded slide id). Written out here, not imported."""
SCORE_BINS, PATCH_BINS, GRID_TEMPERATURES, CALIBRATION_BINS = 202, 2002, 81, 10
"""The fixed lengths of the evaluate reply's aggregate lists (issue 20.16/20.17): 200 slide
log-odds bins of width 0.1 on [-10, 10] plus two open ends, 2000 patch bins of width 0.01 plus
two, 81 grid temperatures, 10 ECE bins."""
COUNT_LIST_METRICS: dict[str, int | str] = {
    "slide-hist-pos": SCORE_BINS,
    "slide-hist-neg": SCORE_BINS,
    "patch-hist-tumour": PATCH_BINS,
    "patch-hist-normal": PATCH_BINS,
    "ece-count": CALIBRATION_BINS,
    "ece-events": CALIBRATION_BINS,
    "class-counts": "labels",
    "confusion": "labels²",
}
"""Evaluate metrics that are lists of whole non-negative counts, by length. A fixed length that
does not depend on the data means a list cannot grow to one entry per slide or patch."""
SUM_LIST_METRICS: dict[str, int] = {"nll-grid": GRID_TEMPERATURES, "ece-prob-sum": CALIBRATION_BINS}
"""Evaluate metrics that are lists of finite non-negative sums over slides, by length."""


@dataclass(frozen=True)
class EgressPolicy:
    """The model a reply may carry and the strings that must never appear in one."""

    parameters: Mapping[str, tuple[tuple[int, ...], str]]
    """Parameter name → (shape, dtype) of the run's model."""
    forbidden: tuple[str, ...]
    """Slide ids, patient ids, feature file names and paths, the site's data directory."""
    labels: tuple[str, ...] = ("normal", "tumour")

    @classmethod
    def for_run(
        cls, arrays: Mapping[str, Any], site_dirs: Iterable[Path], labels: tuple[str, ...]
    ) -> EgressPolicy:
        """Parameters from the model the server sends; forbidden strings from each manifest."""
        parameters = {k: (tuple(v.shape), str(v.dtype)) for k, v in arrays.items()}
        return cls(parameters, tuple(sorted(manifest_strings(site_dirs))), labels)


def manifest_strings(site_dirs: Iterable[Path]) -> set[str]:
    """Every identifying string of the prepared sites: what a leak would most likely carry."""
    out: set[str] = set()
    for site in site_dirs:
        site = Path(site).resolve()
        out.add(str(site))
        with (site / "prepared.csv").open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                for column in ("slide_id", "patient_id"):
                    if row.get(column):
                        out.add(row[column])
                if row.get("features"):
                    rel = Path(row["features"])
                    out.update({row["features"], rel.name, str(site / rel)})
    return {s for s in out if len(s) >= 6}  # shorter strings match by chance in float bytes


def write_identifiable_site(root: Path, spec: SyntheticSiteSpec, seed: int) -> Path:
    """A synthetic prepared site whose manifest carries patient ids too (more to leak)."""
    site = write_synthetic_site(root, spec, seed=seed)
    index = site / "prepared.csv"
    with index.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for i, row in enumerate(rows):
        row["patient_id"] = f"PATIENT-{root.name}-{i:04d}"
    with index.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return site


@dataclass
class EgressReport:
    """What the checker saw: violations, and how many replies of each type it judged."""

    violations: list[str] = field(default_factory=list)
    replies: dict[str, int] = field(default_factory=dict)
    objects: int = 0
    bytes_checked: int = 0

    def add(self, other: EgressReport) -> None:
        self.violations += other.violations
        for key, n in other.replies.items():
            self.replies[key] = self.replies.get(key, 0) + n
        self.objects += other.objects
        self.bytes_checked += other.bytes_checked


def _grep(blob: bytes, policy: EgressPolicy, where: str) -> list[str]:
    return [f"{where}: contains {s!r}" for s in policy.forbidden if s.encode() in blob]


def _list_violation(key: str, value: Any, n_labels: int) -> str | None:
    """Why an aggregate list metric is not one, or ``None``."""
    want = COUNT_LIST_METRICS.get(key, SUM_LIST_METRICS.get(key))
    length = {"labels": n_labels, "labels²": n_labels * n_labels}.get(str(want), want)
    if not isinstance(value, list):
        return f"is not a list of {'counts' if key in COUNT_LIST_METRICS else 'sums'}"
    if len(value) != length:
        return f"has {len(value)} entries, not the fixed {length}"
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float) or not (v >= 0 and v < 1e300):
            return f"holds {v!r}, not a finite non-negative number"
        if key in COUNT_LIST_METRICS and not float(v).is_integer():
            return f"holds {v!r}, not a whole count"
    return None


def _check_metrics(
    values: Mapping[str, Any], kind: str, where: str, n_labels: int = 2
) -> list[str]:
    allowed = METRICS_OF.get(kind, ())
    out = [
        f"{where}: metric {k!r} is not allow-listed for {kind}" for k in values if k not in allowed
    ]
    for key, value in values.items():
        if kind == MessageType.EVALUATE and (key in COUNT_LIST_METRICS or key in SUM_LIST_METRICS):
            problem = _list_violation(key, value, n_labels)
            if problem is not None:
                out.append(f"{where}: metric {key!r} {problem}")
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            out.append(f"{where}: metric {key!r} is not a scalar ({type(value).__name__})")
        elif key in COUNT_METRICS and not (value >= 0 and float(value).is_integer()):
            out.append(f"{where}: metric {key!r} is not a slide count ({value!r})")
    return out


def _check_facts(record: Mapping[str, Any], policy: EgressPolicy, where: str) -> list[str]:
    if set(record) != {FACTS_FIELD}:
        return [f"{where}: config keys {sorted(record)} are not just {FACTS_FIELD!r}"]
    try:
        facts = json.loads(record[FACTS_FIELD])
    except (TypeError, json.JSONDecodeError):
        return [f"{where}: facts are not a JSON string"]
    if not isinstance(facts, dict):
        return [f"{where}: facts are not a JSON object"]
    out = [f"{where}: facts key {k!r} is not documented" for k in facts if k not in FACTS_KEYS]
    slides = facts.get("slides")
    if not isinstance(slides, dict):
        return [*out, f"{where}: facts.slides is not an object of counts"]
    out += [
        f"{where}: facts.slides.{k} is not a count" for k in slides if k not in SLIDE_COUNT_KEYS
    ]
    by_label = slides.get("by_label", {})
    if not isinstance(by_label, dict):
        return [*out, f"{where}: facts.slides.by_label is not an object"]
    for label, count in by_label.items():
        if label not in policy.labels or not isinstance(count, int):
            out.append(f"{where}: facts.slides.by_label[{label!r}] is not a label count")
    for key in ("usable", "with_patch_labels"):
        if key in slides and not isinstance(slides[key], int):
            out.append(f"{where}: facts.slides.{key} is not an integer")
    return out


def _check_array(
    name: str, dtype: str, shape: tuple[int, ...], stype: str, policy: EgressPolicy, where: str
) -> list[str]:
    if name not in policy.parameters:
        return [f"{where}: array {name!r} is not a model parameter"]
    want_shape, want_dtype = policy.parameters[name]
    out = []
    if tuple(shape) != want_shape or dtype != want_dtype:
        out.append(
            f"{where}: array {name!r} is {dtype}{list(shape)}, the model's is "
            f"{want_dtype}{list(want_shape)}"
        )
    if stype != "numpy.ndarray":
        out.append(f"{where}: array {name!r} has serialisation {stype!r}")
    return out


def _serialised(message: Message) -> bytes:
    """The reply as bytes: Flower's protobuf serde plus every deflated object it pushes."""
    from flwr.common.serde import message_to_proto
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    parts = [message_to_proto(message).SerializeToString()]
    parts += [obj.deflate() for obj in get_all_nested_objects(message).values()]
    return b"".join(parts)


def check_reply(message: Message, policy: EgressPolicy) -> EgressReport:
    """Judge one reply a site's ClientApp produced."""
    kind = message.metadata.message_type
    where = f"{kind} reply"
    report = EgressReport(replies={kind: 1})
    blob = _serialised(message)
    report.bytes_checked = len(blob)
    report.violations += _grep(blob, policy, where)
    if message.has_error():
        return report  # the reason was grepped; an error reply has no content
    layout = LAYOUT.get(kind)
    if layout is None:
        report.violations.append(f"{where}: a site never replies to this message type")
        return report
    content = message.content
    if set(content) != set(layout):
        report.violations.append(f"{where}: records {sorted(content)} are not {sorted(layout)}")
    for name, record in content.items():
        if name in layout and not isinstance(record, layout[name]):
            report.violations.append(f"{where}: record {name!r} is a {type(record).__name__}")
            continue
        if isinstance(record, ArrayRecord):
            if set(record) != set(policy.parameters):
                report.violations.append(f"{where}: arrays are not exactly the model's parameters")
            for key, array in record.items():
                report.violations += _check_array(
                    key, array.dtype, tuple(array.shape), array.stype, policy, where
                )
        elif isinstance(record, MetricRecord):
            report.violations += _check_metrics(dict(record), kind, where, len(policy.labels))
        elif isinstance(record, ConfigRecord):
            report.violations += _check_facts(dict(record), policy, where)
    return report


# -- the wire: bodies a SuperNode POSTed to the Fleet API --------------------------------------


def _walk(tree: Any, kind: str, types: dict[str, str], parents: dict[str, str]) -> None:
    types[tree.object_id] = kind
    for child in tree.children:
        parents[child.object_id] = tree.object_id
        _walk(child, kind, types, parents)


def check_fleet_requests(
    requests: Iterable[tuple[str, bytes]],
    policy: EgressPolicy,
) -> EgressReport:
    """Judge everything a SuperNode sent: ``(Fleet path, request body)`` pairs.

    PushMessages carries each reply's metadata (no content) and its object tree; PushObject
    carries the objects the SuperLink asked for (content-addressed: an object it already holds,
    e.g. an unchanged array it sent itself, is not pushed again). Every object is typed by its
    header and checked against the reply type whose tree names it.
    """
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.supercore.inflatable.inflatable_object import (
        get_object_head_values_from_object_content,
        get_object_id,
    )

    report = EgressReport()
    kind_of: dict[str, str] = {}
    parents: dict[str, str] = {}
    pushed: dict[str, bytes] = {}
    for path, body in requests:
        report.bytes_checked += len(body)
        report.violations += _grep(body, policy, path)
        if path.endswith("/push-messages"):
            request = PushMessagesRequest.FromString(body)
            for proto, tree in zip(
                request.messages_list, request.message_object_trees, strict=True
            ):
                kind = proto.metadata.message_type
                report.replies[kind] = report.replies.get(kind, 0) + 1
                if proto.HasField("content") and len(proto.content.items):
                    report.violations.append(f"{path}: content sent inline, not as objects")
                if proto.HasField("error"):
                    report.replies["error"] = report.replies.get("error", 0) + 1
                _walk(tree, kind, kind_of, parents)
        elif path.endswith("/push-object"):
            request = PushObjectRequest.FromString(body)
            if get_object_id(request.object_content) != request.object_id:
                report.violations.append(f"{path}: object id does not match its content")
            pushed[request.object_id] = request.object_content
    array_names: dict[str, str] = {}  # Array object id → its name in a pushed ArrayRecord
    for content in pushed.values():
        obj_type, _, _ = get_object_head_values_from_object_content(content)
        if obj_type == "ArrayRecord":
            array_names.update({v: k for k, v in json.loads(_body(content)).items()})
    for object_id, content in pushed.items():
        report.objects += 1
        kind = kind_of.get(object_id)
        if kind is None:
            report.violations.append(f"object {object_id[:12]}: belongs to no pushed reply")
            continue
        obj_type, _, _ = get_object_head_values_from_object_content(content)
        where = f"{kind} reply {obj_type} {object_id[:12]}"
        report.violations += _check_object(
            obj_type, content, kind, where, policy, array_names.get(object_id), ProtoMessage
        )
    return report


def _body(content: bytes) -> bytes:
    """An inflatable object is ``TYPE CHILDREN LEN\\x00BODY``."""
    return content.split(b"\x00", 1)[1]


def _check_object(
    obj_type: str,
    content: bytes,
    kind: str,
    where: str,
    policy: EgressPolicy,
    array_name: str | None,
    proto_message: Any,
) -> list[str]:
    """One pushed object against the rules of the reply type it belongs to."""
    layout = LAYOUT.get(kind, {})
    body = _body(content)
    if obj_type == "Message":
        proto = proto_message.FromString(body)
        return [] if proto.metadata.message_type == kind else [f"{where}: type mismatch"]
    if obj_type == "RecordDict":
        names = set(json.loads(body))
        return [] if names == set(layout) else [f"{where}: records {sorted(names)}"]
    if obj_type == "ArrayRecord":
        if kind != MessageType.TRAIN:
            return [f"{where}: arrays in a {kind} reply"]
        names = set(json.loads(body))
        return [] if names == set(policy.parameters) else [f"{where}: arrays {sorted(names)}"]
    if obj_type == "Array":
        meta = json.loads(body)
        shape, dtype, stype = tuple(meta["shape"]), str(meta["dtype"]), str(meta["stype"])
        if array_name is not None:
            return _check_array(array_name, dtype, shape, stype, policy, where)
        # The SuperLink already held this array's record: it must still look like a parameter.
        if (shape, dtype) not in set(policy.parameters.values()):
            return [f"{where}: {dtype}{list(shape)} is no parameter's shape and dtype"]
        return [] if stype == "numpy.ndarray" else [f"{where}: serialisation {stype!r}"]
    if obj_type == "ArrayChunk":
        return [] if kind == MessageType.TRAIN else [f"{where}: array data in a {kind} reply"]
    if obj_type == "MetricRecord":
        return _check_metrics(dict(MetricRecord.inflate(content)), kind, where, len(policy.labels))
    if obj_type == "ConfigRecord":
        return _check_facts(dict(ConfigRecord.inflate(content)), policy, where)
    return [f"{where}: unexpected object type"]
