"""The federated round loop: harmonisation gate, bounded rounds, checkpoints, final test.

Flower's ``Strategy.start`` waits forever for nodes and aggregates whatever arrives; a hospital
network needs more: every wait is bounded (``connect-timeout``, ``round-timeout``), a round is
aggregated only when at least ``min-fit-fraction`` of the asked sites answered (otherwise it is
tried again, at most ``max-round-attempts`` times), a site that failed is logged and asked again
next round, a site that connects late is gated like the others before it may train, and after
every round the global model, round number and strategy state are checkpointed so
``resume`` continues to the same final round.

Only the ``Grid`` is used to talk to sites, so the loop runs unchanged on a real SuperLink, in
Flower's simulation engine, or against an in-process grid in tests. What happens is logged on
this module's logger; the ServerApp forwards it to Flower's log (:mod:`fedpath.server.app`).

The "global" numbers of a round and of the final test are pooled over every site's slides and
patches from the counts the sites send (:mod:`server.pooled`), not means of site metrics. Before
the final test the federated model is calibrated from the sites' validation sums (temperature
from the summed NLL grid, threshold from the summed score histograms), and the test is scored
with that calibration; ``final.json`` records it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpath.common.calibration import SlideCalibration
from fedpath.common.dp_config import PRIVACY_UNIT
from fedpath.common.errors import FedpathError
from fedpath.common.federation import (
    ARRAYS_KEY,
    BUDGET_EXHAUSTED_METRIC,
    CONFIG_KEY,
    EVALUATE_METRICS,
    FACTS_FIELD,
    INSTRUCTIONS_FIELD,
    WEIGHT_METRIC,
    RoundInstructions,
    check_reply_metrics,
)
from fedpath.server.checkpoints import Checkpoint, save_checkpoint
from fedpath.server.config import RunConfig
from fedpath.server.harmonise import HARMONISED_FIELDS, SiteFacts, check_harmonised
from fedpath.server.pooled import PooledCounts
from fedpath.server.replies import Exchange, send_and_collect
from fedpath.server.run_log import RunLog
from fedpath.server.strategies import FedAvgStrategy

__all__ = ["Federation", "RunFailed"]

logger = logging.getLogger(__name__)


class RunFailed(FedpathError):
    """The run cannot go on (too few sites, every attempt of a round failed, ...)."""


def _metrics_of(message: Message) -> dict[str, float]:
    records = message.content.metric_records
    if len(records) != 1:
        raise ValueError(f"expected one MetricRecord, got {len(records)}")
    return dict(next(iter(records.values())))


def _sender(reply: Message, sent: Mapping[str, int]) -> int:
    """The node a reply answers for.

    An error the SuperLink generates itself (Flower's "Node Unavailable" for a node that
    missed its heartbeats, "Reply Message Unavailable" for an expired one) comes from the
    SuperLink's own node id, not the site's; only ``reply_to_message_id`` names the message,
    and so the site, it stands for. Without this a dead site was logged twice: once as a
    phantom ``node 1`` with Flower's reason, once as timed out.
    """
    return int(sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id))


def _snake(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k.replace("-", "_"): float(v) for k, v in metrics.items()}


def _weighted_mean(values: Iterable[tuple[float, float]]) -> float:
    """Mean of finite values weighted by the paired weights; NaN when nothing is defined."""
    pairs = [(v, w) for v, w in values if math.isfinite(v) and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else math.nan


@dataclass
class Federation:
    """One run's loop state; ``run`` drives it from ``start_round`` to the last round."""

    grid: Grid
    cfg: RunConfig
    log: RunLog
    strategy: FedAvgStrategy
    sleep: Callable[[float], None] = time.sleep
    sites: dict[int, SiteFacts] = field(default_factory=dict)
    """Node id → facts of every node that passed the gate."""
    excluded: dict[int, str] = field(default_factory=dict)
    """Node id → why it may not take part (failed the gate after the run started)."""
    pooled: dict[tuple[int, str], PooledCounts] = field(default_factory=dict)
    """(round, split) → the sites' summed counts of the last evaluation of that split."""

    # -- sites ---------------------------------------------------------------------------

    def wait_for_sites(self, minimum: int) -> list[int]:
        """Connected node ids once at least ``minimum`` are there; ``RunFailed`` on timeout."""
        deadline = time.monotonic() + self.cfg.connect_timeout
        while True:
            nodes = sorted(int(n) for n in self.grid.get_node_ids())
            if len(nodes) >= minimum:
                return nodes
            if time.monotonic() >= deadline:
                raise RunFailed(
                    f"only {len(nodes)} site(s) connected, {minimum} needed "
                    f"(min-sites), after waiting {self.cfg.connect_timeout:.0f} s "
                    "(connect-timeout); check that the hospitals' SuperNodes are running"
                )
            self.sleep(1.0)

    def query_facts(self, nodes: list[int]) -> dict[int, SiteFacts]:
        """Ask ``nodes`` for their preparation facts; nodes that do not answer are left out."""
        import json

        messages = [
            Message(RecordDict({}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes
        ]
        answers: dict[int, SiteFacts] = {}
        exchange = self._send(messages, self.cfg.query_timeout)
        for node in exchange.unsent:
            logger.info(f"node {node}: the SuperLink did not accept the harmonisation query")
        for reply in exchange.replies:
            node = _sender(reply, exchange.sent)
            if reply.has_error():
                logger.info(f"node {node}: harmonisation query failed: {reply.error.reason}")
                continue
            try:
                raw = reply.content.config_records[CONFIG_KEY][FACTS_FIELD]
                facts = json.loads(str(raw))
                answers[node] = SiteFacts(site=str(facts["site"]), facts=facts)
            except (KeyError, ValueError, TypeError) as exc:
                logger.info(f"node {node}: malformed harmonisation reply ({exc})")
        for node in sorted(set(nodes) - set(answers)):
            logger.info(f"node {node}: no answer to the harmonisation query")
        return answers

    def gate(self) -> None:
        """Before round 1: every connected site must match; any mismatch stops the run."""
        nodes = self.wait_for_sites(self.cfg.min_sites)
        answers = self.query_facts(nodes)
        check_harmonised(list(answers.values()), self.cfg.label_names)
        if len(answers) < self.cfg.min_sites:
            raise RunFailed(
                f"only {len(answers)} site(s) answered the harmonisation query, "
                f"{self.cfg.min_sites} needed (min-sites)"
            )
        self.sites = answers
        names = ", ".join(f"{f.site} ({f.usable_slides} slides)" for f in self.site_list())
        logger.info(f"harmonisation passed: {names}")

    def site_list(self) -> list[SiteFacts]:
        return [self.sites[n] for n in sorted(self.sites)]

    def admit_new_sites(self, nodes: list[int]) -> None:
        """Gate nodes that connected after round 1 against the sites already admitted."""
        new = [n for n in nodes if n not in self.sites and n not in self.excluded]
        if not new:
            return
        answers = self.query_facts(new)
        reference = next(iter(self.sites.values())) if self.sites else None
        for node, facts in sorted(answers.items()):
            known = [s for n, s in self.sites.items() if s.site == facts.site]
            if known:  # a restarted SuperNode without a fixed key gets a new node id
                old = next(n for n, s in self.sites.items() if s.site == facts.site)
                del self.sites[old]
            try:
                peers = [reference] if reference is not None and not known else known
                check_harmonised([*peers, facts] if peers else [facts], self.cfg.label_names)
            except FedpathError as exc:
                self.excluded[node] = str(exc)
                logger.info(f"{facts.site}: connected late but does not match: {exc}")
                continue
            self.sites[node] = facts
            logger.info(f"{facts.site}: joined (node {node})")

    def feature_dim(self) -> int:
        return int(next(iter(self.sites.values())).facts["feature_dim"])

    # -- messages ------------------------------------------------------------------------

    def instructions(
        self,
        server_round: int,
        eval_split: str = "val",
        calibration: SlideCalibration | None = None,
    ) -> RoundInstructions:
        return RoundInstructions(
            server_round=server_round,
            model=self.cfg.model_config_for(self.feature_dim()),
            train=self.cfg.train_config(),
            start_epoch=(max(server_round, 1) - 1) * self.cfg.local_epochs,
            split_folds=self.cfg.split_folds,
            split_fold=self.cfg.split_fold,
            split_seed=self.cfg.seed,
            eval_split=eval_split,  # type: ignore[arg-type]
            labels=self.cfg.label_names,
            dp=self.cfg.dp_config(),
            run_key=self.run_key(),
            calibration=calibration,
        )

    def run_key(self) -> str:
        """The run's identity for the sites' privacy ledgers, stable across a resume.

        Flower gives a resumed run a new run id, so the key hashes what a resume keeps: the
        run directory and the start time recorded in its ``config.json``. A site that sees
        the same key and round again (a retry, a resumed round) does not count it twice.
        """
        import hashlib

        try:
            started = str(self.log.read_config().get("started", ""))
        except FedpathError:
            started = ""
        text = f"{self.log.run_dir.resolve()}\x00{started}"
        return "run-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def _messages(
        self,
        nodes: list[int],
        arrays: Mapping[str, np.ndarray],
        instructions: RoundInstructions,
        message_type: str,
    ) -> list[Message]:
        out = []
        for node in nodes:
            content = RecordDict(
                {
                    ARRAYS_KEY: ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                    CONFIG_KEY: ConfigRecord({INSTRUCTIONS_FIELD: instructions.to_json()}),
                }
            )
            out.append(
                Message(
                    content,
                    dst_node_id=node,
                    message_type=message_type,
                    group_id=str(instructions.server_round),
                )
            )
        return out

    def _send(self, messages: list[Message], timeout: float) -> Exchange:
        return send_and_collect(
            self.grid, messages, timeout=timeout, poll_interval=self.cfg.reply_poll_interval
        )

    def _exchange(
        self,
        nodes: list[int],
        arrays: Mapping[str, np.ndarray],
        instructions: RoundInstructions,
        message_type: str,
    ) -> tuple[list[Message], dict[int, str]]:
        """Send to ``nodes`` and wait at most ``round-timeout``; (good replies, failures)."""
        messages = self._messages(nodes, arrays, instructions, message_type)
        exchange = self._send(messages, self.cfg.round_timeout)
        good: list[Message] = []
        failed: dict[int, str] = {
            node: "the SuperLink did not accept the message (see the ServerApp log)"
            for node in exchange.unsent
        }
        for reply in exchange.replies:
            node = _sender(reply, exchange.sent)
            if reply.has_error():
                failed[node] = str(reply.error.reason or f"error code {reply.error.code}")
            else:
                good.append(reply)
        for node in nodes:
            if node not in failed and all(int(r.metadata.src_node_id) != node for r in good):
                failed[node] = f"no reply within round-timeout ({self.cfg.round_timeout:.0f} s)"
        return sorted(good, key=lambda m: int(m.metadata.src_node_id)), failed

    def name(self, node: int) -> str:
        facts = self.sites.get(node)
        return facts.site if facts is not None else f"node {node}"

    # -- rounds --------------------------------------------------------------------------

    def sample(self, server_round: int, attempt: int, nodes: list[int]) -> list[int]:
        """The sites asked this round: all eligible ones, or a seeded ``sample-fraction``."""
        eligible = [n for n in nodes if n in self.sites]
        if self.cfg.sample_fraction >= 1.0:
            return eligible
        size = max(self.cfg.min_sites, math.ceil(self.cfg.sample_fraction * len(eligible)))
        rng = random.Random(f"{self.cfg.seed}:{server_round}:{attempt}")
        return sorted(rng.sample(eligible, min(size, len(eligible))))

    def train_round(
        self, server_round: int, arrays: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Run one round (retrying it if too few sites answer); new arrays + its log record."""
        for attempt in range(1, self.cfg.max_round_attempts + 1):
            began = time.time()
            nodes = self.wait_for_sites(self.cfg.min_sites)
            self.admit_new_sites(nodes)
            sampled = self.sample(server_round, attempt, nodes)
            if len(sampled) < self.cfg.min_sites:
                logger.info(
                    f"round {server_round}: only {len(sampled)} admitted site(s) connected, "
                    f"{self.cfg.min_sites} needed"
                )
                continue
            logger.info(
                f"round {server_round} (attempt {attempt}): training at "
                + ", ".join(self.name(n) for n in sampled)
            )
            instructions = self.instructions(server_round)
            replies, failed = self._exchange(sampled, arrays, instructions, MessageType.TRAIN)
            for node, reason in sorted(failed.items()):
                logger.info(f"round {server_round}: {self.name(node)} failed: {reason}")
            exhausted = self._budget_exhausted(server_round, replies)
            good = [m for m in replies if int(m.metadata.src_node_id) not in exhausted]
            if not good and not failed:
                raise RunFailed(
                    f"round {server_round}: every site's privacy budget is exhausted "
                    f"({', '.join(self.name(n) for n in sorted(exhausted))}); nothing to train"
                )
            # A site out of budget answered but cannot contribute: the share that must answer
            # is taken over the sites that still can.
            need = max(1, math.ceil(self.cfg.min_fit_fraction * (len(sampled) - len(exhausted))))
            if len(good) < need:
                left = " with privacy budget left" if exhausted else ""
                logger.info(
                    f"round {server_round}: {len(good)} of {len(sampled) - len(exhausted)} "
                    f"site(s){left} answered, {need} needed "
                    f"(min-fit-fraction {self.cfg.min_fit_fraction}); retrying"
                )
                continue
            self.strategy.begin_aggregation(arrays)
            new_arrays = self._aggregate(server_round, good)
            train = {self.name(int(m.metadata.src_node_id)): _snake(_metrics_of(m)) for m in good}
            weights = {self.name(n): w for n, w in self.strategy.last_weights.items()}
            logger.info(
                f"round {server_round}: aggregated {len(good)} site(s) with "
                f"{self.strategy.name}: "
                + ", ".join(f"{site} {w:.3f}" for site, w in weights.items())
            )
            evaluation = self.evaluate(new_arrays, server_round, "val")
            record = self._round_record(
                server_round, attempt, began, sampled, replies, failed, weights, train, evaluation
            )
            record["budget_exhausted"] = {
                self.name(n): {"epsilon": m.get("epsilon", math.nan), "delta": m.get("delta")}
                for n, m in sorted(exhausted.items())
            }
            for site, spent in record["budget_exhausted"].items():
                if math.isfinite(spent["epsilon"]):
                    record["privacy"][site] = dict(spent)
            record.update(self.strategy.round_log())
            return new_arrays, record
        raise RunFailed(
            f"round {server_round} failed {self.cfg.max_round_attempts} time(s) "
            "(max-round-attempts): too few sites answered"
        )

    def _budget_exhausted(self, server_round: int, replies: list[Message]) -> dict[int, dict]:
        """Node → metrics of the replies whose site refused to train: its lifetime slide-level
        privacy budget would be exceeded (it sent the global model back unchanged)."""
        out: dict[int, dict] = {}
        for reply in replies:
            try:
                metrics = _metrics_of(reply)
            except ValueError:
                continue  # the strategy rejects a malformed reply with its own message
            if metrics.get(BUDGET_EXHAUSTED_METRIC, 0.0) == 1.0:
                node = int(reply.metadata.src_node_id)
                out[node] = metrics
                logger.info(
                    f"round {server_round}: {self.name(node)} has exhausted its privacy budget "
                    f"(ε = {metrics.get('epsilon', math.nan):.3f} spent in this run, "
                    f"δ = {metrics.get('delta', math.nan):g}); not trained, not aggregated"
                )
        return out

    def _aggregate(self, server_round: int, good: list[Message]) -> dict[str, np.ndarray]:
        aggregated, _ = self.strategy.aggregate_train(server_round, good)
        if aggregated is None:
            raise RunFailed(f"round {server_round}: nothing to aggregate")
        return {k: v.numpy() for k, v in aggregated.items()}

    def evaluate(
        self,
        arrays: Mapping[str, np.ndarray],
        server_round: int,
        split: str,
        calibration: SlideCalibration | None = None,
    ) -> dict[str, dict[str, float]]:
        """Per-site scalar metrics of the global model on ``split``; sites that fail are logged.

        The sites' counts and sums are added up in ``self.pooled[(server_round, split)]``.
        """
        n_labels = len(self.cfg.label_names)
        # Only this round's sums are ever read again (the final test reads the last round's).
        self.pooled = {k: v for k, v in self.pooled.items() if k[0] == server_round}
        pooled = self.pooled[(server_round, split)] = PooledCounts(n_labels)
        nodes = [n for n in sorted(int(x) for x in self.grid.get_node_ids()) if n in self.sites]
        if not nodes:
            return {}
        instructions = self.instructions(server_round, split, calibration)
        good, failed = self._exchange(nodes, arrays, instructions, MessageType.EVALUATE)
        for node, reason in sorted(failed.items()):
            logger.info(f"round {server_round}: {self.name(node)} could not evaluate: {reason}")
        out: dict[str, dict[str, float]] = {}
        for reply in good:
            try:
                metrics = check_reply_metrics(_metrics_of(reply), EVALUATE_METRICS, n_labels)
                missing = sorted(set(EVALUATE_METRICS) - set(metrics))
                if missing:
                    raise ValueError(f"missing {missing}")
            except ValueError as exc:
                logger.info(f"{self.name(int(reply.metadata.src_node_id))}: bad metrics: {exc}")
                continue
            pooled.add(metrics)
            scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
            out[self.name(int(reply.metadata.src_node_id))] = _snake(scalars)
        return out

    def _round_record(
        self,
        server_round: int,
        attempt: int,
        began: float,
        sampled: list[int],
        good: list[Message],
        failed: dict[int, str],
        weights: dict[str, float],
        train: dict[str, dict[str, float]],
        evaluation: dict[str, dict[str, float]],
    ) -> dict[str, Any]:
        def global_train(key: str) -> float:
            return _weighted_mean((m[key], weights[s]) for s, m in train.items())

        privacy = {
            site: {"epsilon": m["epsilon"], "delta": m["delta"]}
            for site, m in train.items()
            if math.isfinite(m.get("epsilon", math.nan))
        }
        for m in train.values():
            m.pop("epsilon", None)
            m.pop("delta", None)
            m.pop(BUDGET_EXHAUSTED_METRIC.replace("-", "_"), None)
            m["num_examples"] = int(m.pop(WEIGHT_METRIC.replace("-", "_")))
        for m in evaluation.values():
            m["num_examples"] = int(m.pop(WEIGHT_METRIC.replace("-", "_")))
        val_weights = {s: float(m["num_examples"]) for s, m in evaluation.items()}
        pooled = self.pooled.get((server_round, "val"), PooledCounts(len(self.cfg.label_names)))
        return {
            "round": server_round,
            "attempt": attempt,
            "started": began,
            "seconds": time.time() - began,
            "strategy": self.strategy.name,
            "sampled": sorted(self.name(n) for n in sampled),
            "replied": sorted(self.name(int(m.metadata.src_node_id)) for m in good),
            "failed": {self.name(n): reason for n, reason in sorted(failed.items())},
            "weights": weights,
            "train": train,
            "evaluate": evaluation,
            "global": {
                "train_loss": global_train("train_loss"),
                "val_loss": _weighted_mean(
                    (m["loss"], val_weights[s]) for s, m in evaluation.items()
                ),
                # Over every site's validation slides (patches) at once, from their counts.
                "val_auc": pooled.slide_auc()[0],
                "val_patch_auc": pooled.patch_auc()[0],
                "val_auc_site_mean": _weighted_mean(
                    (m["auc"], val_weights[s]) for s, m in evaluation.items()
                ),
            },
            "privacy": privacy,
        }

    def run(self, arrays: dict[str, np.ndarray], start_round: int) -> dict[str, np.ndarray]:
        """Rounds ``start_round .. num-server-rounds``, checkpointing after each."""
        for server_round in range(start_round, self.cfg.num_server_rounds + 1):
            arrays, record = self.train_round(server_round, arrays)
            self.log.append_round(record)
            save_checkpoint(
                self.log.run_dir,
                Checkpoint(
                    server_round=server_round,
                    arrays=arrays,
                    strategy=self.strategy.state(),
                    run_config=self.cfg.to_run_config(),
                ),
            )
            glob = record["global"]
            logger.info(
                f"round {server_round}/{self.cfg.num_server_rounds} done in "
                f"{record['seconds']:.1f} s: train loss {glob['train_loss']:.4f}, "
                f"val AUC {glob['val_auc']:.3f}"
            )
        return arrays

    def final_test(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Calibrate the final model on the sites' validation sums, then test it with that.

        The last round's validation replies are of this very model; after a resume that
        restarted at the final test they are not in memory, and the sites are asked again.
        """
        last = self.cfg.num_server_rounds
        val = self.pooled.get((last, "val"))
        if val is None or val.sites == 0:
            self.evaluate(arrays, last, "val")
            val = self.pooled[(last, "val")]
        calibration = val.calibration(self.cfg.label_names)
        logger.info(f"calibration of the final model: {calibration.describe()}")
        test = self.evaluate(arrays, last, "test", calibration)
        for m in test.values():
            m["num_examples"] = int(m.pop(WEIGHT_METRIC.replace("-", "_")))
        pooled = self.pooled[(last, "test")].metrics(self.cfg.label_names)
        return {
            "test": test,
            "global_test": pooled,
            "calibration": {
                **calibration.model_dump(mode="json"),
                "description": calibration.describe(),
                "applies_to": (
                    "loss, balanced_accuracy, sensitivity, specificity, f1, brier and ece of "
                    "test and global_test are of the calibrated probabilities at the calibrated "
                    "threshold; *_raw are the model's own at the argmax; AUCs do not change"
                    if calibration.fitted
                    else "nothing: every test metric is of the model's own probabilities"
                ),
            },
            "slide_level_dp": self.slide_dp_record(),
        }

    def slide_dp_record(self) -> dict[str, Any] | None:
        """What final.json says about slide-level DP-SGD: the privacy unit, the accountant,
        the settings, each site's last (ε, δ) and the round each site's budget ran out in."""
        dp = self.cfg.dp_config()
        if not dp.enabled:
            return None
        latest: dict[str, dict[str, float]] = {}
        exhausted: dict[str, int] = {}
        for record in self.log.rounds:
            latest.update(record.get("privacy") or {})
            for site in record.get("budget_exhausted") or {}:
                exhausted.setdefault(site, int(record["round"]))
        return {
            "privacy_unit": PRIVACY_UNIT,
            "accountant": f"Opacus {dp.accountant.upper()} accountant, at each site",
            "mechanism": dp.describe(),
            "settings": dp.model_dump(mode="json"),
            "sites": latest,
            "budget_exhausted_from_round": exhausted,
        }


def harmonised_summary(sites: Iterable[SiteFacts]) -> dict[str, dict[str, Any]]:
    """The per-site facts recorded in ``config.json`` (aggregate facts only)."""
    out: dict[str, dict[str, Any]] = {}
    for s in sites:
        facts = {k: s.facts.get(k) for k in (*HARMONISED_FIELDS, "labels", "fedpath_version")}
        slides = s.facts.get("slides") or {}
        facts["n_slides"] = int(slides.get("usable", 0))
        facts["slides_with_patch_labels"] = int(slides.get("with_patch_labels", 0))
        out[s.site] = facts
    return out
