"""What a hospital does for one federated message: no Flower here, only data and models.

The ClientApp (``client.app``) unpacks a Flower message and calls these functions, so they can
be tested, and the site-local baseline compared, without any daemon. Each message runs in a
fresh process: the site's bags are loaded from HDF5 for every message (fast, and nothing is
cached between rounds that could leak across runs); the split is recomputed from the same
seed, so every round of a run trains and validates on the same slides.

Only aggregate numbers come back from here (counts, losses, AUCs): per-slide predictions never
leave this module's callers' process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.training.bags import Bag, load_bag
from client.training.evaluate import evaluate_entries
from client.training.site_index import BagEntry, load_site_index, split_entries
from client.training.trainer import evaluate, train
from common.errors import ConfigError
from common.federation import RoundInstructions
from common.mil.models import MILModel, build_model

__all__ = [
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


def load_global_model(instructions: RoundInstructions, state: Mapping[str, np.ndarray]) -> MILModel:
    """Build the run's architecture and load the server's weights into it, checked by name."""
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
    return model


def _bags(entries: list[BagEntry], feature_dim: int) -> list[Bag]:
    return [load_bag(e, feature_dim) for e in entries]


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


def train_on_site(
    data_dir: Path,
    instructions: RoundInstructions,
    state: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Train the global model for the round's local epochs; return weights and metrics.

    No early stopping inside a round (the server decides the round count); validation is run
    once afterwards so the coordinator sees each site's validation AUC every round.
    """
    began = time.perf_counter()
    splits = load_splits(data_dir, instructions)
    model = load_global_model(instructions, state)
    dim = instructions.model.feature_dim
    train_bags = _bags(splits.train, dim)
    result = train(model, train_bags, [], instructions.train, start_epoch=instructions.start_epoch)
    val = evaluate(result.model, _bags(splits.val, dim)) if splits.val else None
    metrics = {
        "num-examples": float(len(train_bags)),
        "train-loss": _supervised_loss(result.history[-1], instructions),
        "val-loss": val.loss if val else math.nan,
        "val-auc": val.auc if val else math.nan,
        "val-patch-auc": val.patch_auc if val else math.nan,
        "seconds": time.perf_counter() - began,
        "epsilon": math.nan,
        "delta": math.nan,
    }
    weights = {k: v.detach().cpu().numpy() for k, v in result.model.state_dict().items()}
    return weights, metrics


def evaluate_on_site(
    data_dir: Path,
    instructions: RoundInstructions,
    state: Mapping[str, np.ndarray],
) -> dict[str, float]:
    """Score the global model on the site's ``eval_split``; aggregate metrics only.

    A split without slides (e.g. a tiny site with no test fold) reports ``num-examples`` 0 and
    NaN metrics rather than failing, so the server can tell "nothing to score" from an error.
    """
    began = time.perf_counter()
    splits = load_splits(data_dir, instructions)
    entries = splits.val if instructions.eval_split == "val" else splits.test
    nan = math.nan
    if not entries:
        return {
            "num-examples": 0.0,
            "loss": nan,
            "auc": nan,
            "patch-auc": nan,
            "balanced-accuracy": nan,
            "f1": nan,
            "seconds": time.perf_counter() - began,
        }
    model = load_global_model(instructions, state)
    dim = instructions.model.feature_dim
    result = evaluate_entries(model, entries, feature_dim=dim, bootstrap=0)
    # Slide cross-entropy from the same forward passes (no second pass over the bags).
    loss = float(
        np.mean([-math.log(max(float(p.probs[p.label]), 1e-300)) for p in result.predictions])
    )
    return {
        "num-examples": float(len(entries)),
        "loss": float(loss),
        "auc": float(result.slide.auc.value),
        "patch-auc": float(result.patch.auc) if result.patch is not None else nan,
        "balanced-accuracy": float(result.slide.balanced_accuracy.value),
        "f1": float(result.slide.f1.value),
        "seconds": time.perf_counter() - began,
    }
