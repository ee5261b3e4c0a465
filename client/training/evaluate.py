"""Site-local evaluation of a trained MIL model: per-slide predictions and their metrics.

Kept apart from the CLI so the same numbers come out of ``fedpath local eval``, a notebook or a
federated client's local test: the functions here take a model and bag entries, return plain
data and never print. Bags are loaded and scored one at a time (batch of one, no padding), so
memory is bounded by the largest slide however large the test set is.

Checkpoints store the weights and the model config as plain JSON types only, so they load with
``torch.load(weights_only=True)`` (no pickled code runs when a hospital opens a model file it
was sent) and the architecture is rebuilt from the config rather than unpickled.
"""

from __future__ import annotations

import csv
import io
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from client.training.bags import Bag, load_bag
from client.training.site_index import BagEntry
from common.atomic import atomic_path
from common.errors import ConfigError
from common.metrics import PatchMetrics, SlideMetrics, pooled_patch_metrics, slide_metrics
from common.mil.config import ModelConfig
from common.mil.models import MILModel, build_model
from common.safe_load import pickled_reference

__all__ = [
    "EvaluationResult",
    "SlidePrediction",
    "evaluate_bags",
    "evaluate_entries",
    "load_checkpoint",
    "predict_bag",
    "predictions_csv",
    "save_checkpoint",
]


@dataclass(frozen=True)
class SlidePrediction:
    """One slide's class probabilities and, when it has patch labels, its patch predictions."""

    slide_id: str
    label: int
    probs: np.ndarray
    """``[C]`` softmax of the slide logits."""
    patch_labels: np.ndarray | None
    """``[N]`` 1/0/−1 patch labels of the bag, or ``None`` for an unannotated slide."""
    patch_tumour_prob: np.ndarray | None
    """``[N]`` instance tumour probability per real patch (``None`` without patch labels)."""

    @property
    def pred(self) -> int:
        return int(np.argmax(self.probs))


@dataclass(frozen=True)
class EvaluationResult:
    """Predictions of a set of slides and the metrics computed from them."""

    predictions: tuple[SlidePrediction, ...]
    slide: SlideMetrics
    patch: PatchMetrics | None
    """Pooled patch metrics over the annotated slides; ``None`` when none is annotated."""

    def to_json(self) -> dict[str, Any]:
        return {
            "n_slides": len(self.predictions),
            "slide_metrics": self.slide.to_json(),
            "pooled_patch_metrics": self.patch.to_json() if self.patch is not None else None,
        }


def predict_bag(model: MILModel, bag: Bag) -> SlidePrediction:
    """Score one bag (caller sets eval mode and ``no_grad``); float64 softmax sums to 1."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    out = model(bag.features.unsqueeze(0).to(device), None)
    probs = torch.softmax(out.logits[0].double(), dim=-1).cpu().numpy()
    labels = tumour = None
    if bag.patch_labels is not None:
        labels = bag.patch_labels.cpu().numpy().astype(np.int64)
        tumour = torch.softmax(out.instance_logits[0].double(), dim=-1)[:, 1].cpu().numpy()
    return SlidePrediction(bag.entry.slide_id, int(bag.entry.label), probs, labels, tumour)


def evaluate_entries(
    model: MILModel,
    entries: Sequence[BagEntry],
    *,
    feature_dim: int | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    on_slide: Callable[[SlidePrediction], None] | None = None,
) -> EvaluationResult:
    """Load and score ``entries`` one bag at a time in eval mode, then compute the metrics.

    ``on_slide`` is called with each slide's prediction as soon as it is scored, in ``entries``
    order, so a caller can show progress over a test set that takes minutes without this
    module printing. The model's train/eval mode is restored afterwards. Raises
    ``ValueError`` for no entries and ``FeatureBagError`` for a bag whose width does not match
    ``feature_dim``.
    """
    if not entries:
        raise ValueError("no slides to evaluate")
    bags = (load_bag(entry, feature_dim) for entry in entries)
    return evaluate_bags(model, bags, bootstrap=bootstrap, seed=seed, on_slide=on_slide)


def evaluate_bags(
    model: MILModel,
    bags: Iterable[Bag],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    on_slide: Callable[[SlidePrediction], None] | None = None,
) -> EvaluationResult:
    """Score ``bags`` as they come, then compute the metrics (see :func:`evaluate_entries`).

    Takes an iterable, so a loader that skips unusable files while it reads
    (:meth:`client.training.bags.BagSkips.iter_bags`) reads each bag exactly once and memory
    stays at one bag. ``ValueError`` when it yields no bag.
    """
    was_training = model.training
    model.eval()
    predictions: list[SlidePrediction] = []
    try:
        with torch.no_grad():
            for bag in bags:
                prediction = predict_bag(model, bag)
                predictions.append(prediction)
                if on_slide is not None:
                    on_slide(prediction)
    finally:
        model.train(was_training)
    if not predictions:
        raise ValueError("no slides to evaluate")
    return _metrics(predictions, bootstrap=bootstrap, seed=seed)


def _metrics(
    predictions: Iterable[SlidePrediction], *, bootstrap: int, seed: int
) -> EvaluationResult:
    preds = tuple(predictions)
    y = np.asarray([p.label for p in preds], dtype=np.int64)
    probs = np.stack([p.probs for p in preds])
    slides = slide_metrics(y, probs, bootstrap=bootstrap, seed=seed)
    annotated = [
        (p.patch_labels, p.patch_tumour_prob)
        for p in preds
        if p.patch_labels is not None and p.patch_tumour_prob is not None
    ]
    patch = pooled_patch_metrics(annotated) if annotated else None
    return EvaluationResult(preds, slides, patch)


def predictions_csv(predictions: Sequence[SlidePrediction], labels: Sequence[str]) -> str:
    """CSV text ``slide_id,label,prob_<label>...,pred`` with label names, not indices."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["slide_id", "label", *(f"prob_{name}" for name in labels), "pred"])
    for p in predictions:
        if len(p.probs) != len(labels):
            raise ValueError(f"{p.slide_id}: {len(p.probs)} probabilities for {len(labels)} labels")
        writer.writerow(
            [p.slide_id, labels[p.label], *(f"{float(x):.6f}" for x in p.probs), labels[p.pred]]
        )
    return buffer.getvalue()


def save_checkpoint(path: str | Path, model: MILModel, model_config: ModelConfig) -> None:
    """Write weights + model config atomically, loadable with ``weights_only=True``."""
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model_config.model_dump(mode="json"),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path) -> tuple[MILModel, ModelConfig]:
    """Rebuild the model from a checkpoint's config and load its weights (CPU).

    Raises ``ConfigError`` naming the file when it is missing, not a fedpath checkpoint, or its
    weights do not fit the architecture its config describes.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"model checkpoint not found: {file} (run `fedpath local train`)")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(
            f"{file}: refused: the checkpoint holds pickled Python objects, not only tensors "
            f"and plain values{pickled_reference(exc)}; fedpath never unpickles code from a file"
        ) from exc
    except Exception as exc:  # torch raises several unrelated types for unreadable files
        raise ConfigError(f"{file}: not a readable fedpath checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or {"state_dict", "model_config"} - payload.keys():
        raise ConfigError(f"{file}: not a fedpath checkpoint (state_dict/model_config missing)")
    try:
        cfg = ModelConfig.model_validate(payload["model_config"])
    except ValidationError as exc:
        raise ConfigError(f"{file}: invalid model_config ({exc})") from exc
    with torch.random.fork_rng(devices=[]):  # the init draws are overwritten; keep caller RNG
        model = build_model(cfg)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ConfigError(f"{file}: weights do not match its model_config ({exc})") from exc
    model.eval()
    return model, cfg
