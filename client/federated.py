"""What a hospital does for one federated message: no Flower here, only data and models.

The ClientApp (``client.app``) unpacks a Flower message and calls these functions, so they can
be tested, and the site-local baseline compared, without any daemon. Each message runs in a
fresh process: the site's bags are loaded from HDF5 for every message (fast); only the
node's resident worker keeps the bags of the current run between its messages, byte-capped and
keyed by file identity (:mod:`fedpath.client.training.bag_cache`). The split is recomputed from the
same seed, so every round of a run trains and validates on the same slides.

Only aggregate numbers come back from here (counts, losses, AUCs, and the histograms and sums
of ``fedpath.common.federation.COUNT_LISTS``/``SUM_LISTS`` the server pools and calibrates with):
per-slide predictions never leave this module's callers' process.

A slide whose feature file cannot be used (NaN features, another encoder, a truncated file) is
left out of the round and reported through ``on_skip`` (by default a warning in the
SuperNode's log, naming the file and the problem); the reply carries only how many were
skipped. The round fails only when a split that has slides has no usable one left.

Training and evaluation run on the ``device`` the caller passes (the ClientApp takes it from
the node config, :mod:`fedpath.client.node_device`; default the CPU): the global model is loaded on
the CPU, checked, then moved there, and the weights that go back are CPU numpy arrays
whatever device trained them.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpath.client.privacy_ledger import (
    BudgetExhausted,
    LedgerEntry,
    NodeBudget,
    dataset_identity,
    reserve_round,
    run_epsilon,
)
from fedpath.client.training.bags import BagSkips, OnSkip
from fedpath.client.training.evaluate import EvaluationResult, evaluate_bags
from fedpath.client.training.privacy_accountant import check_delta
from fedpath.client.training.site_index import BagEntry, load_site_index, split_entries
from fedpath.client.training.trainer import evaluate, train
from fedpath.common.calibration import (
    N_PATCH_BINS,
    N_SCORE_BINS,
    PATCH_EDGES,
    log_odds,
    nll_on_grid,
    score_histogram,
)
from fedpath.common.device import describe_device
from fedpath.common.errors import ConfigError
from fedpath.common.federation import (
    COUNT_LISTS,
    EVALUATE_METRICS,
    SKIPPED_METRIC,
    SUM_LISTS,
    WEIGHT_METRIC,
    MetricValue,
    RoundInstructions,
)
from fedpath.common.metrics import predict
from fedpath.common.mil.models import MILModel, build_model
from fedpath.common.probability_scores import calibration_bins

__all__ = [
    "SitePrivacy",
    "SiteSplits",
    "evaluate_on_site",
    "load_global_model",
    "load_splits",
    "train_on_site",
]


@dataclass(frozen=True)
class SiteSplits:
    """The site's slides by split (entries only: bags load lazily)."""

    train: list[BagEntry]
    val: list[BagEntry]
    test: list[BagEntry]


def load_splits(data_dir: Path, instructions: RoundInstructions) -> SiteSplits:
    """The same train/val/test slides in every round of a run (seeded split)."""
    entries = load_site_index(data_dir, instructions.labels)
    splits = split_entries(
        entries,
        k=instructions.split_folds,
        fold=instructions.split_fold,
        seed=instructions.split_seed,
    )
    if not splits["train"]:
        raise ConfigError(f"{data_dir}: the training split is empty")
    return SiteSplits(splits["train"], splits["val"], splits["test"])


def load_global_model(
    instructions: RoundInstructions,
    state: Mapping[str, np.ndarray],
    device: torch.device | None = None,
) -> MILModel:
    """Build the run's architecture and load the server's weights into it, checked by name;
    then move it to ``device`` (the trainers and scorers run where the model is)."""
    with torch.random.fork_rng(devices=[]):
        model = build_model(instructions.model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ConfigError(
            f"the server's model does not match a {instructions.model.kind} model "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    tensors = {}
    for key, value in state.items():
        tensor = torch.from_numpy(np.array(value, copy=True))
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ConfigError(
                f"the server's array {key!r} has shape {tuple(tensor.shape)}, "
                f"the model needs {tuple(own[key].shape)}"
            )
        tensors[key] = tensor.to(own[key].dtype)
    model.load_state_dict(tensors)
    return model if device is None else model.to(device)


def _supervised_loss(history_last: Any, instructions: RoundInstructions) -> float:
    """The FedMix ``L_i``: the supervised part of the last epoch's loss (always >= 0).

    The total includes the attention regulariser ``-H̃(A)``, which is negative by design
    (DESIGN §4.4); a negative "loss" has no meaningful power ``L^β``.
    """
    c = instructions.train.supervision.bag_weight
    bag = history_last.train_bag_loss
    inst = history_last.train_instance_loss
    if not math.isfinite(inst):
        inst = 0.0
    return float(c * bag + (1.0 - c) * inst)


@dataclass
class SitePrivacy:
    """What the ClientApp knows about privacy beyond the message: the hospital's budget (node
    config), the run's entries carried in ``Context.state``, and where to put them back.

    ``run_id`` is Flower's run id, the ledger key of last resort when the server sends no
    ``run_key``. After a DP round ``dataset_id`` and ``run_entries`` hold what the caller must
    store in ``Context.state``.
    """

    budget: NodeBudget
    run_id: str
    site: str = ""
    carried: dict[str, list[LedgerEntry]] = field(default_factory=dict)
    """Dataset id → this run's entries from ``Context.state``."""
    dataset_id: str | None = None
    run_entries: list[LedgerEntry] = field(default_factory=list)


def input_digest(
    instructions: RoundInstructions,
    state: Mapping[str, np.ndarray],
    skipped: Sequence[str] = (),
    device: str | None = None,
) -> str:
    """sha256 of what the site is asked to train (instructions + global model): two messages
    with the same digest make the site release the identical update.

    ``skipped`` (slide ids left out for a bad feature file) is part of the input: a retry
    after the file was fixed trains on other slides, so it must be a new ledger entry with its
    own noise, never a second release under the recorded round's seed. With nothing skipped
    the digest is what it always was, so ledgers written before skipping existed still match.

    ``device`` (:func:`common.device.describe_device` of a device other than the CPU) is part
    of it too: the same secret seed draws different noise on another device, so a round
    retried after the node moved to a GPU (or another GPU) is a new release with its own
    ledger entry, never a second, differently noised release counted once. On the CPU the
    digest is what it was before devices existed.
    """
    digest = hashlib.sha256(instructions.to_json().encode("utf-8"))
    for key in sorted(state):
        array = np.ascontiguousarray(state[key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    if skipped:
        digest.update(("skipped:" + "\n".join(sorted(skipped))).encode("utf-8"))
    if device is not None and device != "cpu":
        digest.update(f"device:{device}".encode())
    return digest.hexdigest()


def _base_metrics(n_train: int, began: float, skipped: int) -> dict[str, float]:
    nan = math.nan
    return {
        "num-examples": float(n_train),
        SKIPPED_METRIC: float(skipped),
        "train-loss": nan,
        "val-loss": nan,
        "val-auc": nan,
        "val-patch-auc": nan,
        "seconds": time.perf_counter() - began,
        "epsilon": nan,
        "delta": nan,
        "budget-exhausted": 0.0,
    }


def train_on_site(
    data_dir: Path,
    instructions: RoundInstructions,
    state: Mapping[str, np.ndarray],
    privacy: SitePrivacy | None = None,
    on_skip: OnSkip | None = None,
    device: torch.device | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Train the global model for the round's local epochs; return weights and metrics.

    No early stopping inside a round (the server decides the round count); validation is run
    once afterwards so the coordinator sees each site's validation AUC every round.

    With ``instructions.dp`` enabled the round is slide-level DP-SGD
    (:func:`fedpath.client.training.private_trainer.train_private`), recorded in the site's privacy
    ledger *before* it is trained; a round that would exceed the hospital's lifetime budget
    is not trained and the global model comes back unchanged with ``budget-exhausted`` = 1.
    A site with a budget refuses a run without DP-SGD (``ConfigError``).

    Slides with unusable feature files are skipped (``on_skip`` hears of each; default: the
    log) and are not part of the round's dataset: ``num-examples``, the aggregation weight and
    DP-SGD's sampling rate all count the slides actually trained on.

    The model trains on ``device`` (default: the CPU); the weights come back as CPU arrays.
    """
    began = time.perf_counter()
    privacy = privacy or SitePrivacy(budget=NodeBudget(), run_id="")
    skips = BagSkips(on_skip)
    device = device if device is not None else torch.device("cpu")
    if instructions.dp.enabled:
        return _train_private_on_site(data_dir, instructions, state, privacy, began, skips, device)
    if privacy.budget.epsilon is not None:
        raise ConfigError(
            f"this site has a privacy budget (privacy-budget = {privacy.budget.epsilon:g}) but "
            "the run trains without DP-SGD; it takes part only in runs with dp-noise-multiplier "
            "or dp-target-epsilon set"
        )
    splits = load_splits(data_dir, instructions)
    model = load_global_model(instructions, state, device)
    train_bags = skips.bags("train", splits.train, instructions.model.feature_dim)
    result = train(model, train_bags, [], instructions.train, start_epoch=instructions.start_epoch)
    weights = {k: v.detach().cpu().numpy() for k, v in result.model.state_dict().items()}
    return weights, _finish_metrics(result, splits, instructions, began, skips)


def _finish_metrics(
    result: Any,
    splits: SiteSplits,
    instructions: RoundInstructions,
    began: float,
    skips: BagSkips,
) -> dict[str, float]:
    """The reply's losses and validation metrics of a trained round."""
    val = evaluate(result.model, skips.bags("val", splits.val, instructions.model.feature_dim))
    metrics = _base_metrics(result.n_train_slides, began, len(skips.skipped))
    metrics.update(
        {
            "train-loss": _supervised_loss(result.history[-1], instructions),
            "val-loss": val.loss,
            "val-auc": val.auc,
            "val-patch-auc": val.patch_auc,
            "seconds": time.perf_counter() - began,
        }
    )
    return metrics


def _train_private_on_site(
    data_dir: Path,
    instructions: RoundInstructions,
    state: Mapping[str, np.ndarray],
    privacy: SitePrivacy,
    began: float,
    skips: BagSkips,
    device: torch.device,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """DP-SGD on the usable training slides only; the ledger entry is for exactly those.

    The bags load before the round is planned and recorded, so N (δ check, sampling rate q,
    the entry's ``n_slides``) is the number of slides trained on, never the index's count.
    """
    from fedpath.client.training.private_trainer import (
        check_private_model,
        plan_private_training,
        train_private,
    )

    dp = instructions.dp
    splits = load_splits(data_dir, instructions)
    train_bags = skips.bags("train", splits.train, instructions.model.feature_dim)
    n_train = len(train_bags)
    if privacy.budget.delta is not None:
        check_delta(privacy.budget.delta, n_train)  # the lifetime δ, like the run's
    model = load_global_model(instructions, state, device)
    check_private_model(model)
    planned = plan_private_training(dp, n_train, instructions.train.epochs)
    # The dataset's identity is the prepared site, skipped slides included: it must not change
    # from round to round with what happens to be readable, or the run's ε would be split over
    # several ledger records; sharing a slide that was not trained on only over-counts.
    every = [e.slide_id for e in load_site_index(data_dir, instructions.labels)]
    dataset_id, slides = dataset_identity(data_dir, every)
    run = instructions.run_key or f"flwr-{privacy.run_id}"
    entry = LedgerEntry(
        run=run,
        round=instructions.server_round,
        input_sha256=input_digest(
            instructions,
            state,
            [s.entry.slide_id for s in skips.skipped],
            describe_device(device),
        ),
        site=privacy.site or data_dir.name,
        noise_multiplier=planned.noise_multiplier,
        sample_rate=planned.sample_rate,
        steps=planned.steps,
        delta=dp.delta,
        max_grad_norm=dp.max_grad_norm,
        accountant=dp.accountant,
        n_slides=n_train,
    )
    privacy.dataset_id = dataset_id
    try:
        reservation = reserve_round(
            data_dir,
            dataset_id,
            slides,
            entry,
            privacy.budget,
            privacy.carried.get(dataset_id, []),
        )
    except BudgetExhausted as exc:
        privacy.run_entries = exc.run_entries
        metrics = _base_metrics(n_train, began, len(skips.skipped))
        spent, _ = run_epsilon(exc.run_entries)
        metrics.update({"epsilon": spent, "delta": dp.delta, "budget-exhausted": 1.0})
        return {k: np.asarray(v) for k, v in state.items()}, metrics
    privacy.run_entries = reservation.run_entries
    private = train_private(
        model,
        train_bags,
        [],
        instructions.train,
        dp,
        secret_seed=reservation.secret_seed,
        start_epoch=instructions.start_epoch,
    )
    if private.mechanism != planned:  # pragma: no cover - no early stopping without val bags
        raise ConfigError(f"DP-SGD ran {private.mechanism}, but {planned} was recorded")
    weights = {k: v.detach().cpu().numpy() for k, v in private.result.model.state_dict().items()}
    metrics = _finish_metrics(private.result, splits, instructions, began, skips)
    metrics.update({"epsilon": reservation.run_epsilon, "delta": dp.delta})
    return weights, metrics


def evaluate_on_site(
    data_dir: Path,
    instructions: RoundInstructions,
    state: Mapping[str, np.ndarray],
    on_skip: OnSkip | None = None,
    device: torch.device | None = None,
) -> dict[str, MetricValue]:
    """Score the global model on the site's ``eval_split``; aggregate metrics only.

    With ``instructions.calibration`` (the final test) the slide metrics are of the calibrated
    probabilities at the calibrated threshold; the ``-raw`` ones stay the model's own.
    A split without slides (e.g. a tiny site with no test fold) reports ``num-examples`` 0,
    NaN metrics and all-zero counts rather than failing, so the server can tell "nothing to
    score" from an error. Slides with unusable feature files are skipped as in
    :func:`train_on_site`. The model runs on ``device`` (default: the CPU), in float32 as in
    ``fedpath local eval``.
    """
    began = time.perf_counter()
    splits = load_splits(data_dir, instructions)
    entries = splits.val if instructions.eval_split == "val" else splits.test
    n_labels = len(instructions.labels)
    if not entries:
        return {**_empty_evaluation(n_labels), "seconds": time.perf_counter() - began}
    model = load_global_model(instructions, state, device)
    dim = instructions.model.feature_dim
    skips = BagSkips(on_skip)
    # One read per bag: unusable files are skipped while scoring, not in a pass of their own.
    bags = skips.iter_bags(instructions.eval_split, entries, dim)
    result = evaluate_bags(
        model,
        bags,
        bootstrap=0,
        labels=instructions.labels,
        calibration=instructions.calibration,
    )
    return {
        "num-examples": float(len(result.predictions)),
        SKIPPED_METRIC: float(len(skips.skipped)),
        **_evaluation_sums(result, n_labels),
        "seconds": time.perf_counter() - began,
    }


def _empty_evaluation(n_labels: int) -> dict[str, MetricValue]:
    """The reply of a site with no slide in the split: every key of the protocol, NaN
    scalars and zero lists, so the server's pooled sums stay well defined."""
    lists = {**COUNT_LISTS, **SUM_LISTS}
    out: dict[str, MetricValue] = {
        key: math.nan for key in EVALUATE_METRICS if key not in lists and key != "seconds"
    }
    out.update({WEIGHT_METRIC: 0.0, SKIPPED_METRIC: 0.0})
    for key, length in COUNT_LISTS.items():
        size = length or (n_labels * n_labels if key == "confusion" else n_labels)
        out[key] = [0] * size
    out.update({key: [0.0] * length for key, length in SUM_LISTS.items()})
    return out


def _evaluation_sums(result: EvaluationResult, n_labels: int) -> dict[str, MetricValue]:
    """The site's scalar metrics and the counts and sums the server pools over sites."""
    preds = result.predictions
    y = np.asarray([p.label for p in preds], dtype=np.int64)
    logits = np.stack([p.slide_logits() for p in preds])
    probs = result.probs()  # calibrated when the instructions carry a calibration
    # Slide cross-entropy from the same forward passes (no second pass over the bags).
    loss = float(np.mean(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-300))))
    raw = result.uncalibrated or result.slide
    threshold = result.calibration.threshold if result.calibrated and result.calibration else None
    pred = predict(probs, threshold)
    confusion = np.bincount(y * n_labels + pred, minlength=n_labels * n_labels)
    count, prob_sum, events = calibration_bins(y, probs)
    zeros = np.zeros(N_SCORE_BINS, dtype=np.int64)
    pos = neg = zeros
    if n_labels == 2:
        d = log_odds(logits)
        pos, neg = score_histogram(d[y == 1]), score_histogram(d[y == 0])
    tumour_patches, normal_patches = _patch_histograms(result)
    return {
        "loss": loss,
        "auc": float(result.slide.auc.value),
        "patch-auc": float(result.patch.auc) if result.patch is not None else math.nan,
        "balanced-accuracy": float(result.slide.balanced_accuracy.value),
        "f1": float(result.slide.f1.value),
        "brier": float(result.slide.brier),
        "ece": float(result.slide.ece),
        "balanced-accuracy-raw": float(raw.balanced_accuracy.value),
        "brier-raw": float(raw.brier),
        "ece-raw": float(raw.ece),
        "slide-hist-pos": pos.tolist(),
        "slide-hist-neg": neg.tolist(),
        "patch-hist-tumour": tumour_patches.tolist(),
        "patch-hist-normal": normal_patches.tolist(),
        "class-counts": np.bincount(y, minlength=n_labels).tolist(),
        "confusion": confusion.tolist(),
        "ece-count": count.tolist(),
        "ece-events": events.tolist(),
        "ece-prob-sum": prob_sum.tolist(),
        "nll-grid": nll_on_grid(logits, y).tolist(),
    }


def _patch_histograms(result: EvaluationResult) -> tuple[np.ndarray, np.ndarray]:
    """Labelled patches by instance tumour log-odds: (tumour, normal) counts on the grid."""
    tumour = np.zeros(N_PATCH_BINS, dtype=np.int64)
    normal = np.zeros(N_PATCH_BINS, dtype=np.int64)
    for p in result.predictions:
        if p.patch_labels is None or p.patch_tumour_prob is None:
            continue
        prob = np.clip(np.asarray(p.patch_tumour_prob, dtype=np.float64), 1e-300, 1.0 - 1e-16)
        d = np.log(prob) - np.log1p(-prob)
        tumour += score_histogram(d[p.patch_labels == 1], PATCH_EDGES)
        normal += score_histogram(d[p.patch_labels == 0], PATCH_EDGES)
    return tumour, normal
